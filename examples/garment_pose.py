"""Garment pose estimation (GarmentNets): inner product vs ℓ1 + MGS + DLC, per-category Chamfer distance.

Reproduces the structure of the paper's garment experiment ("Rethinking 3D
Convolution in ℓp-norm Space", NeurIPS 2024, Table 4: GarmentNets vs
ℓ1-GarmentNets) on generated hanging garments (:mod:`l1fx.garments`, no download):

* ``garmentnets``: the inner-product pipeline (:class:`l1fx.models.GarmentNets`: PointNet++
  NOCS regression, or per-axis NOCS bins with ``--nocs-bins K``, features scattered into a NOCS grid, 3D U-Net with ConvTranspose3d
  predicting the winding-number and warp fields);
* ``l1-garmentnets``: the same network converted to ℓ1 (``l1fx.convert``, ratio 1,
  ``init="data"`` on the first training batch), trained with MGS + DLC
  (``l1fx.TrainingWrapper``).

Both share the data, the initial dense weights of a seed, the batch order, the optimizer (AdamW,
weight decay 1e-4, or ``--optimizer sgd``), the base learning rate and the number of steps; the baseline
uses a plain cosine learning rate, the ℓ1 network DLC's schedule. Loss: MSE of the NOCS
coordinates (x10), of the winding number (x20: its target is 0 in most voxels, and an unweighted
field stays below 1/2 everywhere, so no mesh) and of the warp field in metres (x10).

Scored on held-out garments (other instances, other grasps), per category:
  * canonical Chamfer distance (cm): marching cubes of the predicted winding number (level 1/2)
    vs the true canonical mesh, through 2000 surface samples each (``l1fx.metrics``); NOCS
    distances become cm through the category's NOCS cube side;
  * task Chamfer distance (cm): that mesh moved to the world by the predicted warp field vs the
    true hanging mesh (GarmentNets' pose measure);
  * NOCS error (cm): stage one, mean distance of predicted to true canonical coordinates;
  * references: the "grid floor", the same Chamfer distances from the *true* fields (what the grid
    resolution allows at best), and "seen points", the observed points alone as the shape (no
    completion: what a model has to beat).
A predicted field that never crosses 1/2 has no mesh; the observed points then stand in (their
predicted NOCS coordinates, their world positions) and the run counts a "no-mesh" item.
Energy: one forward pass of one garment, ``l1fx.report.compare`` (Horowitz 45 nm, fp32).
Writes ``results.json``, ``results.md``, ``curves.png`` and ``garments.png`` to ``--out``.

    python examples/garment_pose.py --quick       # < 2 min on 2 cores
    python examples/garment_pose.py --seeds 3     # the full preset; examples/RESULTS.md has the runs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import l1fx
from l1fx._cli import init_type
from l1fx.garments import GARMENT_CATEGORIES, YAW_JITTER, collate, generate_garments
from l1fx.metrics import chamfer_distance, nocs_error, sample_surface
from l1fx.models import GarmentNets, extract_mesh, warp_points
from l1fx.models_garment import NOCS_READOUTS, garment_losses, nocs_cross_entropy, nocs_from_logits
from l1fx.report import compare
from l1fx.train import DLC, MGS, TrainingWrapper

VARIANTS = ("garmentnets", "l1-garmentnets")
LOSS_WEIGHTS = {"nocs": 10.0, "winding": 20.0, "warp": 10.0, "nocs_ce": 1.0}  # nocs_ce: with --nocs-bins
SURFACE_SAMPLES = 2000

# "smoke": the test suite's end-to-end run; "quick": < 2 min on 2 cores; "full": the RESULTS.md study.
PRESETS = {
    "smoke": dict(train=2, test=1, points=128, grid=8, batch=4, epochs=1, categories=("skirt", "shirt"),
                  model=dict(npoint=(32, 8), radius=(0.15, 0.3), nsample=(8, 8), sa_mlps=((8, 16), (16, 32)),
                             fp_mlps=((16,), (16,)), features=8, unet=(4, 8))),
    "quick": dict(train=3, test=1, points=256, grid=16, batch=6, epochs=3, categories=GARMENT_CATEGORIES,
                  model=dict(npoint=(64, 16), sa_mlps=((16, 32), (32, 64)), fp_mlps=((64,), (32,)), features=16,
                             unet=(8, 16, 32))),
    "full": dict(train=24, grasps=4, test=6, points=512, grid=16, batch=8, epochs=8, categories=GARMENT_CATEGORIES,
                 model=dict()),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small run (< 2 min on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="tiny end-to-end check (the test suite's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds F..F+N-1; mean ± std")
    p.add_argument("--first-seed", type=int, default=0, help="F, the first seed")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--train", type=int, help="training instances per category")
    p.add_argument("--grasps", type=int, help="grasp points per training instance (test: one each)")
    p.add_argument("--yaw-jitter", type=float, default=YAW_JITTER,
                   help=f"spread of the hanging yaw, radians (default {YAW_JITTER}; see l1fx.garments)")
    p.add_argument("--test", type=int, help="test garments per category")
    p.add_argument("--points", type=int, help="observed points per garment")
    p.add_argument("--grid", type=int, help="canonical grid side G (divisible by 4 for the default U-Net)")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                   help="every variant's optimizer: adamw (weight decay 1e-4) or sgd (momentum 0.9, weight decay 1e-4)")
    p.add_argument("--lr", type=float, help="base learning rate, every variant (default: adamw 2e-3, sgd 0.05)")
    p.add_argument("--eta", type=float, default=0.2, help="DLC eta")
    p.add_argument("--init", default="data", type=init_type,
                   help="initial ℓ1 weights, l1fx.convert(init=...): 'data' (default), 'dense' or a factor")
    p.add_argument("--nocs-bins", type=int, default=0,
                   help="K > 0: stage one classifies each NOCS axis into K bins (cross-entropy, weight 1), as the "
                        "authors do; 0 (default): regression (MSE, weight 10)")
    p.add_argument("--nocs-readout", default="expectation", choices=NOCS_READOUTS,
                   help="with --nocs-bins: NOCS from the bins by the softmax expectation of the bin centres (default) "
                        "or the most likely bin's centre (argmax, the authors' read-out)")
    p.add_argument("--nocs-mse-weight", type=float,
                   help="weight of the NOCS MSE (default 10 for regression; 0 with --nocs-bins, where it is a "
                        "regression term on the read-out, with a gradient only for --nocs-readout expectation)")
    p.add_argument("--stage-one", action="store_true",
                   help="probe: train stage one alone (the dense PointNet++ NOCS predictor, its loss only) and report "
                        "its test NOCS error per category (both read-outs with bins) against the category-mean predictor")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="out/garment_pose", help="directory for results, plots, generated data")
    p.add_argument("--data", help="directory caching the generated garments (default: --out), to share one "
                                  "generation between runs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="no training: combine the results.json of runs in DIR... (e.g. one seed each) into --out")
    args = p.parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    for key in ("epochs", "train", "grasps", "test", "points", "grid", "batch"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, 1))
    args.categories, args.model_kwargs = preset["categories"], preset["model"]
    if args.lr is None:
        args.lr = 2e-3 if args.optimizer == "adamw" else 0.05
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for key in ("seeds", "epochs", "train", "grasps", "test", "points", "grid", "batch", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1")
    if not (args.yaw_jitter >= 0 and math.isfinite(args.yaw_jitter)):
        p.error("--yaw-jitter must be a finite angle >= 0 (radians)")
    if args.nocs_bins < 0 or args.nocs_bins == 1:
        p.error("--nocs-bins must be 0 (regression) or at least 2")
    if args.nocs_mse_weight is None:
        args.nocs_mse_weight = 0.0 if args.nocs_bins else LOSS_WEIGHTS["nocs"]
    if args.nocs_mse_weight < 0 or not math.isfinite(args.nocs_mse_weight):
        p.error("--nocs-mse-weight must be finite and >= 0")
    if not args.nocs_bins and args.nocs_mse_weight == 0:
        p.error("--nocs-mse-weight 0 without --nocs-bins leaves stage one without a loss")
    if args.stage_one and args.variants != ["garmentnets"] and args.variants:
        p.error("--stage-one probes the dense stage one only: use it with --variants garmentnets")
    args.model_kwargs = dict(args.model_kwargs, nocs_bins=args.nocs_bins, nocs_readout=args.nocs_readout)
    args.loss_weights = dict(LOSS_WEIGHTS, nocs=args.nocs_mse_weight)
    return args


# ---------------------------------------------------------------- data
def load_or_generate(args, out: Path) -> tuple[list, list]:
    """Train (seed 0) and test (seed 1) garments, cached in ``out`` (--data or --out; ~0.2-0.5 s a garment)."""
    # v2: the hanging yaw is jittered (l1fx.garments); caches of the uniform-yaw generator are not reused
    key = (f"garments-v2-{'+'.join(args.categories)}-tr{args.train}x{args.grasps}-te{args.test}"
           f"-p{args.points}-g{args.grid}-y{args.yaw_jitter!r}")
    path = out / f"{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    t0 = time.perf_counter()
    data = (generate_garments(args.train, args.categories, seed=0, num_points=args.points, grid=args.grid,
                              grasps=args.grasps, yaw_jitter=args.yaw_jitter),
            generate_garments(args.test, args.categories, seed=1, num_points=args.points, grid=args.grid,
                              yaw_jitter=args.yaw_jitter))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(data, f)
    os.replace(tmp, path)  # never a half-written cache
    print(f"generated {len(data[0])} + {len(data[1])} garments in {time.perf_counter() - t0:.0f} s -> {path}",
          flush=True)
    return data


# ---------------------------------------------------------------- scoring
def _surface(mesh, fallback: np.ndarray, rng) -> np.ndarray:
    return fallback if mesh is None else sample_surface(mesh[0], mesh[1], SURFACE_SAMPLES, rng)


def score_garment(g, p_nocs: torch.Tensor, p_winding: np.ndarray, p_warp: torch.Tensor, rng) -> dict:
    """Canonical / task Chamfer distance and NOCS error of one test garment, in cm (module docstring)."""
    true_can = torch.from_numpy(sample_surface(g.canonical, g.faces, SURFACE_SAMPLES, rng))
    true_world = torch.from_numpy(sample_surface(g.world, g.faces, SURFACE_SAMPLES, rng))
    mesh = extract_mesh(p_winding)
    if mesh is None:
        can, world = p_nocs.T.double(), torch.from_numpy(g.points).double()
    else:
        can = torch.from_numpy(sample_surface(mesh[0], mesh[1], SURFACE_SAMPLES, rng))
        # warp the surface samples (trilinear inside the mesh's triangles = warping its vertices, to first order)
        world = warp_points(p_warp.double(), can)
    cm = 100.0
    return {"canonical_cd": cm * g.side * float(chamfer_distance(can[None], true_can[None])[0]),
            "task_cd": cm * float(chamfer_distance(world[None], true_world[None])[0]),
            "nocs_cm": cm * g.side * float(nocs_error(p_nocs[None], torch.from_numpy(g.nocs.T)[None])[0]),
            "no_mesh": mesh is None}


def references(test) -> dict:
    """Per category, two reference rows: ``"grid floor"``, the scores of the *true* fields and NOCS (the best
    the grid allows), and ``"seen points"``, the observed points alone (with their true NOCS) as the shape (no
    completion: what a model must beat)."""
    rng = np.random.default_rng(0)
    rows = {"grid floor": [], "seen points": []}
    for g in test:
        nocs, warp = torch.from_numpy(g.nocs.T), torch.from_numpy(g.warp)
        rows["grid floor"].append((g.category, score_garment(g, nocs, g.winding, warp, rng)))
        rows["seen points"].append((g.category, score_garment(g, nocs, np.zeros_like(g.winding), warp, rng)))
    return {name: _per_category(r) for name, r in rows.items()}


def _per_category(rows) -> dict:
    out: dict = {}
    for cat, s in rows:
        entry = out.setdefault(GARMENT_CATEGORIES[cat], {k: [] for k in s})
        for k, v in s.items():
            entry[k].append(float(v))
    return {c: {k: statistics.mean(v) for k, v in e.items()} for c, e in out.items()}


@torch.no_grad()
def evaluate(model, test, batch: int, weights: dict = LOSS_WEIGHTS) -> tuple[dict, float]:
    """``({category: mean scores}, mean weighted test loss)``."""
    model.eval()
    rng = np.random.default_rng(0)  # the same surface samples for every model
    rows, losses = [], []
    for start in range(0, len(test), batch):
        idx = list(range(start, min(start + batch, len(test))))
        pts, nocs, winding, warp, _ = collate(test, idx)
        out = model(pts)
        losses.append(_weighted(garment_losses(out, nocs, winding, warp), weights).item() * len(idx))
        for j, i in enumerate(idx):
            rows.append((test[i].category, score_garment(test[i], out[0][j], out[1][j, 0].numpy(), out[2][j], rng)))
    model.train()
    return _per_category(rows), sum(losses) / len(test)


def _weighted(parts: dict, weights: dict = LOSS_WEIGHTS) -> torch.Tensor:
    return sum(weights[k] * v for k, v in parts.items() if weights[k])


def overall(per_cat: dict, key: str) -> float:
    return statistics.mean(s[key] for s in per_cat.values())


# ---------------------------------------------------------------- training
def build_run(args, variant: str, seed: int, train, total_steps: int):
    torch.manual_seed(seed)  # identical initial weights for both variants of a seed
    model = GarmentNets(grid=args.grid, **args.model_kwargs)
    if variant == "l1-garmentnets":
        example = None
        if args.init == "data":
            example = (collate(train, range(min(args.batch, len(train))))[0],)
        model = l1fx.convert(model, ratio=1.0, init=args.init, example_inputs=example)
        mgs, dlc = MGS(), DLC(eta=args.eta)
    else:
        mgs, dlc = None, DLC(scale_gradients=False, hold=0.0, drops=())  # a plain cosine learning rate
    if args.optimizer == "adamw":  # DLC then scales the ℓ1 updates (mode "auto" -> "update")
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    return model, opt, TrainingWrapper(model, opt, total_steps, mgs=mgs, dlc=dlc)


def train_one(args, variant: str, seed: int, train, test) -> dict:
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(train) // args.batch
    total = args.epochs * per_epoch
    model, opt, wrapper = build_run(args, variant, seed, train, total)
    history = {"epoch": [], "train_loss": [], "test_loss": [], "task_cd": [], "canonical_cd": []}
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train), generator=g).tolist()
        running = []
        for b in range(per_epoch):
            pts, nocs, winding, warp, _ = collate(train, order[b * args.batch:(b + 1) * args.batch])
            opt.zero_grad(set_to_none=True)
            loss = _weighted(garment_losses(model(pts), nocs, winding, warp), args.loss_weights)
            loss.backward()
            wrapper.step()
            running.append(loss.item())
        per_cat, test_loss = evaluate(model, test, args.batch, args.loss_weights)
        history["epoch"].append(epoch)
        history["train_loss"].append(statistics.mean(running))
        history["test_loss"].append(test_loss)
        history["task_cd"].append(overall(per_cat, "task_cd"))
        history["canonical_cd"].append(overall(per_cat, "canonical_cd"))
        print(f"  {variant} s{seed} epoch {epoch}: train loss {history['train_loss'][-1]:.4f}, test loss "
              f"{test_loss:.4f}, task CD {history['task_cd'][-1]:.2f} cm, canonical CD "
              f"{history['canonical_cd'][-1]:.2f} cm", flush=True)
    seconds = time.perf_counter() - t0
    print(f"{variant:<16} s{seed}: task CD {overall(per_cat, 'task_cd'):.2f} cm, NOCS error "
          f"{overall(per_cat, 'nocs_cm'):.2f} cm ({seconds:.0f} s, {total} steps)", flush=True)
    return {"variant": variant, "seed": seed, "per_category": per_cat, "history": history, "seconds": seconds,
            "steps": total, "l1_layers": len(wrapper.l1_modules),
            "finite": all(math.isfinite(v) for v in history["train_loss"])}, model


def energy(args, garment) -> dict:
    """One forward pass of one garment: dense vs fully converted (45 nm, fp32)."""
    torch.manual_seed(0)
    dense = GarmentNets(grid=args.grid, **args.model_kwargs)
    c = compare(dense, l1fx.convert(dense, ratio=1.0), (collate([garment])[0],))
    return {"dense_uJ": c.original.total["energy_pJ"] / 1e6, "l1_uJ": c.converted.total["energy_pJ"] / 1e6,
            "ratio": c.ratio["energy_pJ"], "dense_mul": c.original.total["mul"], "l1_add": c.converted.total["add"]}


# ---------------------------------------------------------------- stage-one probe
def _nocs_errors_cm(test, nocs_by_readout: dict) -> dict:
    """``{readout: {category: mean NOCS error in cm}}`` of predicted NOCS ``[T, 3, N]`` per read-out."""
    out = {}
    for name, pred in nocs_by_readout.items():
        rows = [(g.category, {"nocs_cm": 100.0 * g.side * float(
            nocs_error(pred[i][None], torch.from_numpy(g.nocs.T)[None].to(pred.dtype))[0])})
                for i, g in enumerate(test)]
        out[name] = {c: s["nocs_cm"] for c, s in _per_category(rows).items()}
    return out


@torch.no_grad()
def _stage_one_eval(model, test, batch: int) -> dict:
    model.eval()
    preds: dict = {}
    for start in range(0, len(test), batch):
        pts = collate(test, range(start, min(start + batch, len(test))))[0]
        _, nocs, logits = model.canonicalize(pts)
        if logits is None:
            preds.setdefault("regression", []).append(nocs)
        else:
            for readout in NOCS_READOUTS:
                preds.setdefault(readout, []).append(nocs_from_logits(logits, readout))
    model.train()
    return _nocs_errors_cm(test, {k: torch.cat(v) for k, v in preds.items()})


def stage_one(args, seed: int, train, test) -> dict:
    """The probe of ``--stage-one``: the dense PointNet++ of stage one trained alone on its NOCS loss (the same
    weights, optimizer, schedule and batch order as in a full run, the U-Net left out), test NOCS error per epoch."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = GarmentNets(grid=args.grid, **args.model_kwargs)
    params = [p for n, p in model.named_parameters() if not n.startswith("unet.")]
    per_epoch = len(train) // args.batch
    total = args.epochs * per_epoch
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    wrapper = TrainingWrapper(model, opt, total, mgs=None, dlc=DLC(scale_gradients=False, hold=0.0, drops=()))
    weights = args.loss_weights
    # the reference: every test point at its category's mean training NOCS coordinate
    means = {c: torch.from_numpy(np.concatenate([t.nocs for t in train if t.category == c])).mean(0)
             for c in {t.category for t in train}}
    mean_pred = torch.stack([means[t.category][:, None].expand(3, t.nocs.shape[0]) for t in test]).double()
    reference = _nocs_errors_cm(test, {"category mean": mean_pred})["category mean"]
    history = []
    t0 = time.process_time()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train), generator=g).tolist()
        running = []
        for b in range(per_epoch):
            pts, nocs = collate(train, order[b * args.batch:(b + 1) * args.batch])[:2]
            opt.zero_grad(set_to_none=True)
            _, p_nocs, logits = model.canonicalize(pts)
            loss = weights["nocs"] * torch.nn.functional.mse_loss(p_nocs, nocs) if weights["nocs"] else 0.0
            if logits is not None:
                loss = loss + weights["nocs_ce"] * nocs_cross_entropy(logits, nocs)
            loss.backward()
            wrapper.step()
            running.append(loss.item())
        errors = _stage_one_eval(model, test, args.batch)
        history.append({"epoch": epoch, "train_loss": statistics.mean(running),
                        **{k: statistics.mean(v.values()) for k, v in errors.items()}})
        print(f"  stage one s{seed} epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, test NOCS error "
              + ", ".join(f"{k} {statistics.mean(v.values()):.2f} cm" for k, v in errors.items()), flush=True)
    return {"seed": seed, "steps": total, "cpu_seconds": time.process_time() - t0, "nocs_bins": args.nocs_bins,
            "per_category": errors, "category_mean": reference, "history": history}


