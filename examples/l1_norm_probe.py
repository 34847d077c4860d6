"""Is the low mid-training test mIoU of ℓ1 PointNet++ the normalisation's running statistics lagging?

Trains the part-segmentation example's PointNet++ (baseline and fully converted ℓ1 + MGS + DLC, the
study's protocol, seed 0) for the first ``--stop`` epochs of the ``--epochs``-epoch schedule (the
learning rate still high), then scores the test set three ways:

* ``eval``: eval mode as it is (the running statistics of BatchNorm / L1OutputNorm);
* ``re-estimated``: after recomputing every norm's running statistics on the training set with the
  weights frozen (cumulative average, ``momentum=None``), then eval mode;
* the training loss of the last epoch, for reference.

    python examples/l1_norm_probe.py --stop 10
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from l1fx.train import reestimate_norm_stats

EXAMPLE = Path(__file__).resolve().parent / "part_segmentation.py"


def load_example():
    spec = importlib.util.spec_from_file_location("part_segmentation_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe(stop: int, epochs: int, model_name: str = "pointnet2") -> dict:
    ex = load_example()
    args = ex.parse_args(["--models", model_name, "--epochs", str(epochs)])
    train_set, test_set = ex.make_part_segmentation(args.train, args.test, args.points, seed=0)
    out = {}
    for variant in ("baseline", "l1-mgs-dlc"):
        loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        test_loader = DataLoader(test_set, batch_size=64)
        total = epochs * len(loader)
        model, opt, wrapper = ex.build_run(args, model_name, variant, 1.0, 0, train_set, total, len(loader))
        for _ in range(stop):
            running = 0.0
            for pts, cat, lab in loader:
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(pts.transpose(1, 2), cat), lab)
                loss.backward()
                wrapper.step()
                running += loss.item()
        as_is = ex.evaluate(model, test_loader, train_set.classes)["instance_miou"]
        reestimate_norm_stats(model, DataLoader(train_set, batch_size=args.batch),
                              forward=lambda m, b: m(b[0].transpose(1, 2), b[1]))
        fixed = ex.evaluate(model, test_loader, train_set.classes)["instance_miou"]
        out[variant] = {"eval": as_is, "re_estimated": fixed, "train_loss": running / len(loader)}
        print(f"{variant:<12} after {stop}/{epochs} epochs: test mIoU eval {as_is:.2f}, with re-estimated norm "
              f"statistics {fixed:.2f}; last-epoch train loss {out[variant]['train_loss']:.3f}", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stop", type=int, default=10)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/l1_norm_probe.json")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = probe(args.stop, args.epochs)
    finally:
        torch.set_num_threads(threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
