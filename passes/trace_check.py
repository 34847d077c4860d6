"""Trace check: the traced graph must compute what the eager model computes, before anything is converted.

A trace can be wrong without failing: a Python decision made once while tracing (an
``isinstance(x, torch.Tensor)`` that is False for a Proxy, a constant computed from a traced
value, a branch decided by the example's shapes) is baked into the graph. So the graph module
and the model run on the same input, in eval mode without grad, with torch seeded the same way
for both (:func:`~l1fx.passes.rng.preserved_rng`) and every train flag and the RNG states given
back (:func:`l1fx._util.evaluating`); buffers are restored too. The input is ``example_inputs``,
or, without them, a random batch of 2 shaped for the first Linear/Conv layer (``in_features`` /
``in_channels``, 16 per spatial dimension), drawn from a private generator; when neither exists
or the model rejects the generated input, the summary says that no check was made.

When they differ, modules are made leaves (run eagerly, converted by module swap): the smallest
set found by trying the root's children, dropping those not needed and refining each kept one
into its own children; if no set of leaves helps, the whole model is converted by module swap.
"""
from __future__ import annotations

import math
import random
import sys
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from l1fx import layers
from l1fx._util import evaluating

from .rng import preserved_rng
from .state import TraceReport
from .trace import _TRACE_LOCK, _Narrowing, _leaf_types, first_line

__all__ = ["check_trace", "compare_outputs", "generated_input"]

RTOL, ATOL = 1e-4, 1e-5  # relative to the largest reference value; the graph runs the same ops


def generated_input(model: nn.Module) -> tuple[Optional[tuple], str]:
    """``(inputs, "")`` for a model whose forward takes one tensor, from its first layer; else ``(None, why)``."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None, "forward has no inspectable signature"
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        return None, f"forward takes {len(required)} required inputs (pass example_inputs)"
    for m in model.modules():
        w = getattr(m, "weight", None)
        if layers.spec_for_module(m) is None or not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        g = torch.Generator().manual_seed(0)  # not the user's generator
        if isinstance(m, nn.Linear):
            shape = (2, m.in_features)
        elif isinstance(getattr(m, "in_channels", None), int) and isinstance(getattr(m, "kernel_size", None), tuple):
            shape = (2, m.in_channels) + (16,) * len(m.kernel_size)
        else:
            break
        return (torch.randn(shape, generator=g, dtype=w.dtype).to(w.device),), f"a generated input {list(shape)}"
    return None, "its first layer does not say what input it takes (pass example_inputs)"


def _uninitialised_lazy(model: nn.Module) -> Optional[str]:
    """The name of the first lazy module whose parameters are not materialised yet, else None."""
    for name, m in model.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            return name or type(m).__name__
    return None


def _run(module: nn.Module, inputs: tuple) -> Any:
    """One forward in eval mode; torch, ``random`` and numpy seeded alike for both sides, all restored after."""
    with evaluating(module), preserved_rng(seed=0), _KeepBuffers(module):
        random.seed(0)
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed(0)
        # a forward that changes its input in place must not hand the other side changed inputs
        fresh = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tuple(inputs))
        return module(*fresh)


class _KeepBuffers:
    """Buffers a forward changes in place (a counter, a cache) are put back afterwards."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __enter__(self):
        self.saved = [(b, b.clone()) for b in self.root.buffers()]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)
        return False


