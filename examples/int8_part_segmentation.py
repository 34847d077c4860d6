"""int8 PointNet part segmentation: accuracy of l1fx.quantize against the fp32 ℓ1 model, and forward speed.

Trains PointNet (``l1fx.models``) converted to ℓ1 with MGS + DLC on the
generated part-segmentation data, exactly as examples/part_segmentation.py's
``l1-mgs-dlc`` variant does (its helpers are imported, same presets and flags),
then

* quantises it with ``l1fx.quantize`` (calibration: --calib training batches)
  and compares instance mIoU / accuracy of fp32 ℓ1 and int8 ℓ1 on the test set;
* times the whole forward pass of the fp32 dense PointNet (same widths), the
  fp32 ℓ1 model and the int8 ℓ1 model side by side (round-robin, median) on a
  batch of --speed-batch shapes x --speed-points points.

    python examples/int8_part_segmentation.py [--quick] [--threads 1] [--out out/int8_part_segmentation]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import part_segmentation as ps  # noqa: E402  (the example's helpers, unchanged)

import l1fx  # noqa: E402
from l1fx.data import make_part_segmentation  # noqa: E402
from l1fx.models import build_model  # noqa: E402

sys.path.pop(0)


def train(args, train_set, test_set):
    g = torch.Generator().manual_seed(args.first_seed)
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True, generator=g)
    total = args.epochs * len(loader)
    model, opt, wrapper = ps.build_run(args, "pointnet", "l1-mgs-dlc", 1.0, args.first_seed, train_set, total,
                                       len(loader))
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for pts, cat, lab in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(pts.transpose(1, 2), cat), lab)
            loss.backward()
            wrapper.step()
        print(f"  epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}", flush=True)
    return model.eval(), time.perf_counter() - t0, total


def forward_times(models: dict, batch: int, points: int, categories: int, reps: int) -> dict:
    torch.manual_seed(1)
    pts = torch.randn(batch, 3, points)
    cat = torch.randint(0, categories, (batch,))
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(pts, cat)  # warm-up
        for _ in range(reps):
            for name, m in models.items():
                t = time.perf_counter()
                m(pts, cat)
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    extra = {"--calib": 4, "--speed-batch": 32, "--speed-points": 2048, "--reps": 11}
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = {}
    for key, default in extra.items():
        opts[key] = default
        if key in argv:
            i = argv.index(key)
            opts[key] = int(argv[i + 1])
            del argv[i:i + 2]
    if "--out" not in argv:
        argv += ["--out", "out/int8_part_segmentation"]
    args = ps.parse_args(argv + ["--models", "pointnet", "--variants", "l1-mgs-dlc", "--no-plots"])
    torch.set_num_threads(args.threads)
    # the data of examples/part_segmentation.py (always its seed 0); --first-seed sets weights and batch order
    train_set, test_set = make_part_segmentation(args.train, args.test, args.points, seed=0)
    model, seconds, steps = train(args, train_set, test_set)
    test_loader = DataLoader(test_set, batch_size=64)
    fp32 = ps.evaluate(model, test_loader, train_set.classes)
    calib_loader = DataLoader(train_set, batch_size=args.batch)
    calib = [(p.transpose(1, 2), c) for (p, c, _), _ in zip(calib_loader, range(opts["--calib"]))]
    q = l1fx.quantize(model, calib)
    int8 = ps.evaluate(q, test_loader, train_set.classes)
    q.eval()
    model.eval()
    torch.manual_seed(args.first_seed)
    dense = build_model("pointnet", train_set.num_parts, train_set.num_categories,
                        **args.model_kwargs["pointnet"]).eval()
    t = forward_times({"dense fp32": dense, "l1 fp32": model, "l1 int8": q}, opts["--speed-batch"],
                      opts["--speed-points"], train_set.num_categories, opts["--reps"])
    out = {"steps": steps, "train_seconds": seconds, "threads": args.threads, "fp32_l1": fp32, "int8_l1": int8,
           "forward_seconds": t, "speed_input": [opts["--speed-batch"], 3, opts["--speed-points"]],
           "calibration_batches": len(calib), "isa": l1fx.kernels.int8_cpu.build_info().get("isa")}
    print(f"PointNet l1 MGS+DLC ({steps} steps, {seconds:.0f} s): fp32 l1 mIoU {fp32['instance_miou']:.2f} "
          f"acc {fp32['accuracy']:.2f} | int8 l1 mIoU {int8['instance_miou']:.2f} acc {int8['accuracy']:.2f} "
          f"(delta {int8['instance_miou'] - fp32['instance_miou']:+.2f})")
    print(f"forward {opts['--speed-batch']}x3x{opts['--speed-points']} ({args.threads} thread(s)), median ms: "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items())
          + f" | int8 vs dense {t['dense fp32'] / t['l1 int8']:.2f}x, vs l1 fp32 {t['l1 fp32'] / t['l1 int8']:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "int8_results.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
