"""The built-in default job: `python -m l1fx.demo` (README quick start)."""
from __future__ import annotations

import time

import torch
from torch import nn

import l1fx
from l1fx.kernels import get_backend


class TinyPointNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv1d(3, 32, 1), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Conv1d(32, 64, 1), nn.BatchNorm1d(64), nn.ReLU())
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.mlp(x).amax(-1))


def main() -> None:
    torch.manual_seed(0)
    model = TinyPointNet()
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) in l1fx.nn.DENSE_TO_L1:
                setattr(mod, child_name, l1fx.nn.DENSE_TO_L1[type(child)].from_dense(child))
    x = torch.randn(8, 3, 1024)
    t0 = time.perf_counter()
    y = model(x)
    y.sum().backward()
    print(f"l1 TinyPointNet forward+backward on {tuple(x.shape)}: {time.perf_counter() - t0:.3f} s, "
          f"backend {get_backend(x).name}")
    print(model)


if __name__ == "__main__":
    main()