def compare_outputs(ref: Any, got: Any) -> Optional[str]:
    """None when ``got`` matches ``ref`` (same structure, shapes, dtypes; values to RTOL/ATOL), else what differs."""
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if ref_spec != got_spec:
        return f"the outputs have another structure ({ref_spec.num_leaves} vs {got_spec.num_leaves} values)"
    for i, (a, b) in enumerate(zip(ref_leaves, got_leaves)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"output {i} is a {type(b).__name__}, eagerly a {type(a).__name__}"
        if not isinstance(a, torch.Tensor):
            try:
                same = bool(a == b)
            except Exception:  # noqa: BLE001 - incomparable values: their types decide
                same = type(a) is type(b)
            if not same:
                return f"output {i} is {b!r}, eagerly {a!r}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i} has shape {list(b.shape)} {b.dtype}, eagerly {list(a.shape)} {a.dtype}"
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return f"output {i} differs in {int((a != b).sum())} of {a.numel()} values"
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(a64)
        scale = float(a64[finite].abs().max()) if finite.any() else 0.0
        if not torch.allclose(b64, a64, rtol=RTOL, atol=ATOL * max(scale, 1.0), equal_nan=True):
            diff = (b64 - a64).abs().nan_to_num(nan=math.inf)
            return f"output {i} differs by up to {float(diff.max()):.3g} (largest value {scale:.3g})"
    return None


def _differs(gm: fx.GraphModule, inputs: tuple, ref: Any) -> Optional[str]:
    try:
        got = _run(gm, inputs)
    except Exception as e:  # noqa: BLE001 - the eager model runs, the graph does not: a wrong trace
        return f"the traced graph fails where the eager model runs ({first_line(e)})"
    return compare_outputs(ref, got)


def check_trace(report: TraceReport, narrowing: _Narrowing, example_inputs, limit: int) -> None:
    """Compare ``report.graph_module`` with the eager model; make leaves until they agree (see the module doc).

    Fills ``report.check``; sets ``report.whole_model_error`` when no set of leaves helps. Holds the
    tracing lock: two conversions checking at once would draw from each other's seeded generator.
    """
    with _TRACE_LOCK:
        _check_trace(report, narrowing, example_inputs, limit)


def _check_trace(report: TraceReport, narrowing: _Narrowing, example_inputs, limit: int) -> None:
    model = narrowing.model
    if example_inputs is not None:
        inputs, source = tuple(example_inputs), "example_inputs"
    else:
        lazy = _uninitialised_lazy(model)
        if lazy:  # a made-up input would give them made-up shapes (and convert would keep those)
            report.check = (f"not run: no example_inputs, and lazy module '{lazy}' is not initialised "
                            "(a generated input would set its shape; pass example_inputs)")
            return
        inputs, source = generated_input(model)
        if inputs is None:
            report.check = f"not run: no example_inputs, and no input could be generated ({source})"
            return
    try:
        ref = _run(model, inputs)
    except Exception as e:  # noqa: BLE001 - nothing to compare with; a bad example input is reported by analyse
        report.check = f"not run: the eager model fails on {source} ({first_line(e)})"
        return
    diff = _differs(report.graph_module, inputs, ref)
    if diff is None:
        report.check = f"passed: the traced graph matches the eager model on {source}"
        return
    first_diff = diff
    search = _LeafSearch(narrowing, inputs, ref, limit)
    chosen = search.minimise(_children(model, narrowing), set())
    if chosen is None:
        report.whole_model_error = f"the traced graph differs from the eager model on {source}: {first_diff}"
        report.check = f"failed ({first_diff}); no leaf module fixes it: whole model swapped"
        return
    why = f"the traced graph differed from the eager model on {source} ({first_diff})"
    for m in sorted(chosen, key=lambda m: narrowing.names[id(m)]):
        narrowing.add_leaf(m, why)
    failed = narrowing.run(limit + report.attempts)
    diff = failed or _differs(report.graph_module, inputs, ref)
    if diff is not None:  # the search said it passes; a model that is not deterministic may disagree
        report.whole_model_error = f"the traced graph differs from the eager model on {source}: {diff}"
        report.check = f"failed ({first_diff}); whole model swapped"
        return
    names = ", ".join(sorted(narrowing.names[id(m)] for m in chosen))
    report.check = f"failed at first ({first_diff}); passed on {source} with {names} run eagerly (leaf modules)"


def _children(module: nn.Module, narrowing: _Narrowing) -> list[nn.Module]:
    """Children that tracing went into (not leaves already, not torch.nn's or l1fx's own leaf modules)."""
    out = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # never called itself: its members are
            out.extend(_children(child, narrowing))
            continue
        if id(child) in narrowing.leaves or isinstance(child, _leaf_types()) or id(child) not in narrowing.names:
            continue
        if child.__module__.startswith("torch.nn") and not isinstance(child, nn.Sequential):
            continue  # fx's default leaves and torch containers' logic are not the cause
        out.append(child)
    return out


class _LeafSearch:
    """Which extra leaves make the graph agree with the eager model (each try traces and runs once)."""

    def __init__(self, narrowing: _Narrowing, inputs: tuple, ref: Any, limit: int) -> None:
        self.base, self.inputs, self.ref, self.limit = narrowing, inputs, ref, limit
        self.tries = 0
        self.max_tries = 4 * len(narrowing.names) + 16

    def passes(self, extra: set) -> bool:
        if self.tries >= self.max_tries:
            return False
        self.tries += 1
        trial = _Narrowing(self.base.model, None, TraceReport(), quiet=True)
        trial.concrete, trial.example_values = self.base.concrete, self.base.example_values
        trial.leaves = dict(self.base.leaves)
        trial.opaque, trial.helpers = dict(self.base.opaque), dict(self.base.helpers)
        trial.tried_functions = set(self.base.tried_functions)
        for m in extra:
            trial.leaves[id(m)] = m
        if trial.run(self.limit) is not None:
            return False
        return _differs(trial.report.graph_module, self.inputs, self.ref) is None

    def minimise(self, level: list[nn.Module], fixed: set) -> Optional[set]:
        """A small set of modules at or below ``level`` that, as leaves with ``fixed``, makes the check pass."""
        chosen = [m for m in level]
        if not chosen or not self.passes(fixed | set(chosen)):
            return None
        for m in list(chosen):  # drop the children not needed
            if len(chosen) > 1 and self.passes(fixed | (set(chosen) - {m})):
                chosen.remove(m)
        result = set(chosen)
        for m in chosen:  # refine each kept child into its own children
            others = result - {m}
            finer = self.minimise(_children(m, self.base), fixed | others)
            if finer is not None:
                result = others | finer
        return result
