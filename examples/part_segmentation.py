"""Part segmentation on generated shapes: inner product vs ℓ1, the paper's MGS / DLC and ratio ablations.

Reproduces the structure of the paper's part-segmentation experiments
("Rethinking 3D Convolution in ℓp-norm Space", NeurIPS 2024) on data that
needs no download (:func:`l1fx.data.make_part_segmentation`):

* PointNet, PointNet++ (SSG) and a voxel 3D CNN, each trained as
  - ``baseline``: the inner-product network;
  - ``l1-vanilla``: every layer converted to ℓ1, exact ℓ1 gradients (mix 0), no DLC;
  - ``l1-mgs``: + MGS only; ``l1-dlc``: + DLC only; ``l1-mgs-dlc``: both (the paper's ablation);
* the replacement-ratio ablation (``--ratios``: 1/3, 2/3 of the layers converted, earliest first,
  MGS + DLC; ratio 1 is ``l1-mgs-dlc``) for the models of ``--ratio-models``; ``--ratio-unit layer``
  counts layers instead of convert's units (a shared MLP is one unit);
* ``--seeds N`` repeats every run with N seeds (initial weights, batch order): mean ± std;
* ``--budget F`` trains F times the preset's epochs; the training-step time of ℓ1 ÷ dense per model,
  measured side by side (``--speed-repeats``);
* equal tuning: ``--lr-grid`` runs every configuration at each base learning rate of a grid, ``--val N``
  holds N training shapes out (category-balanced) and scores on them instead of the test set, and
  ``--lr-from`` runs each (model, variant, ratio) at the learning rate with the best mean validation
  mIoU of such a grid run (the same rule for every variant, the baseline included).

The ℓ1 variants convert with ``l1fx.convert(model, ratio, init=--init)`` (``init`` always passed
explicitly, so the study does not depend on convert's default). All variants of a (model, seed) share
the data, the initial dense weights, the optimizer (``--optimizer``), its base learning rate and weight
decay, and the number of steps; the MGS / DLC schedules of each variant come from
:func:`l1fx.study.schedules` (``--recipe``; ``cosine``: one cosine learning rate for every variant).
Writes ``results.json``, ``results.md`` and ``curves_<model>.png`` to ``--out``.

    python examples/part_segmentation.py --quick        # smoke run, < 2 min on 2 cores
    python examples/part_segmentation.py --seeds 3      # the full preset; examples/RESULTS.md has the runs
    python examples/part_segmentation.py --models pointnet2 --ratios= --val 48 --lr-grid 0.05,0.5,5 --out grid
    python examples/part_segmentation.py --models pointnet2 --ratios= --seeds 3 --lr-from grid --out tuned
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from l1fx._cli import init_type
from l1fx.data import make_part_segmentation, part_segmentation_metrics
from l1fx.models import build_model
from l1fx.study import (OPTIMIZERS, RECIPES, VARIANTS, finite, make_optimizer, mean_std, plot_curves,
                        progress_factory, schedules, select_best, step_time, stratified_split, summarize)
from l1fx.data import PartSegmentationData
from l1fx.train import TrainingWrapper, reestimate_norm_stats

try:  # the product's converter; a module swap stands in while it is not installed
    from l1fx.convert import convert as _convert
except ImportError:  # pragma: no cover - depends on the checkout
    _convert = None

MODEL_NAMES = ("pointnet", "pointnet2", "voxelcnn")

# Sizes: "quick" is a smoke test of the whole pipeline; "full" takes ~40-90 s per run at 1 thread.
PRESETS = {
    "quick": dict(train=64, test=32, points=128, batch=16, epochs=2, models={
        "pointnet": dict(encoder=(16, 32, 64), head=(64, 32)),
        "pointnet2": dict(npoint=(32, 8), nsample=(8, 8), sa_mlps=((16, 16, 32), (32, 32, 64), (64, 128)),
                          fp_mlps=((64,), (64,), (32, 32)), head=32),
        "voxelcnn": dict(resolution=8, widths=(8, 16), head=32),
    }),
    "full": dict(train=192, test=96, points=256, batch=16, epochs=24, models={
        "pointnet": dict(),
        "pointnet2": dict(npoint=(64, 16), nsample=(12, 12)),
        "voxelcnn": dict(resolution=8),
    }),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 2 min on 2 CPU cores)")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma list of " + ", ".join(MODEL_NAMES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--ratios", default="0.333,0.667",
                   help="replacement ratios besides 1 (MGS + DLC); empty string to skip")
    p.add_argument("--ratio-models", default=",".join(MODEL_NAMES), help="models of the ratio ablation")
    p.add_argument("--ratio-unit", default="unit", choices=("unit", "layer"),
                   help="what --ratios counts: convert's units (a shared MLP is one unit; default) or single layers "
                        "in registration order")
    p.add_argument("--seeds", type=int, default=1, help="runs per configuration, seeds F..F+N-1; mean ± std")
    p.add_argument("--first-seed", type=int, default=0, help="F, the first seed (to add seeds to a study)")
    p.add_argument("--budget", type=float, default=1.0, help="train this many times the preset's epochs")
    p.add_argument("--epochs", type=int, help="override the preset's epochs (before --budget)")
    p.add_argument("--train", type=int, help="number of training shapes")
    p.add_argument("--test", type=int, help="number of test shapes")
    p.add_argument("--points", type=int, help="points per shape")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS),
                   help="every variant's optimizer: sgd (momentum 0.9) or adamw")
    p.add_argument("--lr", type=float, help="base learning rate, every variant (default: sgd 0.05, adamw 1e-3)")
    p.add_argument("--lr-grid", default=None,
                   help="comma list of base learning rates: every configuration runs at each (with --val, to select one)")
    p.add_argument("--lr-from", default=None,
                   help="comma list of results.json files (or folders) of a --val --lr-grid run: each (model, variant, "
                        "ratio) runs at its learning rate with the best mean validation mIoU there")
    p.add_argument("--val", type=int, default=0,
                   help="hold this many training shapes out (category-balanced, fixed split) and evaluate on them "
                        "instead of the test set (for choosing hyper-parameters; the test set is not evaluated)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--recipe", default="cosine", choices=RECIPES,
                   help="MGS / DLC schedules (l1fx.study.schedules): cosine (default: one cosine lr for every "
                        "variant), default (the library's DLC schedule for DLC variants) or paper (MGS lam**k)")
    p.add_argument("--mgs-lam", type=float, default=0.99, help="MGS.paper lam (--recipe paper)")
    p.add_argument("--mgs-unit", default="step", choices=("step", "epoch"), help="MGS.paper unit (--recipe paper)")
    p.add_argument("--eta", type=float, default=0.2, help="DLC eta")
    p.add_argument("--dlc-mode", default="auto", choices=("auto", "gradient", "update"),
                   help="where DLC's per-layer factor goes (l1fx.train.DLC mode)")
    p.add_argument("--update-eta", type=float, default=20.0,
                   help="DLC update_eta: the ℓ1 weights' update RMS in units of lr (update mode, i.e. AdamW)")
    p.add_argument("--init", default="data", type=init_type,
                   help="initial ℓ1 weights, l1fx.convert(init=...): 'data' (templates at the scale of each "
                        "layer's inputs on the first training batch; default), 'dense' (keep the dense init) or "
                        "a factor multiplying the dense init (e.g. 10); see examples/RESULTS.md")
    p.add_argument("--exclude", default=None, help="l1fx.convert exclude pattern for the ℓ1 variants "
                                                   "(e.g. 'classifier' keeps it dense)")
    p.add_argument("--speed-repeats", type=int, default=5,
                   help="interleaved repeats of the ℓ1 vs dense training-step timing (0: skip)")
    p.add_argument("--norm-stats", default="running", choices=("running", "reestimate"),
                   help="evaluate with the norms' running statistics, or re-estimate them first from "
                        "--norm-batches training batches (l1fx.train.reestimate_norm_stats), every variant alike")
    p.add_argument("--norm-batches", type=int, default=8, help="training batches for --norm-stats reestimate")
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # old spelling of --first-seed
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: small models gain little from more on a busy machine)")
    p.add_argument("--out", default="out/part_segmentation", help="directory for results and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--from-results", default=None,
                   help="comma list of results.json files (or their folders) of earlier runs: train nothing, "
                        "write the combined tables and curves (also budget curves) to --out")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key in ("epochs", "train", "test", "points", "batch"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.seed is not None:
        args.first_seed = args.seed
    if not args.budget > 0:
        p.error("--budget must be positive")
    args.epochs = max(1, round(args.epochs * args.budget))
    if sum(x is not None for x in (args.lr, args.lr_grid, args.lr_from)) > 1:
        p.error("give at most one of --lr, --lr-grid, --lr-from")
    try:
        args.lrs = [float(x) for x in args.lr_grid.split(",") if x.strip()] if args.lr_grid else [None]
    except ValueError:
        p.error(f"--lr-grid must be a comma list of numbers, got {args.lr_grid!r}")
    if args.lr is None:
        args.lr = OPTIMIZERS[args.optimizer]
    args.lrs = [args.lr if x is None else x for x in args.lrs]
    if not args.lrs or not all(0 < x < float("inf") for x in args.lrs):
        p.error("learning rates must be positive and finite")
    if not 0 <= args.val < args.train:
        p.error(f"--val must lie in 0 .. --train - 1 = {args.train - 1}")
    if args.train - args.val < args.batch:
        p.error(f"--val {args.val} leaves {args.train - args.val} training shapes, fewer than one batch "
                f"(--batch {args.batch}): lower --val or raise --train")
    args.model_kwargs = preset["models"]
    args.models = [m for m in args.models.split(",") if m]
    args.ratio_models = [m for m in args.ratio_models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    for m in args.models + args.ratio_models:
        if m not in MODEL_NAMES:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODEL_NAMES)}")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for key in ("seeds", "epochs", "train", "test", "points", "batch", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if any(not 0 < r < 1 for r in args.ratios):
        p.error("--ratios must lie strictly between 0 and 1 (ratio 1 is the l1 variants themselves)")
    return args


def convertible(m: nn.Module) -> bool:
    """A dense layer of a registered kind that has an ℓ1 layer."""
    from l1fx import layers
    from l1fx.nn import L1Module

    spec = layers.spec_for_module(m)
    return spec is not None and spec.l1_class is not None and not isinstance(m, L1Module)


def first_layers(model: nn.Module, ratio: float) -> set:
    """Names of the first ``ratio`` of the convertible layers, in registration order (halves round up)."""
    from l1fx.passes.select import nearest_count

    names = [n for n, m in model.named_modules() if convertible(m)]
    return set(names[: nearest_count(ratio, len(names))])


def to_l1(model: nn.Module, ratio: float, init="dense", example_inputs=None, exclude=None,
          ratio_unit: str = "unit") -> nn.Module:
    """``l1fx.convert(model, ratio, init=init)``; without it, a module swap of the first ``ratio`` of the layers.

    ``ratio_unit="layer"`` (ratio < 1) converts the first ``ratio`` of the *layers* in registration order (input
    to output for the bundled models) instead of convert's units (a shared MLP is one unit: PointNet has two,
    so its ratios 1/3 and 2/3 both convert the same three-layer encoder).
    """
    if _convert is not None:
        kwargs = dict(ratio=ratio, init=init, exclude=exclude, example_inputs=example_inputs if init == "data" else None)
        if ratio_unit == "layer" and ratio < 1:  # exactly these layers; the ratio then does not apply
            chosen = first_layers(model, ratio)
            kwargs.update(ratio=1.0, filter_fn=lambda module, fqn: fqn in chosen)
        return _convert(model, **kwargs)
    if init != "dense" or exclude is not None:
        raise RuntimeError(f"--init {init} / --exclude needs l1fx.convert, which is not installed")
    from l1fx import layers
    from l1fx.passes.select import nearest_count

    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if convertible(m)]
    for name in names[: nearest_count(ratio, len(names))]:  # halves round up, as convert's ratio does
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, layers.build_replacement(getattr(owner, child)))
    return model


def init_batch(data, batch: int) -> tuple:
    """The forward() arguments of the first ``batch`` training shapes (for ``init="data"``)."""
    pts, cat, _ = next(iter(DataLoader(data, batch_size=batch)))
    return pts.transpose(1, 2), cat


def build_model_for(args, model_name: str, variant: str, ratio: float, seed: int, data) -> nn.Module:
    torch.manual_seed(seed)  # identical initial dense weights for every variant of a (model, seed)
    model = build_model(model_name, data.num_parts, data.num_categories, **args.model_kwargs[model_name])
    if variant != "baseline":
        model = to_l1(model, ratio, args.init, init_batch(data, args.batch) if args.init == "data" else None,
                      args.exclude, getattr(args, "ratio_unit", "unit"))
    return model


def build_run(args, model_name: str, variant: str, ratio: float, seed: int, data, total_steps: int,
              steps_per_epoch: int, lr: float = None):
    model = build_model_for(args, model_name, variant, ratio, seed, data)
    opt = make_optimizer(model.parameters(), args.optimizer, args.lr if lr is None else lr, args.weight_decay)
    mgs, dlc = schedules(variant, args.eta, args.recipe, mgs_lam=args.mgs_lam, mgs_unit=args.mgs_unit,
                         steps_per_epoch=steps_per_epoch)
    if dlc.scale_gradients:
        dlc = dataclasses.replace(dlc, mode=args.dlc_mode, update_eta=args.update_eta)
    return model, opt, TrainingWrapper(model, opt, total_steps, mgs=mgs, dlc=dlc)


@torch.no_grad()
def norm_batches(train_set, batch: int, count: int, seed: int) -> list[tuple]:
    """``count`` training batches, drawn by a generator of their own (the training order is not changed)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    loader = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True, generator=g)
    out = []
    for pts, cat, _ in loader:
        out.append((pts.transpose(1, 2), cat))
        if len(out) == count:
            break
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, classes, stats_batches=None) -> dict:
    if stats_batches:  # precise norm statistics (the same for every variant, baseline included)
        reestimate_norm_stats(model, stats_batches)
    model.eval()
    logits, labels, cats, loss = [], [], [], 0.0
    for pts, cat, lab in loader:
        out = model(pts.transpose(1, 2), cat)
        loss += nn.functional.cross_entropy(out, lab, reduction="sum").item()
        logits.append(out)
        labels.append(lab)
        cats.append(cat)
    labels_t = torch.cat(labels)
    s = part_segmentation_metrics(torch.cat(logits), labels_t, torch.cat(cats), classes)
    model.train()
    return {"instance_miou": s.instance_miou, "class_miou": s.class_miou, "accuracy": s.accuracy,
            "loss": loss / labels_t.numel()}


