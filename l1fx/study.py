"""Shared scaffolding of the training studies in ``examples/`` (part and scene segmentation).

One place for what every study does the same way: the variants of the paper's ablation and their
MGS / DLC schedules (:func:`schedules`), the optimizer (:func:`make_optimizer`), seeds, mean ± std
tables (:func:`mean_std`, :func:`summarize`), learning-curve figures (:func:`plot_curves`), progress
bars and the step-time measurement (:func:`step_time`). A study supplies its data, models and
metrics.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from .train import DLC, MGS

__all__ = ["VARIANTS", "RECIPES", "OPTIMIZERS", "schedules", "make_optimizer", "mean_std", "summarize",
           "plot_curves", "progress_factory", "step_time", "stratified_split", "select_best"]

# The paper's ablation (S3DIS Table 6 structure): baseline and four ℓ1 variants.
VARIANTS = ("baseline", "l1-vanilla", "l1-mgs", "l1-dlc", "l1-mgs-dlc")

# How the variants are scheduled (docs/training.md, "Presets"):
# - "default": today's library defaults; MGS() cosine 1 -> 0, DLC(eta) with its own hold + cosine + drops
#   learning-rate schedule for the DLC variants, a plain cosine for the others (the recipe of the
#   earlier RESULTS.md runs);
# - "cosine": MGS() and DLC's per-layer scaling, and one plain cosine learning-rate schedule for every
#   variant, the baseline included (the only difference between variants is then what they switch on);
# - "paper": as "cosine", with the paper's MGS blend lam**k (MGS.paper) instead of the cosine blend.
RECIPES = ("default", "cosine", "paper")
OPTIMIZERS = {"sgd": 0.05, "adamw": 1e-3}  # name -> default base learning rate (AdamW: the paper's 1e-3)


def schedules(variant: str, eta: float = 0.2, recipe: str = "default", *, mgs_lam: float = 0.99,
              mgs_unit: str = "step", steps_per_epoch: Optional[int] = None) -> tuple:
    """``(mgs, dlc)`` for ``TrainingWrapper`` of ``variant`` under ``recipe``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    plain = DLC(scale_gradients=False, hold=0.0, drops=())  # a plain cosine from 1 to 0, no scaling
    if recipe == "paper":
        blend = MGS.paper(mgs_lam, mgs_unit, steps_per_epoch if mgs_unit == "epoch" else None)
    else:
        blend = MGS()
    scaled = DLC(eta=eta) if recipe == "default" else DLC.paper(eta=eta)
    mgs = None if variant == "baseline" else blend if "mgs" in variant else MGS.constant(0.0)
    dlc = scaled if "dlc" in variant else plain
    return mgs, dlc


def make_optimizer(params, name: str, lr: Optional[float] = None, weight_decay: float = 1e-4):
    """SGD (momentum 0.9) or AdamW, the same for every variant of a study."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    lr = OPTIMIZERS[name] if lr is None else lr
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def stratified_split(groups: torch.Tensor, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, held_out)`` index tensors: ``count`` items held out, as evenly over ``groups`` as possible.

    ``groups[i]`` is item i's group (e.g. its shape category). Each group's items are shuffled by a
    generator of their own (``seed``; the global RNG is not touched), then the groups give one item each in
    turn until ``count`` are held out, so a validation split has the category balance of the set it comes
    from. Both index tensors are sorted.
    """
    groups = torch.as_tensor(groups).flatten()
    if not 0 < count < len(groups):
        raise ValueError(f"a held-out split needs 0 < count < {len(groups)} items, got {count}")
    g = torch.Generator().manual_seed(seed)
    queues = [idx[torch.randperm(len(idx), generator=g)].tolist()
              for idx in (torch.nonzero(groups == v).flatten() for v in torch.unique(groups))]
    held: list[int] = []
    while len(held) < count:
        for q in queues:
            if q and len(held) < count:
                held.append(q.pop())
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[held] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def select_best(results: Iterable[dict], key: Callable[[dict], tuple], param: Callable[[dict], float],
                score: Callable[[dict], float]) -> dict:
    """Per ``key(r)``: the ``param`` value (e.g. the learning rate) with the best mean ``score`` over its runs.

    Returns ``{key: {"best": value, "scores": {value: [scores]}}}``. A run whose score is not finite
    counts as the worst possible (a diverged run must never win); ties go to the smaller value, so the
    choice does not depend on the order the runs came in.
    """
    table: dict = {}
    for r in results:
        table.setdefault(key(r), {}).setdefault(param(r), []).append(score(r))

    def merit(values: list) -> float:
        return statistics.mean(values) if finite(values) else -math.inf

    return {k: {"best": min(by, key=lambda v: (-merit(by[v]), v)), "scores": dict(sorted(by.items()))}
            for k, by in table.items()}


def mean_std(values: Sequence[float]) -> str:
    """``"m ± s"`` (sample std) over seeds; a single value as it is."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(results: Iterable[dict], key: Callable[[dict], tuple], metrics: dict) -> dict:
    """``{key(r): {name: [values over seeds]}}``; ``metrics`` maps a name to ``r -> value``."""
    out: dict = {}
    for r in results:
        entry = out.setdefault(key(r), {name: [] for name in metrics})
        for name, get in metrics.items():
            entry[name].append(get(r))
    return out


def plot_curves(results: Sequence[dict], out: Path, metric: str, metric_label: str,
                label: Callable[[dict], str] = lambda r: r["variant"]) -> list[Path]:
    """``curves_<model>.png``: training loss and ``history[metric]`` per epoch, mean over seeds (± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model_name in dict.fromkeys(r["model"] for r in results):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        runs_of: dict = {}
        for r in results:
            if r["model"] == model_name:
                runs_of.setdefault(label(r), []).append(r["history"])
        for name, runs in runs_of.items():
            epochs = min((h["epoch"] for h in runs), key=len)
            for key, ax in (("train_loss", axes[0]), (metric, axes[1])):
                rows = [[h[key][i] for h in runs] for i in range(len(epochs))]
                mean = [statistics.mean(v) for v in rows]
                line, = ax.plot(epochs, mean, marker=".", label=f"{name} (n={len(runs)})")
                if len(runs) > 1:
                    std = [statistics.stdev(v) for v in rows]
                    ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=line.get_color(), alpha=0.15)
        axes[0].set(title=f"{model_name}: training loss (mean over seeds)", xlabel="epoch", ylabel="cross-entropy")
        axes[1].set(title=f"{model_name}: test {metric_label} (mean ± std)", xlabel="epoch",
                    ylabel=f"{metric_label} (%)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = Path(out) / f"curves_{model_name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def progress_factory(disabled: bool):
    """tqdm, or a stand-in with the same three methods when bars are off."""
    if not disabled:
        from tqdm.auto import tqdm

        return tqdm

    class _NoBar:
        def update(self, n=1): pass
        def set_postfix(self, **kw): pass
        def close(self): pass

    return lambda **kw: _NoBar()


def step_time(steps: dict, repeats: int = 5, warmup: int = 2) -> dict:
    """Median seconds of each named training step, measured side by side.

    ``steps`` maps a name to a callable doing one whole training step (forward, backward, optimizer).
    The callables run interleaved (a, b, a, b, ...) so that a change of machine load hits all of them
    alike; compare the results as ratios.
    """
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)
