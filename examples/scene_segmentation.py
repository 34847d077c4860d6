"""Scene segmentation (S3DIS layout): inner product vs ℓ1, and the MGS / DLC ablation.

Reproduces the structure of the paper's S3DIS experiments ("Rethinking 3D
Convolution in ℓp-norm Space", NeurIPS 2024, Tables 3 and 6) on generated
indoor scenes (:func:`l1fx.s3dis.generate_scenes`, no download) or on the real
data set (``--data ROOT``, either layout, :class:`l1fx.data.S3DIS`):

* PointNet and PointNet++ (SSG) semantic segmentation, each trained as
  - ``baseline``: the inner-product network;
  - ``l1-vanilla``: every layer converted to ℓ1 (``l1fx.convert``, ratio 1), exact ℓ1
    gradients (MGS mix fixed at 0), no DLC;
  - ``l1-mgs``: MGS (mix 1 -> 0, cosine), no DLC;
  - ``l1-dlc``: DLC (per-layer gradient scaling + its learning-rate schedule), no MGS;
  - ``l1-mgs-dlc``: both (the paper's ℓ1 networks);
* ``--seeds N`` repeats every run with N seeds (initial weights, batch order) and reports mean ± std;
* mIoU / OA over every point of the test rooms (Area ``--test-area``), and the energy of
  one forward pass of a block (``l1fx.report.compare``, Horowitz 45 nm, fp32).

Every variant of a model shares the data, the initial dense weights of a seed, the optimizer
(SGD, momentum 0.9, weight decay 1e-4), the base learning rate and the number of steps;
baseline, l1-vanilla and l1-mgs use a plain cosine learning rate, l1-dlc and l1-mgs-dlc the DLC
schedule. Writes ``results.json``, ``results.md`` and ``curves_<model>.png`` to ``--out``.

    python examples/scene_segmentation.py --quick       # < 2 min on 2 cores
    python examples/scene_segmentation.py --seeds 3     # the full preset; examples/RESULTS.md has the runs
    python examples/scene_segmentation.py --data /data/stanford_indoor3d --num-points 4096 ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import l1fx
from l1fx._cli import init_type
from l1fx.data import S3DIS, evaluate_scenes, generate_scenes
from l1fx.models import build_scene_model
from l1fx.report import compare
from l1fx.study import VARIANTS, finite, make_optimizer, mean_std, plot_curves, progress_factory, schedules, summarize
from l1fx.train import TrainingWrapper

MODEL_NAMES = ("pointnet", "pointnet2")

# "smoke": the test suite's end-to-end run; "quick": < 2 min on 2 cores; "full": the RESULTS.md study.
PRESETS = {
    "smoke": dict(areas=(1, 5), rooms=1, room_points=6000, points=64, batch=4, epochs=1, models={
        "pointnet": dict(encoder=(8, 16), global_mlp=(16,), head=(16,)),
        "pointnet2": dict(npoint=(16, 4), radius=(0.2, 0.4), nsample=(4, 4), sa_mlps=((8,), (16,)),
                          fp_mlps=((16,), (8,)), head=8),
    }),
    "quick": dict(areas=(1, 2, 5), rooms=2, room_points=8000, points=256, batch=16, epochs=5, models={
        "pointnet": dict(encoder=(16, 32, 64), global_mlp=(64, 32), head=(64, 32)),
        "pointnet2": dict(npoint=(64, 16), radius=(0.15, 0.3), nsample=(8, 8), sa_mlps=((16, 32), (32, 64)),
                          fp_mlps=((64,), (32,)), head=32),
    }),
    "full": dict(areas=(1, 2, 3, 4, 5, 6), rooms=2, room_points=12000, points=256, batch=16, epochs=10, models={
        "pointnet": dict(),
        "pointnet2": dict(npoint=(64, 16, 4), radius=(0.15, 0.3, 0.6), nsample=(16, 16, 4)),
    }),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small run (< 2 min on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="tiny end-to-end check (the test suite's)")
    p.add_argument("--data", help="an S3DIS root (either layout) instead of generated scenes")
    p.add_argument("--layout", default="auto", choices=("auto", "raw", "npy"), help="layout of --data")
    p.add_argument("--test-area", type=int, default=5)
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma list of " + ", ".join(MODEL_NAMES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=1, help="runs per (model, variant), seeds F..F+N-1; mean ± std")
    p.add_argument("--first-seed", type=int, default=0, help="F, the first seed (to add seeds to a study)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--rooms", type=int, help="generated rooms per area")
    p.add_argument("--room-points", type=int, help="points per generated room")
    p.add_argument("--points", type=int, help="points sampled per block")
    p.add_argument("--block-size", type=float, default=1.0)
    p.add_argument("--stride", type=float, help="block stride (default: the block size)")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--lr", type=float, default=0.05, help="base learning rate (SGD, momentum 0.9), every variant")
    p.add_argument("--eta", type=float, default=0.2, help="DLC eta")
    p.add_argument("--init", default="data", type=init_type,
                   help="initial ℓ1 weights, l1fx.convert(init=...): 'data' (default), 'dense' or a factor")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: small models gain little from more, and lose much on a busy machine)")
    p.add_argument("--out", default="out/scene_segmentation", help="directory for results, plots, generated data")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    for key in ("epochs", "rooms", "room_points", "points", "batch"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.areas, args.model_kwargs = preset["areas"], preset["models"]
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    for m in args.models:
        if m not in MODEL_NAMES:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODEL_NAMES)}")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for key in ("seeds", "epochs", "rooms", "room_points", "points", "batch", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


def build_run(args, model_name: str, variant: str, seed: int, train_set, total_steps: int):
    torch.manual_seed(seed)  # identical initial weights for every variant of a (model, seed)
    model = build_scene_model(model_name, train_set.num_classes, **args.model_kwargs[model_name])
    if variant != "baseline":
        example = None
        if args.init == "data":
            example = (next(iter(DataLoader(train_set, batch_size=args.batch)))[0],)
        model = l1fx.convert(model, ratio=1.0, init=args.init, example_inputs=example)
    opt = make_optimizer(model.parameters(), "sgd", args.lr, weight_decay=1e-4)
    mgs, dlc = schedules(variant, args.eta, "default")  # the recipe of the RESULTS.md runs
    return model, opt, TrainingWrapper(model, opt, total_steps, mgs=mgs, dlc=dlc)


def evaluate(model: nn.Module, test_set: S3DIS, batch: int) -> dict:
    model.eval()
    s = evaluate_scenes(model, test_set, batch_size=max(64, batch))
    model.train()
    return {"miou": s.miou, "oa": s.oa, "macc": s.macc, "iou": s.iou}


def train_one(args, model_name, variant, seed, train_set, test_set, progress) -> dict:
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True, generator=g)
    total = args.epochs * len(loader)
    model, opt, wrapper = build_run(args, model_name, variant, seed, train_set, total)
    history = {"epoch": [], "train_loss": [], "test_miou": [], "test_oa": []}
    label = f"{model_name} {variant} s{seed}"
    bar = progress(total=total, desc=f"{label:<26}", leave=False)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train_set.set_epoch(epoch)  # new point samples of every block
        running, count = 0.0, 0
        for pts, lab in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(pts), lab)
            loss.backward()
            wrapper.step()
            running, count = running + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        scores = evaluate(model, test_set, args.batch)
        history["epoch"].append(epoch)
        history["train_loss"].append(running / max(count, 1))
        history["test_miou"].append(scores["miou"])
        history["test_oa"].append(scores["oa"])
        if args.no_progress:
            print(f"  {label} epoch {epoch}: train loss {history['train_loss'][-1]:.3f}, "
                  f"test mIoU {scores['miou']:.2f}, OA {scores['oa']:.2f}", flush=True)
    bar.close()
    seconds = time.perf_counter() - t0
    print(f"{label:<26} mIoU {scores['miou']:6.2f}  OA {scores['oa']:6.2f}  ({seconds:.0f} s, {total} steps)",
          flush=True)
    return {"model": model_name, "variant": variant, "seed": seed, "final": scores, "history": history,
            "seconds": seconds, "steps": total, "l1_layers": len(wrapper.l1_modules),
            "finite": finite(history["train_loss"])}


def energy(args, model_name: str, train_set) -> dict:
    """One forward pass of one block of ``--points`` points: dense vs fully converted (45 nm, fp32)."""
    torch.manual_seed(0)
    dense = build_scene_model(model_name, train_set.num_classes, **args.model_kwargs[model_name])
    block = (train_set[0][0][None],)
    c = compare(dense, l1fx.convert(dense, ratio=1.0), block)
    return {"dense_uJ": c.original.total["energy_pJ"] / 1e6, "l1_uJ": c.converted.total["energy_pJ"] / 1e6,
            "ratio": c.ratio["energy_pJ"], "dense_mul": c.original.total["mul"], "l1_add": c.converted.total["add"]}


def summarize_runs(results: list[dict]) -> dict:
    """``{(model, variant): {"miou": [...], "oa": [...], "seconds": [...]}}`` over seeds."""
    return summarize(results, lambda r: (r["model"], r["variant"]),
                     {"miou": lambda r: r["final"]["miou"], "oa": lambda r: r["final"]["oa"],
                      "seconds": lambda r: r["seconds"]})


def markdown_tables(results: list[dict], energies: dict, seeds: int) -> str:
    summary = summarize_runs(results)
    seed_note = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [f"Baseline vs ℓ1 + MGS + DLC ({seed_note}; energy of one forward pass of one block, 45 nm fp32):", "",
             "| Model | Variant | mIoU | OA | Energy (µJ) | Energy ratio |", "|---|---|---|---|---|---|"]
    for (model, variant), s in summary.items():
        if variant not in ("baseline", "l1-mgs-dlc"):
            continue
        e = energies.get(model)
        e_cells = "- | -" if e is None else (f"{e['dense_uJ']:.3g} | 1" if variant == "baseline"
                                             else f"{e['l1_uJ']:.3g} | {e['ratio']:.2f}")
        lines.append(f"| {model} | {variant} | {mean_std(s['miou'])} | {mean_std(s['oa'])} | {e_cells} |")
    ablation = [(k, s) for k, s in summary.items() if k[1] != "baseline"]
    if ablation:
        lines += ["", f"Ablation, fully converted ℓ1 networks ({seed_note}):", "",
                  "| Model | Variant | MGS | DLC | mIoU | OA |", "|---|---|---|---|---|---|"]
        for (model, variant), s in ablation:
            mgs, dlc = ("✓" if "mgs" in variant else "", "✓" if "dlc" in variant else "")
            lines.append(f"| {model} | {variant} | {mgs} | {dlc} | {mean_std(s['miou'])} | {mean_std(s['oa'])} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress_factory(args.no_progress)
    t0 = time.perf_counter()
    if args.data is None:
        # one folder per generation: generate_scenes reuses a matching one and refuses to mix two
        root = out / f"scenes-a{''.join(map(str, args.areas))}-r{args.rooms}-p{args.room_points}"
        generate_scenes(root, args.areas, args.rooms, args.room_points, seed=0, layout="npy",
                        progress=not args.no_progress)
        source = f"generated scenes (areas {list(args.areas)}, {args.rooms} rooms each, {args.room_points} points)"
    else:
        root, source = Path(args.data), f"S3DIS at {args.data}"
    common = dict(test_area=args.test_area, num_points=args.points, block_size=args.block_size, stride=args.stride,
                  layout="npy" if args.data is None else args.layout, progress=not args.no_progress)
    train_set, test_set = S3DIS(root, split="train", **common), S3DIS(root, split="test", **common)
    if len(train_set) < args.batch:
        print(f"error: {len(train_set)} training blocks, fewer than --batch {args.batch}", file=sys.stderr)
        raise SystemExit(2)
    test_points = sum(len(r.labels) for r in test_set.rooms)
    print(f"data: {source}; {len(train_set.rooms)} train rooms ({len(train_set)} blocks), {len(test_set.rooms)} "
          f"test rooms ({len(test_set)} items, {test_points} points scored), {args.points} points per block; "
          f"{args.epochs} epochs, batch {args.batch}, lr {args.lr}, ℓ1 init {args.init}", flush=True)
    energies = {m: energy(args, m, train_set) for m in args.models}
    for m, e in energies.items():
        print(f"energy per block, {m}: dense {e['dense_uJ']:.2f} µJ, ℓ1 {e['l1_uJ']:.2f} µJ "
              f"(ratio {e['ratio']:.3f})", flush=True)
    results = [train_one(args, m, v, s, train_set, test_set, progress)
               for m in args.models for s in range(args.first_seed, args.first_seed + args.seeds)
               for v in args.variants]
    tables = markdown_tables(results, energies, args.seeds)
    print("\n" + tables)
    command = "python examples/scene_segmentation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "results.json").write_text(json.dumps({"command": command, "energy": energies, "results": results},
                                                 indent=1))
    (out / "results.md").write_text(f"Command: `{command.strip()}`\n\n{tables}\n")
    if not args.no_plots:
        for path in plot_curves(results, out, "test_miou", "mIoU"):
            print(f"wrote {path}")
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    try:
        main()
    except l1fx.UsageError as e:  # bad --data, --test-area, ...: one line, exit 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
