"""ℓp norms: the paper's Table 1 / Figure 3 by simulation, and a p ∈ {1, 2, inf} ablation.

1. Spread of ``||G||_p`` for ``G ~ N(0, I_9)`` (the paper's Table 1 and Figure 3,
   "Rethinking 3D Convolution in ℓp-norm Space"): mean, variance and density for
   p = 1 ... 9 and inf, by Monte Carlo, checked against the closed forms where
   they exist: p = 1 (variance ``d (1 - 2/pi)``, mean ``d sqrt(2/pi)``),
   p = 2 (the chi distribution with 9 degrees of freedom: mean, variance and
   density) and p = inf (the max of 9 half-normals: density
   ``9 * 2 phi(x) * (2 Phi(x) - 1)^8``, mean and variance by quadrature). A
   simulated value farther than 5 standard errors from its closed form fails
   the run (exit 1). Writes ``table1.md`` and ``figure3.png`` to ``--out``.
2. ``--ablation``: PointNet on the generated part-segmentation task
   (:func:`l1fx.data.make_part_segmentation`; ``--preset quick`` (default) or ``medium``)
   converted with ``l1fx.convert(model, p=p)`` for p = 1, 2, inf and trained
   with MGS + DLC (:mod:`l1fx.train`), ``--seeds`` seeds; instance mIoU and
   accuracy as mean ± std. Writes ``ablation.md`` / ``ablation.json``.

    python examples/lp_norms.py --out out/lp_norms                 # table + figure (seconds)
    python examples/lp_norms.py --out out/lp_norms --ablation      # + the ablation (minutes)
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

D = 9  # the paper's 3x3 kernel: a 9-dimensional Gaussian
PS = [1, 2, 3, 4, 5, 6, 7, 8, 9, math.inf]


def _p(p) -> str:
    return "inf" if math.isinf(p) else f"{p:g}"


# ---------------------------------------------------------------- closed forms
def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def chi_pdf(x: torch.Tensor, k: int = D) -> torch.Tensor:
    return x.pow(k - 1) * torch.exp(-0.5 * x * x) / (2 ** (k / 2 - 1) * math.gamma(k / 2))


def max_abs_pdf(x: torch.Tensor, k: int = D) -> torch.Tensor:
    """Density of ``max_i |G_i|``: k f(x) F(x)^(k-1) with the half-normal f = 2 phi, F = 2 Phi - 1."""
    return k * 2 * _phi(x) * (2 * _Phi(x) - 1).pow(k - 1)


def closed_forms() -> dict:
    """{p: (mean, variance)} where a closed form (or an exact 1-d quadrature) exists."""
    out = {1: (D * math.sqrt(2 / math.pi), D * (1 - 2 / math.pi))}
    mean2 = math.sqrt(2) * math.gamma((D + 1) / 2) / math.gamma(D / 2)
    out[2] = (mean2, D - mean2 ** 2)
    x = torch.linspace(0, 12, 200001, dtype=torch.float64)
    f = max_abs_pdf(x)
    m1 = torch.trapezoid(x * f, x).item()
    m2 = torch.trapezoid(x * x * f, x).item()
    out[math.inf] = (m1, m2 - m1 ** 2)
    return out


# ---------------------------------------------------------------- part 1: Table 1 / Figure 3
def simulate(samples: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(samples, D, generator=gen, dtype=torch.float64).abs()
    norms = {}
    for p in PS:
        norms[p] = g.amax(-1) if math.isinf(p) else g.pow(p).sum(-1).pow(1.0 / p)
    return norms


def table(norms: dict) -> tuple[str, list[str]]:
    """Markdown table and the list of failed closed-form checks (> 5 standard errors off)."""
    exact = closed_forms()
    n = next(iter(norms.values())).numel()
    rows = ["| p | mean | variance | std / mean | closed form (mean, variance) | check |", "|---|---|---|---|---|---|"]
    failed = []
    for p, r in norms.items():
        mean, var = r.mean().item(), r.var().item()
        cell, check = "-", "-"
        if p in exact:
            em, ev = exact[p]
            se_mean = math.sqrt(var / n)
            se_var = math.sqrt(((r - mean) ** 4).mean().item() / n - var ** 2 / n)  # SE of the sample variance
            z = max(abs(mean - em) / se_mean, abs(var - ev) / se_var)
            cell = f"{em:.4f}, {ev:.4f}"
            check = f"ok ({z:.1f} SE)" if z <= 5 else f"FAILED ({z:.1f} SE)"
            if z > 5:
                failed.append(f"p={_p(p)}: simulated mean {mean:.4f}, variance {var:.4f} vs {em:.4f}, {ev:.4f}")
        rows.append(f"| {_p(p)} | {mean:.4f} | {var:.4f} | {math.sqrt(var) / mean:.4f} | {cell} | {check} |")
    return "\n".join(rows), failed


def figure(norms: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for p, r in norms.items():
        hist, edges = torch.histogram(r, bins=120, range=(0.0, 12.0), density=True)
        centers = 0.5 * (edges[1:] + edges[:-1])
        ax.plot(centers, hist, label=f"p={_p(p)}", lw=1.2)
    x = torch.linspace(0.01, 12, 600, dtype=torch.float64)
    ax.plot(x, chi_pdf(x), "k--", lw=1, label="chi(9) (p=2, closed form)")
    ax.plot(x, max_abs_pdf(x), "k:", lw=1, label="max |G_i| (p=inf, closed form)")
    ax.set_xlabel(r"$\|G\|_p$, $G \sim N(0, I_9)$")
    ax.set_ylabel("density")
    ax.set_xlim(0, 12)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Figure 3: density of the p-norm of a 9-d Gaussian")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- part 2: the ablation
# "quick": part_segmentation.py's quick sizes (a smoke run); "medium": its full data, the default PointNet,
# half its epochs (about a minute per run on one busy core).
PRESETS = {
    "quick": dict(train=64, test=32, points=256, batch=16, epochs=2, model=dict(encoder=(16, 32, 64), head=(64, 32))),
    "medium": dict(train=192, test=96, points=256, batch=16, epochs=12, model=dict()),
}


def train_run(p: float, seed: int, data, cfg: dict, lr: float, eta: float) -> dict:
    import l1fx
    from l1fx.data import part_segmentation_metrics
    from l1fx.models import build_model
    from l1fx.train import DLC, MGS, TrainingWrapper

    train_set, test_set = data
    torch.manual_seed(seed)
    model = build_model("pointnet", train_set.num_parts, train_set.num_categories, **cfg["model"])
    pts, cat, _ = next(iter(DataLoader(train_set, batch_size=cfg["batch"])))
    model = l1fx.convert(model, p=p, init="data", example_inputs=(pts.transpose(1, 2), cat))
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=cfg["batch"], shuffle=True, drop_last=True, generator=g)
    total = cfg["epochs"] * len(loader)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    wrapper = TrainingWrapper(model, opt, total, mgs=MGS(), dlc=DLC(eta=eta))
    t0 = time.perf_counter()
    losses = []
    for _ in range(cfg["epochs"]):
        for pts, cat, lab in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(pts.transpose(1, 2), cat), lab)
            loss.backward()
            wrapper.step()
            losses.append(loss.item())
    model.eval()
    logits, labels, cats = [], [], []
    with torch.no_grad():
        for pts, cat, lab in DataLoader(test_set, batch_size=64):
            logits.append(model(pts.transpose(1, 2), cat))
            labels.append(lab)
            cats.append(cat)
    s = part_segmentation_metrics(torch.cat(logits), torch.cat(labels), torch.cat(cats), train_set.classes)
    return {"p": _p(p), "seed": seed, "instance_miou": s.instance_miou, "accuracy": s.accuracy,
            "final_loss": losses[-1], "finite": all(math.isfinite(v) for v in losses),
            "seconds": time.perf_counter() - t0, "steps": total}


def ablation(args) -> tuple[str, list[dict]]:
    from l1fx.data import make_part_segmentation

    cfg = dict(PRESETS[args.preset])
    for key in ("train", "test", "points", "batch", "epochs"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    data = make_part_segmentation(cfg["train"], cfg["test"], cfg["points"], seed=0)
    runs = []
    for p in (1.0, 2.0, math.inf):
        for seed in range(args.seeds):
            r = train_run(p, seed, data, cfg, args.lr, args.eta)
            print(f"p={r['p']:>3} seed {seed}: mIoU {r['instance_miou']:6.2f}  acc {r['accuracy']:6.2f}  "
                  f"({r['seconds']:.0f} s)", flush=True)
            runs.append(r)
    rows = [f"PointNet, {cfg['train']} train / {cfg['test']} test shapes, {cfg['points']} points, "
            f"{cfg['epochs']} epochs, batch {cfg['batch']} (preset {args.preset}), every layer ℓp (`l1fx.convert(p=p, init='data')`), "
            f"MGS + DLC (eta {args.eta}), SGD lr {args.lr}; {args.seeds} seeds (mean ± std)", "",
            "| p | instance mIoU | accuracy | s / run |", "|---|---|---|---|"]
    for p in ("1", "2", "inf"):
        mine = [r for r in runs if r["p"] == p]
        miou = [r["instance_miou"] for r in mine]
        acc = [r["accuracy"] for r in mine]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        rows.append(f"| {p} | {statistics.mean(miou):.2f} ± {sd(miou):.2f} | {statistics.mean(acc):.2f} ± "
                    f"{sd(acc):.2f} | {statistics.mean(r['seconds'] for r in mine):.0f} |")
    return "\n".join(rows), runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/lp_norms", help="directory for table1.md, figure3.png, ablation.*")
    ap.add_argument("--samples", type=int, default=400_000, help="Monte Carlo samples of G")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--ablation", action="store_true", help="also train the p in {1, 2, inf} ablation")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="ablation sizes (default quick)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--train", type=int)
    ap.add_argument("--test", type=int)
    ap.add_argument("--points", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eta", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.samples < 1000 or args.seeds < 1:
        ap.error("--samples must be >= 1000 and --seeds >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    norms = simulate(args.samples, args.seed)
    text, failed = table(norms)
    head = f"Table 1: ||G||_p for G ~ N(0, I_{D}), {args.samples} samples (seed {args.seed})"
    print(head + "\n\n" + text)
    (out / "table1.md").write_text(head + "\n\n" + text + "\n")
    if not args.no_plot:
        figure(norms, out / "figure3.png")
        print(f"wrote {out / 'figure3.png'}")
    if args.ablation:
        md, runs = ablation(args)
        print("\n" + md)
        (out / "ablation.md").write_text(md + "\n")
        (out / "ablation.json").write_text(json.dumps(runs, indent=1))
    for f in failed:
        print(f"closed-form check failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