def train_one(args, model_name, variant, ratio, seed, train_set, test_set, progress, lr=None, eval_set="test") -> dict:
    """One run; ``test_set`` is the set it is scored on (the validation split when ``eval_set == "val"``)."""
    lr = args.lr if lr is None else lr
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True, generator=g)
    test_loader = DataLoader(test_set, batch_size=64)
    total = args.epochs * len(train_loader)
    model, opt, wrapper = build_run(args, model_name, variant, ratio, seed, train_set, total, len(train_loader), lr)
    stats = (norm_batches(train_set, args.batch, args.norm_batches, seed)
             if getattr(args, "norm_stats", "running") == "reestimate" else None)
    history = {"epoch": [], "train_loss": [], "test_miou": [], "test_acc": [], "mix": [], "lr_factor": []}
    label = f"{model_name} {variant}" + (f" r={ratio:.2f}" if ratio < 1 else "") + f" s{seed}" + \
        (f" lr={lr:g}" if len(getattr(args, "lrs", [])) > 1 or lr != args.lr else "")
    bar = progress(total=total, desc=f"{label:<30}", leave=False)
    t0, cpu0 = time.perf_counter(), time.process_time()
    train_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        running, count = 0.0, 0
        t_epoch = time.perf_counter()
        for pts, cat, lab in train_loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(pts.transpose(1, 2), cat), lab)
            loss.backward()
            wrapper.step()
            running, count = running + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", mix=wrapper.mix, refresh=False)
        train_seconds += time.perf_counter() - t_epoch
        scores = evaluate(model, test_loader, train_set.classes, stats)
        history["epoch"].append(epoch)
        history["train_loss"].append(running / max(count, 1))
        history["test_miou"].append(scores["instance_miou"])
        history["test_acc"].append(scores["accuracy"])
        history["mix"].append(wrapper.mix)
        history["lr_factor"].append(wrapper.lr_factor)
        if args.no_progress:
            print(f"  {label} epoch {epoch}: train loss {history['train_loss'][-1]:.3f}, "
                  f"{eval_set} mIoU {scores['instance_miou']:.2f}", flush=True)
    bar.close()
    final = scores  # the last epoch's evaluation is the final one
    seconds = time.perf_counter() - t0
    print(f"{label:<30} mIoU {final['instance_miou']:6.2f}  acc {final['accuracy']:6.2f}  "
          f"({seconds:.0f} s, {total} steps)", flush=True)
    return {"model": model_name, "variant": variant, "ratio": ratio, "seed": seed,
            "ratio_unit": getattr(args, "ratio_unit", "unit") if ratio < 1 else "-",
            "init": "-" if variant == "baseline" else str(args.init), "final": final, "history": history,
            "seconds": seconds, "train_seconds": train_seconds, "cpu_seconds": time.process_time() - cpu0,
            "steps": total, "lr": lr, "eval": eval_set,
            "l1_layers": len(wrapper.l1_modules), "finite": finite(history["train_loss"])}


