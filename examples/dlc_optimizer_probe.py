"""What DLC's per-layer factor does under SGD and under AdamW, measured per ℓ1 layer.

Fully converted PointNet++ of the part-segmentation example (the ``full`` preset's model,
``init="data"``), the same first ``--steps`` training batches for every configuration; for each ℓ1
layer, the RMS of the weight's update per step (mean over the last half of the steps, after Adam's
moments have warmed up), in units of the group's learning rate:

* ``SGD`` without scaling, ``SGD + DLC`` (gradient mode: the factor on the gradient);
* ``AdamW`` without scaling, ``AdamW + DLC gradient`` (today's rule applied to Adam), ``AdamW + DLC
  update`` (the factor on the update, ``DLC(mode="update")``, what ``mode="auto"`` picks for AdamW).

    python examples/dlc_optimizer_probe.py --steps 20
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from l1fx.train import DLC, MGS, TrainingWrapper

EXAMPLE = Path(__file__).resolve().parent / "part_segmentation.py"
CONFIGS = {  # name -> (optimizer, lr, DLC or None)
    "SGD": ("sgd", 0.05, None),
    "SGD + DLC": ("sgd", 0.05, DLC.paper(mode="gradient")),
    "AdamW": ("adamw", 1e-3, None),
    "AdamW + DLC gradient": ("adamw", 1e-3, DLC.paper(mode="gradient")),
    "AdamW + DLC update": ("adamw", 1e-3, DLC.paper(mode="update")),
}


def load_example():
    spec = importlib.util.spec_from_file_location("part_segmentation_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe(steps: int, model_name: str = "pointnet2") -> dict:
    ex = load_example()
    args = ex.parse_args(["--models", model_name])
    train_set, _ = ex.make_part_segmentation(args.train, args.test, args.points, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    batches = [b for _, b in zip(range(steps), loader)]
    out = {}
    for name, (opt_name, lr, dlc) in CONFIGS.items():
        model = ex.build_model_for(args, model_name, "l1-mgs-dlc", 1.0, 0, train_set)
        opt = ex.make_optimizer(model.parameters(), opt_name, lr, 1e-4)
        wrapper = TrainingWrapper(model, opt, steps, mgs=MGS(), dlc=dlc if dlc is not None else
                                  DLC(scale_gradients=False, hold=0.0, drops=()))
        names = [n for n, _ in wrapper.l1_modules]
        rms = {n: [] for n in names}
        grad_rms = {n: [] for n in names}
        for pts, cat, lab in batches:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(pts.transpose(1, 2), cat), lab).backward()
            before = [m.weight.detach().clone() for _, m in wrapper.l1_modules]
            lr_now = opt.param_groups[0]["lr"]
            for n, m in wrapper.l1_modules:
                grad_rms[n].append(m.weight.grad.pow(2).mean().sqrt().item())
            wrapper.step()
            for (n, m), w0 in zip(wrapper.l1_modules, before):
                rms[n].append((m.weight.detach() - w0).pow(2).mean().sqrt().item() / lr_now)
        half = steps // 2
        out[name] = {n: {"update_rms_per_lr": statistics.mean(rms[n][half:]),
                         "raw_grad_rms": statistics.mean(grad_rms[n][half:])} for n in names}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="out/dlc_optimizer_probe.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = probe(args.steps)
    finally:
        torch.set_num_threads(threads)
    layers = list(next(iter(result.values())))
    print("update RMS / lr per ℓ1 layer (mean over the last half of the steps)")
    print(f"{'layer':<28}" + "".join(f"{c:>22}" for c in result) + f"{'raw grad RMS':>14}")
    for n in layers:
        print(f"{n:<28}" + "".join(f"{result[c][n]['update_rms_per_lr']:>22.3g}" for c in result)
              + f"{result['AdamW'][n]['raw_grad_rms']:>14.2g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