# ---------------------------------------------------------------- reporting
def _mean_std(values, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_tables(results: list[dict], refs: dict, energies: dict, seeds: int) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in results))
    cats = list(refs["grid floor"])
    seed_note = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [f"Task-space Chamfer distance (cm) per category ({seed_note}; references: *grid floor*, the true "
             f"fields; *seen points*, the observed points as the shape):", "",
             "| Variant | " + " | ".join(cats) + " | Mean |", "|---|" + "---|" * (len(cats) + 1)]
    for key, title in (("task_cd", None), ("canonical_cd", "Canonical-space Chamfer distance (cm)"),
                       ("nocs_cm", "NOCS error of stage one (cm)")):
        if title:
            lines += ["", f"{title} per category ({seed_note}):", "",
                      "| Variant | " + " | ".join(cats) + " | Mean |", "|---|" + "---|" * (len(cats) + 1)]
        for v in variants:
            runs = [r["per_category"] for r in results if r["variant"] == v]
            cells = [_mean_std([run[c][key] for run in runs]) for c in cats]
            cells.append(_mean_std([overall(run, key) for run in runs]))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        for name, ref in refs.items():
            if key != "nocs_cm":
                lines.append(f"| *{name}* | " + " | ".join(f"{ref[c][key]:.2f}" for c in cats)
                             + f" | {overall(ref, key):.2f} |")
    no_mesh = {v: statistics.mean(overall(r["per_category"], "no_mesh") for r in results if r["variant"] == v)
               for v in variants}
    e = energies
    lines += ["", f"Energy of one forward pass of one garment (45 nm, fp32): dense {e['dense_uJ']:.3g} µJ, "
              f"ℓ1 {e['l1_uJ']:.3g} µJ (ratio {e['ratio']:.2f}). Test garments without a predicted mesh "
              "(scored as their seen points): " + ", ".join(f"{v} {100 * n:.0f} %" for v, n in no_mesh.items()) + "."]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: list[dict], out: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for v in dict.fromkeys(r["variant"] for r in results):
        runs = [r["history"] for r in results if r["variant"] == v]
        epochs = runs[0]["epoch"]
        for key, ax in zip(("train_loss", "test_loss", "task_cd"), axes):
            ax.plot(epochs, [statistics.mean(h[key][i] for h in runs) for i in range(len(epochs))], marker="o",
                    label=v)
    for ax, title in zip(axes, ("training loss", "test loss", "test task Chamfer distance (cm)")):
        ax.set(title=f"{title} (mean over seeds)", xlabel="epoch")
    axes[0].legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_garments(models: dict, test, out: Path) -> Path:
    """One test garment per category, front view (x, y) of the true hanging surface vs each model's mesh."""
    plt = _pyplot()
    picks = list({g.category: i for i, g in reversed(list(enumerate(test)))}.values())[::-1]
    cols = 1 + len(models)
    fig, axes = plt.subplots(len(picks), cols, figsize=(3 * cols, 3 * len(picks)), squeeze=False)
    rng = np.random.default_rng(0)
    for row, i in enumerate(picks):
        g = test[i]
        true = sample_surface(g.world, g.faces, 1500, rng)
        axes[row, 0].scatter(true[:, 0], true[:, 1], s=1, c=true[:, 2], cmap="viridis")
        axes[row, 0].scatter(g.points[:, 0], g.points[:, 1], s=1, c="red")
        axes[row, 0].set_title(f"{GARMENT_CATEGORIES[g.category]}: true (red: seen)", fontsize=8)
        for col, (name, model) in enumerate(models.items(), 1):
            model.eval()
            _, p_winding, p_warp = model(collate(test, [i])[0])[:3]
            mesh = extract_mesh(p_winding[0, 0].numpy())
            if mesh is None:
                pts = g.points
            else:
                pts = warp_points(p_warp[0], torch.from_numpy(sample_surface(*mesh, 1500, rng)).float()).numpy()
            axes[row, col].scatter(pts[:, 0], pts[:, 1], s=1, c=pts[:, 2], cmap="viridis")
            axes[row, col].set_title(name + (" (no mesh)" if mesh is None else ""), fontsize=8)
        lo, hi = true[:, :2].min(0), true[:, :2].max(0)
        pad = 0.1 * (hi - lo).max()
        for ax in axes[row]:
            ax.set(xlim=(lo[0] - pad, hi[0] + pad), ylim=(lo[1] - pad, hi[1] + pad), aspect="equal", xticks=[],
                   yticks=[])
    fig.tight_layout()
    path = out / "garments.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def merge(args, argv) -> list[dict]:
    """Tables and curves over the runs saved in ``args.merge`` (same data and preset, other seeds)."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in args.merge]
    if any(r["references"] != runs[0]["references"] for r in runs):
        raise l1fx.UsageError(f"--merge: the runs in {', '.join(args.merge)} were scored on different test garments")
    results = [r for run in runs for r in run["results"]]
    seeds = len({r["seed"] for r in results})
    tables = markdown_tables(results, runs[0]["references"], runs[0]["energy"], seeds)
    print(tables)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = "; ".join(f"`{r['command'].strip()}`" for r in runs)
    (out / "results.md").write_text(f"Commands: {commands}\n\n{tables}\n")
    (out / "results.json").write_text(json.dumps({"command": " ; ".join(r["command"] for r in runs),
                                                  "energy": runs[0]["energy"], "references": runs[0]["references"],
                                                  "results": results}, indent=1))
    if not args.no_plots:
        print(f"wrote {plot_curves(results, out)}")
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.merge:
        return merge(args, argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args, argv) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_dir = Path(args.data) if args.data else out
    data_dir.mkdir(parents=True, exist_ok=True)
    train, test = load_or_generate(args, data_dir)
    if len(train) < args.batch:
        raise l1fx.UsageError(f"{len(train)} training garments, fewer than --batch {args.batch}")
    print(f"data: generated garments ({', '.join(args.categories)}), {args.train} train instances x {args.grasps} "
          f"grasps / {args.test} test per category, yaw jitter {args.yaw_jitter:g} rad, {args.points} observed "
          f"points, grid {args.grid}^3; {args.epochs} epochs, batch {args.batch}, "
          f"{args.optimizer} lr {args.lr}, ℓ1 init {args.init}", flush=True)
    if args.stage_one:
        command = "python examples/garment_pose.py " + " ".join(sys.argv[1:] if argv is None else argv)
        runs = [stage_one(args, s, train, test) for s in range(args.first_seed, args.first_seed + args.seeds)]
        cats = list(runs[0]["category_mean"])
        lines = ["| Stage one | " + " | ".join(cats) + " | Mean |", "|---|" + "---|" * (len(cats) + 1)]
        for name in runs[0]["per_category"]:
            cells = [_mean_std([r["per_category"][name][c] for r in runs]) for c in cats]
            cells.append(_mean_std([statistics.mean(r["per_category"][name].values()) for r in runs]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        ref = runs[0]["category_mean"]
        lines.append("| *category mean* | " + " | ".join(f"{ref[c]:.2f}" for c in cats)
                     + f" | {statistics.mean(ref.values()):.2f} |")
        table = "\n".join(lines)
        print(f"\nTest NOCS error (cm), {runs[0]['steps']} steps, CPU "
              + ", ".join(f"{r['cpu_seconds']:.0f} s" for r in runs) + f":\n{table}", flush=True)
        (out / "stage_one.json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
        (out / "stage_one.md").write_text(f"Command: `{command.strip()}`\n\n{table}\n")
        return runs
    energies = energy(args, train[0])
    print(f"energy per garment: dense {energies['dense_uJ']:.2f} µJ, ℓ1 {energies['l1_uJ']:.2f} µJ "
          f"(ratio {energies['ratio']:.3f})", flush=True)
    refs = references(test)
    results, first_models = [], {}
    for s in range(args.first_seed, args.first_seed + args.seeds):
        for v in args.variants:
            result, model = train_one(args, v, s, train, test)
            results.append(result)
            if s == args.first_seed:
                first_models[v] = model
    tables = markdown_tables(results, refs, energies, args.seeds)
    print("\n" + tables)
    command = "python examples/garment_pose.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "results.json").write_text(json.dumps({"command": command, "energy": energies, "references": refs,
                                                  "results": results}, indent=1))
    (out / "results.md").write_text(f"Command: `{command.strip()}`\n\n{tables}\n")
    if not args.no_plots:
        print(f"wrote {plot_curves(results, out)}")
        print(f"wrote {plot_garments(first_models, test, out)}")
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    try:
        main()
    except l1fx.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