def measure_speed(args, train_set, repeats: int) -> dict:
    """Median time of one whole training step (forward, backward, wrapper.step), ℓ1 MGS + DLC ÷ dense.

    Both models of a pair are stepped interleaved on the same batch, so machine load hits both alike.
    """
    batch = next(iter(DataLoader(train_set, batch_size=args.batch)))
    out = {}
    for model_name in args.models:
        steps = {}
        for variant in ("baseline", "l1-mgs-dlc"):
            model, opt, wrapper = build_run(args, model_name, variant, 1.0, args.first_seed, train_set,
                                            10 ** 6, 1)

            def one_step(model=model, opt=opt, wrapper=wrapper):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(batch[0].transpose(1, 2), batch[1]), batch[2]).backward()
                wrapper.step()

            steps[variant] = one_step
        t = step_time(steps, repeats=repeats)
        out[model_name] = {"dense_s": t["baseline"], "l1_s": t["l1-mgs-dlc"], "ratio": t["l1-mgs-dlc"] / t["baseline"]}
        print(f"step time {model_name}: dense {1e3 * t['baseline']:.1f} ms, ℓ1 {1e3 * t['l1-mgs-dlc']:.1f} ms "
              f"(× {out[model_name]['ratio']:.2f})", flush=True)
    return out


