"""Part segmentation on generated shapes: inner product vs ℓ1 vanilla vs ℓ1 + MGS + DLC.

Reproduces the structure of the paper's part-segmentation experiments
("Rethinking 3D Convolution in ℓp-norm Space", NeurIPS 2024) on data that
needs no download (:func:`l1fx.data.make_part_segmentation`):

* PointNet, PointNet++ (SSG) and a voxel 3D CNN, each trained as
  - ``baseline``: the inner-product network;
  - ``l1-vanilla``: every layer converted to ℓ1, exact ℓ1 gradients (mix 0), no DLC;
  - ``l1-mgs-dlc``: every layer converted, MGS (mix 1 -> 0, cosine) and DLC;
* the replacement-ratio ablation for PointNet++ (1/3, 2/3 and 1 of the layers
  converted, earliest first, trained with MGS + DLC).

The ℓ1 variants convert with ``l1fx.convert(model, ratio, init=--init)``;
the default ``--init data`` sets the ℓ1 templates from the statistics of each
layer's inputs on the first training batch (docs/convert.md), ``--init dense``
keeps the dense init, a number multiplies it.

All variants share the data, the initial weights (``seed``), the optimizer
(SGD, momentum 0.9) and the base learning rate; the baseline and vanilla use a
plain cosine schedule, MGS + DLC uses the DLC schedule. Prints tables of
instance mIoU, class mIoU and point accuracy, writes ``results.json``,
``results.md`` and training-curve PNGs to ``--out``.

    python examples/part_segmentation.py --quick        # smoke run, < 2 min on 2 cores
    python examples/part_segmentation.py                # the full preset; examples/RESULTS.md has the runs
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from l1fx._cli import init_type
from l1fx.data import make_part_segmentation, part_segmentation_metrics
from l1fx.models import build_model
from l1fx.train import DLC, MGS, TrainingWrapper

try:  # the product's converter; a module swap stands in while it is not installed
    from l1fx.convert import convert as _convert
except ImportError:  # pragma: no cover - depends on the checkout
    _convert = None

VARIANTS = ("baseline", "l1-vanilla", "l1-mgs-dlc")
MODEL_NAMES = ("pointnet", "pointnet2", "voxelcnn")

# Sizes: "quick" is a smoke test of the whole pipeline; "full" is sized for ~25 min on 2 busy CPU cores.
PRESETS = {
    "quick": dict(train=64, test=32, points=256, batch=16, epochs=2, models={
        "pointnet": dict(encoder=(16, 32, 64), head=(64, 32)),
        "pointnet2": dict(npoint=(64, 16), nsample=(8, 8), sa_mlps=((16, 16, 32), (32, 32, 64), (64, 128)),
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
                   help="PointNet++ replacement ratios besides 1 (MGS + DLC); empty string to skip")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--train", type=int, help="number of training shapes")
    p.add_argument("--test", type=int, help="number of test shapes")
    p.add_argument("--points", type=int, help="points per shape")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--lr", type=float, default=0.05, help="base learning rate (SGD, momentum 0.9)")
    p.add_argument("--eta", type=float, default=0.2, help="DLC eta")
    p.add_argument("--init", default="data", type=init_type,
                   help="initial ℓ1 weights, l1fx.convert(init=...): 'data' (templates at the scale of each "
                        "layer's inputs on the first training batch; default), 'dense' (keep the dense init) or "
                        "a factor multiplying the dense init (e.g. 10); see examples/RESULTS.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="out/part_segmentation", help="directory for results and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key in ("epochs", "train", "test", "points", "batch"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.model_kwargs = preset["models"]
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    for m in args.models:
        if m not in MODEL_NAMES:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODEL_NAMES)}")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return args


def to_l1(model: nn.Module, ratio: float, init="dense", example_inputs=None) -> nn.Module:
    """``l1fx.convert(model, ratio, init=init)``; without it, a module swap of the first ``ratio`` of the layers."""
    if _convert is not None:
        return _convert(model, ratio=ratio, init=init, example_inputs=example_inputs if init == "data" else None)
    if init != "dense":
        raise RuntimeError(f"--init {init} needs l1fx.convert, which is not installed")
    from l1fx import layers
    from l1fx.nn import L1Module
    from l1fx.passes.select import nearest_count

    def convertible(m: nn.Module) -> bool:  # a dense layer of a registered kind that has an l1 layer
        spec = layers.spec_for_module(m)
        return spec is not None and spec.l1_class is not None and not isinstance(m, L1Module)

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


def build_run(args, model_name: str, variant: str, ratio: float, data, total_steps: int):
    torch.manual_seed(args.seed)  # identical initial weights for every variant of a model
    model = build_model(model_name, data.num_parts, data.num_categories, **args.model_kwargs[model_name])
    if variant != "baseline":
        model = to_l1(model, ratio, args.init, init_batch(data, args.batch) if args.init == "data" else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    plain_cosine = DLC(scale_gradients=False, hold=0.0, drops=())
    if variant == "baseline":
        wrapper = TrainingWrapper(model, opt, total_steps, mgs=None, dlc=plain_cosine)
    elif variant == "l1-vanilla":
        wrapper = TrainingWrapper(model, opt, total_steps, mgs=MGS.constant(0.0), dlc=plain_cosine)
    else:
        wrapper = TrainingWrapper(model, opt, total_steps, mgs=MGS(), dlc=DLC(eta=args.eta))
    return model, opt, wrapper


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, classes) -> dict:
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


def train_one(args, model_name, variant, ratio, train_set, test_set, progress) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True, generator=g)
    test_loader = DataLoader(test_set, batch_size=64)
    total = args.epochs * len(train_loader)
    model, opt, wrapper = build_run(args, model_name, variant, ratio, train_set, total)
    history = {"epoch": [], "train_loss": [], "test_miou": [], "test_acc": []}
    label = f"{model_name} {variant}" + (f" r={ratio:.2f}" if ratio < 1 else "")
    bar = progress(total=total, desc=f"{label:<28}", leave=False)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        running, count = 0.0, 0
        for pts, cat, lab in train_loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(pts.transpose(1, 2), cat), lab)
            loss.backward()
            wrapper.step()
            running, count = running + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", mix=wrapper.mix, refresh=False)
        scores = evaluate(model, test_loader, train_set.classes)
        history["epoch"].append(epoch)
        history["train_loss"].append(running / max(count, 1))
        history["test_miou"].append(scores["instance_miou"])
        history["test_acc"].append(scores["accuracy"])
        if args.no_progress:
            print(f"  {label} epoch {epoch}: train loss {history['train_loss'][-1]:.3f}, "
                  f"test mIoU {scores['instance_miou']:.2f}", flush=True)
    bar.close()
    final = evaluate(model, test_loader, train_set.classes)
    seconds = time.perf_counter() - t0
    print(f"{label:<28} mIoU {final['instance_miou']:6.2f}  acc {final['accuracy']:6.2f}  "
          f"({seconds:.0f} s, {total} steps)", flush=True)
    return {"model": model_name, "variant": variant, "ratio": ratio,
            "init": "-" if variant == "baseline" else str(args.init), "final": final, "history": history,
            "seconds": seconds, "steps": total,
            "l1_layers": len(wrapper.l1_modules), "finite": all(math.isfinite(v) for v in history["train_loss"])}


def markdown_tables(results: list[dict]) -> str:
    def row_of(r):
        f = r["final"]
        return f"{f['instance_miou']:.2f} | {f['class_miou']:.2f} | {f['accuracy']:.2f}"

    lines = ["| Model | Variant | ℓ1 layers | Instance mIoU | Class mIoU | Accuracy | Train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["ratio"] == 1.0:
            lines.append(f"| {r['model']} | {r['variant']} | {r['l1_layers']} | {row_of(r)} | {r['seconds']:.0f} |")
    ablation = [r for r in results if r["model"] == "pointnet2" and r["variant"] == "l1-mgs-dlc"]
    if len(ablation) > 1:
        lines += ["", "PointNet++ replacement ratio (ℓ1 + MGS + DLC):", "",
                  "| Ratio | ℓ1 layers | Instance mIoU | Class mIoU | Accuracy |", "|---|---|---|---|---|"]
        for r in sorted(ablation, key=lambda r: r["ratio"]):
            lines.append(f"| {r['ratio']:.2f} | {r['l1_layers']} | {row_of(r)} |")
    return "\n".join(lines)


def plot_curves(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model_name in dict.fromkeys(r["model"] for r in results):
        runs = [r for r in results if r["model"] == model_name]
        fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 4))
        for r in runs:
            name = r["variant"] + (f" (ratio {r['ratio']:.2f})" if r["ratio"] < 1 else "")
            ax_loss.plot(r["history"]["epoch"], r["history"]["train_loss"], marker="o", label=name)
            ax_miou.plot(r["history"]["epoch"], r["history"]["test_miou"], marker="o", label=name)
        ax_loss.set(title=f"{model_name}: training loss", xlabel="epoch", ylabel="cross-entropy")
        ax_miou.set(title=f"{model_name}: test instance mIoU", xlabel="epoch", ylabel="mIoU (%)")
        ax_miou.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"curves_{model_name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.no_progress:
        from contextlib import nullcontext

        class _NoBar(nullcontext):
            def update(self, n=1): pass
            def set_postfix(self, **kw): pass
            def close(self): pass

        progress = lambda **kw: _NoBar()  # noqa: E731
    else:
        from tqdm.auto import tqdm as progress
    t0 = time.perf_counter()
    train_set, test_set = make_part_segmentation(args.train, args.test, args.points, seed=args.seed)
    print(f"data: {len(train_set)} train / {len(test_set)} test shapes, {args.points} points, "
          f"{train_set.num_categories} categories, {train_set.num_parts} parts; {args.epochs} epochs, "
          f"batch {args.batch}; converter: {'l1fx.convert' if _convert else 'module swap (l1fx.convert missing)'}"
          f", ℓ1 init: {args.init}",
          flush=True)
    runs = [(m, v, 1.0) for m in args.models for v in args.variants]
    if "pointnet2" in args.models and "l1-mgs-dlc" in args.variants:
        runs += [("pointnet2", "l1-mgs-dlc", r) for r in args.ratios if r < 1.0]
    results = [train_one(args, m, v, r, train_set, test_set, progress) for m, v, r in runs]
    tables = markdown_tables(results)
    print("\n" + tables)
    command = "python examples/part_segmentation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    (out / "results.md").write_text(f"Command: `{command.strip()}`\n\n{tables}\n")
    if not args.no_plots:
        for path in plot_curves(results, out):
            print(f"wrote {path}")
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