def run_lr(r: dict):
    """A run's base learning rate (``None`` for results written before the learning rate was recorded)."""
    return r.get("lr")


def fmt_lr(lr) -> str:
    return "" if lr is None else f"{lr:g}"


def markdown_tables(results: list[dict], speed: dict, seeds: int) -> str:
    note = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    if any(r.get("eval") == "val" for r in results):
        note += "; scored on the validation split held out of the training set, not the test set"
    metrics = {"miou": lambda r: r["final"]["instance_miou"], "acc": lambda r: r["final"]["accuracy"],
               "seconds": lambda r: r["seconds"], "l1": lambda r: r["l1_layers"]}
    summary = summarize(results, lambda r: (r["model"], r["variant"], r["ratio"], run_lr(r)), metrics)
    lines = [f"Variants, fully converted ℓ1 networks ({note}):", "",
             "| Model | Variant | MGS | DLC | ℓ1 layers | Instance mIoU | Accuracy | Time per run (s) | lr |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (model, variant, ratio, lr), s in summary.items():
        if ratio == 1.0:
            mgs, dlc = ("✓" if "mgs" in variant else "", "✓" if "dlc" in variant else "")
            lines.append(f"| {model} | {variant} | {mgs} | {dlc} | {s['l1'][0]} | {mean_std(s['miou'])} | "
                         f"{mean_std(s['acc'])} | {statistics.mean(s['seconds']):.0f} | {fmt_lr(lr)} |")
    ratios = sorted((k for k in summary if k[1] == "l1-mgs-dlc"
                     and any(o[0] == k[0] and o[2] < 1 for o in summary if o[1] == "l1-mgs-dlc")),
                    key=lambda k: (k[0], k[2], k[3] or 0.0))
    if ratios:
        lines += ["", f"Replacement ratio (ℓ1 + MGS + DLC, {note}):", "",
                  "| Model | Ratio | ℓ1 layers | Instance mIoU | Accuracy | lr |", "|---|---|---|---|---|---|"]
        for key in ratios:
            s = summary[key]
            lines.append(f"| {key[0]} | {key[2]:.2f} | {s['l1'][0]} | {mean_std(s['miou'])} | {mean_std(s['acc'])} "
                         f"| {fmt_lr(key[3])} |")
    lines += lr_selection_lines(results) + gap_lines(results)
    if speed:
        lines += ["", "Training-step time (forward + backward + step, median, side by side):", "",
                  "| Model | Dense (ms) | ℓ1 + MGS + DLC (ms) | ℓ1 ÷ dense |", "|---|---|---|---|"]
        for model, t in speed.items():
            lines.append(f"| {model} | {1e3 * t['dense_s']:.1f} | {1e3 * t['l1_s']:.1f} | {t['ratio']:.2f} |")
    return "\n".join(lines)


def config_key(r: dict) -> tuple:
    """What a learning rate is chosen for: (model, variant, ratio)."""
    return r["model"], r["variant"], round(r["ratio"], 4)


def lr_selection(results: list[dict]) -> dict:
    """``{(model, variant, ratio): {"best": lr, "scores": {lr: [final mIoU per seed]}}}`` over ``results``.

    The rule, the same for every variant: the learning rate with the best mean final mIoU (a diverged run
    scores worst; ties to the smaller learning rate). Meant for validation-split results only.
    """
    return select_best(results, config_key, run_lr, lambda r: r["final"]["instance_miou"] if r["finite"]
                       else float("nan"))


def lr_selection_lines(results: list[dict]) -> list[str]:
    """The learning-rate grid as a table (only where some configuration ran at more than one learning rate)."""
    runs = [r for r in results if run_lr(r) is not None]
    chosen = {k: v for k, v in lr_selection(runs).items() if len(v["scores"]) > 1}
    if not chosen:
        return []
    grid = sorted({lr for v in chosen.values() for lr in v["scores"]})
    where = "validation split" if all(r.get("eval") == "val" for r in runs) else "TEST SET (not for selection)"
    lines = ["", f"Learning-rate grid (final instance mIoU on the {where}; mean ± std over seeds; "
             "chosen: the best mean, diverged runs worst):", "",
             "| Model | Variant | Ratio | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen lr |",
             "|---|---|---|" + "---|" * (len(grid) + 1)]
    for (model, variant, ratio), v in chosen.items():
        cells = [mean_std(v["scores"][lr]) if lr in v["scores"] else "" for lr in grid]
        lines.append(f"| {model} | {variant} | {ratio:.2f} | " + " | ".join(cells) + f" | {v['best']:g} |")
    return lines


def paired_gaps(results: list[dict]) -> dict:
    """``{(model, steps, variant, ratio, lr): {seed: [gap per epoch]}}``: ℓ1 mIoU − its seed's baseline mIoU.

    Pairs a run with the baseline of the same model, budget (steps), seed and evaluation set; only where
    that baseline is unique (one learning rate), so a gap is never taken against a hand-picked baseline.
    """
    base: dict = {}
    for r in results:
        if r["variant"] == "baseline":
            base.setdefault((r["model"], r["steps"], r["seed"], r.get("eval", "test")), []).append(r)
    out: dict = {}
    for r in results:
        b = base.get((r["model"], r["steps"], r["seed"], r.get("eval", "test")), [])
        if r["variant"] == "baseline" or len(b) != 1:
            continue
        gap = [x - y for x, y in zip(r["history"]["test_miou"], b[0]["history"]["test_miou"])]
        out.setdefault((r["model"], r["steps"], r["variant"], round(r["ratio"], 4), run_lr(r)), {})[r["seed"]] = gap
    return out


def gap_order(item) -> tuple:
    """Sort key of a ``paired_gaps`` item: model, steps (as numbers), variant, ratio, lr (``None`` first)."""
    (model, steps, variant, ratio, lr), _ = item
    return model, steps, variant, ratio, -1.0 if lr is None else lr


def gap_lines(results: list[dict]) -> list[str]:
    gaps = paired_gaps(results)
    if not gaps:
        return []
    lines = ["", "Gap to the baseline of the same seed (final ℓ1 mIoU − baseline mIoU; mean ± std over seeds):", "",
             "| Model | Steps | Variant | Ratio | lr | n | Gap | per seed |", "|---|---|---|---|---|---|---|---|"]
    for (model, steps, variant, ratio, lr), by_seed in sorted(gaps.items(), key=gap_order):
        finals = [by_seed[sd][-1] for sd in sorted(by_seed)]
        lines.append(f"| {model} | {steps} | {variant} | {ratio:.2f} | {fmt_lr(lr)} | {len(finals)} | "
                     f"{mean_std(finals)} | {', '.join(f'{g:+.1f}' for g in finals)} |")
    return lines


def plot_gap_curves(results: list[dict], out: Path) -> list[Path]:
    """``gap_<model>.png``: ℓ1 − baseline test mIoU (paired by seed) against the training step, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = paired_gaps([r for r in results if r["ratio"] == 1.0])
    paths = []
    for model_name in dict.fromkeys(k[0] for k in gaps):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (model, steps, variant, _, lr), by_seed in sorted(gaps.items(), key=gap_order):
            if model != model_name:
                continue
            curves = list(by_seed.values())
            n = min(map(len, curves))
            x = [(i + 1) * steps / n for i in range(n)]
            mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
            line, = ax.plot(x, mean, marker=".", label=f"{variant}, {steps} steps" +
                            (f", lr {lr:g}" if lr is not None else "") + f" (n={len(curves)})")
            if len(curves) > 1:
                std = [statistics.stdev(c[i] for c in curves) for i in range(n)]
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(-2, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{model_name}: ℓ1 − baseline mIoU, paired by seed (mean ± std)", xlabel="training step",
               ylabel="gap (mIoU points)")
        paths.append(_save_figure(fig, ax, out / f"gap_{model_name}.png"))
    return paths


def curve_label(r: dict) -> str:
    return r["variant"] + (f" (ratio {r['ratio']:.2f})" if r["ratio"] < 1 else "")


def _save_figure(fig, ax, path: Path) -> Path:
    """Legend, layout, write ``path`` (PNG) and free the figure."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_budget_curves(results: list[dict], out: Path) -> list[Path]:
    """``budget_<model>.png``: test mIoU against training steps, one line per (variant, budget), mean over seeds.

    Only for models run at more than one budget (number of steps); each run's schedules span its own budget,
    so a longer run's curve at step s is not a shorter run stopped at s.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    full = [r for r in results if r["ratio"] == 1.0]
    for model_name in dict.fromkeys(r["model"] for r in full):
        runs = [r for r in full if r["model"] == model_name]
        if len({r["steps"] for r in runs}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups: dict = {}
        for r in runs:
            groups.setdefault((r["variant"], r["steps"]), []).append(r)
        for (variant, steps), rs in sorted(groups.items()):
            per_epoch = steps / len(rs[0]["history"]["epoch"])
            x = [e * per_epoch for e in rs[0]["history"]["epoch"]]
            y = [statistics.mean(r["history"]["test_miou"][i] for r in rs) for i in range(len(x))]
            ax.plot(x, y, marker=".", label=f"{variant}, {steps} steps (n={len(rs)})")
        ax.set(title=f"{model_name}: test instance mIoU vs budget", xlabel="training step", ylabel="mIoU (%)")
        paths.append(_save_figure(fig, ax, out / f"budget_{model_name}.png"))
    return paths


def load_results(spec: str) -> tuple[list[dict], dict]:
    """Results and step times of earlier runs, from a comma list of results.json files or folders."""
    results, speed = [], {}
    for item in (x for x in spec.split(",") if x):
        path = Path(item) / "results.json" if Path(item).is_dir() else Path(item)
        saved = json.loads(path.read_text())
        results += saved["results"]
        speed.update(saved.get("speed") or {})
    return results, speed


def write_outputs(args, argv, out: Path, results: list[dict], speed: dict, t0: float, plots: bool) -> str:
    seeds = len({r["seed"] for r in results}) if results else 0
    tables = markdown_tables([r for r in results if r["steps"] == min(x["steps"] for x in results)] if results
                             else results, speed, seeds)
    budgets = sorted({r["steps"] for r in results})
    if len(budgets) > 1:  # the longer budgets as their own table
        longer = [r for r in results if r["steps"] != budgets[0]]
        tables += f"\n\nLonger budgets ({', '.join(map(str, budgets[1:]))} steps):\n\n" + \
            markdown_tables(longer, {}, len({r['seed'] for r in longer}))
    command = "python examples/part_segmentation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    total = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps({"command": command, "speed": speed, "seconds": total,
                                                  "results": results}, indent=1))
    (out / "results.md").write_text(f"Command: `{command.strip()}`\n\n{tables}\n\nTotal {total:.0f} s.\n")
    if plots and results:
        short = [r for r in results if r["steps"] == budgets[0]]
        several = len({run_lr(r) for r in short}) > 1
        label = (lambda r: f"{curve_label(r)}, lr {fmt_lr(run_lr(r))}") if several else curve_label
        for path in plot_curves(short, out, "test_miou", "instance mIoU", label=label) + \
                plot_budget_curves(results, out) + plot_gap_curves(results, out):
            print(f"wrote {path}")
    return tables


def lr_note(args, chosen) -> str:
    """The base learning rate(s) of this invocation, for the log."""
    if chosen is not None:
        return "chosen per configuration (--lr-from)"
    return ", ".join(f"{lr:g}" for lr in args.lrs)


def split_validation(train_set: PartSegmentationData, count: int, seed: int = 0):
    """``(train, val)``: ``count`` shapes held out of ``train_set``, category-balanced, the same split every run.

    The split's seed is fixed (not the run's ``--seeds``), so every variant and seed is tuned on the same shapes.
    """
    keep, held = stratified_split(train_set.categories, count, seed)

    def subset(idx):
        return PartSegmentationData(train_set.points[idx], train_set.labels[idx], train_set.categories[idx],
                                    train_set.classes)

    return subset(keep), subset(held)


def usage_exit(message: str):
    """A user error found after parsing: one line on stderr, exit 2 (as argparse's errors)."""
    print(f"part_segmentation.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def chosen_lrs(args) -> dict:
    """``{(model, variant, ratio): lr}`` selected from the ``--lr-from`` results (validation runs only)."""
    try:
        results, _ = load_results(args.lr_from)
    except (OSError, ValueError, KeyError, TypeError) as e:
        usage_exit(f"--lr-from {args.lr_from}: cannot read the results there ({e})")
    if not all(isinstance(r, dict) for r in results):
        usage_exit(f"--lr-from {args.lr_from}: cannot read the results there (not a list of runs)")
    if any(r.get("eval") != "val" for r in results):
        usage_exit(f"--lr-from {args.lr_from}: every run there must be a validation run (--val); a learning "
                   "rate is never chosen on the test set")
    unit = getattr(args, "ratio_unit", "unit")
    other_unit = sorted({r.get("ratio_unit") for r in results if r.get("ratio", 1.0) < 1} - {unit, None})
    if other_unit:  # a ratio counted in other units is another model
        usage_exit(f"--lr-from {args.lr_from}: its ratio runs count {', '.join(other_unit)}, this run counts "
                   f"{unit}s (--ratio-unit): choose learning rates from runs of the same models")
    budgets: dict = {}
    for r in results:
        budgets.setdefault(config_key(r), set()).add(r.get("steps"))
    mixed = sorted(k for k, v in budgets.items() if len(v) > 1)
    if mixed:  # one mean over several budgets would choose for none of them
        usage_exit(f"--lr-from {args.lr_from}: runs of different budgets (steps) for {', '.join(map(str, mixed))}; "
                   "keep one budget per folder")
    chosen = {k: v["best"] for k, v in lr_selection(results).items()}
    wanted = {(m, v, 1.0) for m in args.models for v in args.variants} | \
        {(m, "l1-mgs-dlc", round(r, 4)) for m in args.models if m in args.ratio_models for r in args.ratios}
    missing = sorted(wanted - set(chosen))
    if missing:
        usage_exit(f"--lr-from {args.lr_from}: no validation runs for {', '.join(map(str, missing))}; "
                   "run them with --val --lr-grid first")
    for key in sorted(wanted):
        print(f"lr for {key[0]} {key[1]} ratio {key[2]:.2f}: {chosen[key]:g} (best mean validation mIoU)")
    return chosen


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)  # no global state changed behind a caller's back


def _main(args, argv) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress_factory(args.no_progress)
    t0 = time.perf_counter()
    if args.from_results:
        try:
            results, speed = load_results(args.from_results)
        except (OSError, ValueError, KeyError, TypeError) as e:
            usage_exit(f"--from-results {args.from_results}: cannot read the results there ({e})")
        print(write_outputs(args, argv, out, results, speed, t0, not args.no_plots))
        return results
    train_set, test_set = make_part_segmentation(args.train, args.test, args.points, seed=0)
    eval_set = "test"
    if args.val:  # score on shapes held out of the training set; the test set stays unseen
        train_set, test_set = split_validation(train_set, args.val)
        eval_set = "val"
    chosen = chosen_lrs(args) if args.lr_from else None
    print(f"data: {len(train_set)} train / {len(test_set)} {eval_set} shapes, {args.points} points, "
          f"{train_set.num_categories} categories, {train_set.num_parts} parts; {args.epochs} epochs, "
          f"batch {args.batch}; {args.optimizer} lr {lr_note(args, chosen)} wd {args.weight_decay}; recipe {args.recipe}; "
          f"converter: {'l1fx.convert' if _convert else 'module swap (l1fx.convert missing)'}, ℓ1 init: {args.init}",
          flush=True)
    speed = measure_speed(args, train_set, args.speed_repeats) if args.speed_repeats > 0 else {}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = [(m, v, 1.0, s) for m in args.models for s in seeds for v in args.variants]
    # the ratio runs do not depend on --variants: "--variants '' --ratios ..." runs only them
    runs += [(m, "l1-mgs-dlc", r, s) for m in args.models if m in args.ratio_models for s in seeds
             for r in args.ratios]
    if chosen is not None:
        runs = [(m, v, r, s, chosen[(m, v, round(r, 4))]) for m, v, r, s in runs]
    else:
        runs = [(m, v, r, s, lr) for m, v, r, s in runs for lr in args.lrs]
    results = []
    for i, (m, v, r, s, lr) in enumerate(runs):
        results.append(train_one(args, m, v, r, s, train_set, test_set, progress, lr=lr, eval_set=eval_set))
        if i + 1 < len(runs):  # partial results after every run: a stopped study keeps what it did
            write_outputs(args, argv, out, results, speed, t0, plots=False)
    print("\n" + write_outputs(args, argv, out, results, speed, t0, not args.no_plots))
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
