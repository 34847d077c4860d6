"""``l1fx.convert``: make a model's inner-product layers l1 layers, with torch.fx.

    l1_model = l1fx.convert(model, ratio=0.667)
    print(l1fx.summary(l1_model))

Runs the passes of :mod:`l1fx.passes` (trace -> analyse -> select ->
rewrite [-> init_l1_weights] -> verify) on a copy of ``model``; see docs/convert.md.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from . import passes
from .nn import L1FunctionalCall, L1Module

__all__ = ["convert", "summary", "ConvertConfig", "Summary"]

Summary = passes.Summary
Filter = Union[None, str, Sequence[str], Callable[[str, Optional[nn.Module]], bool]]
SUMMARY_ATTR = "l1fx_summary"
STRATEGIES = ("depth", "energy")


@dataclass
class ConvertConfig:
    """Arguments of :func:`convert`, checked by :meth:`validate`."""

    ratio: float = 1.0
    include: Filter = None
    exclude: Filter = None
    strategy: str = "depth"
    normalize: Optional[str] = "auto"
    example_inputs: Optional[tuple] = None
    inplace: bool = False
    init: Union[str, float] = "dense"

    def validate(self) -> "ConvertConfig":
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"l1fx.convert: ratio must be a number in [0, 1] (fraction of units to convert), "
                             f"got {self.ratio!r}")
        self.ratio = float(self.ratio)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"l1fx.convert: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.normalize not in ("auto", None):
            raise ValueError(f"l1fx.convert: normalize must be 'auto' or None, got {self.normalize!r}")
        if self.example_inputs is not None and not isinstance(self.example_inputs, tuple):
            # one tensor is the common case; anything else must already be the positional args
            if isinstance(self.example_inputs, torch.Tensor):
                self.example_inputs = (self.example_inputs,)
            elif isinstance(self.example_inputs, list):
                self.example_inputs = tuple(self.example_inputs)
            else:
                raise TypeError(f"l1fx.convert: example_inputs must be a tuple of forward() arguments, "
                                f"got {type(self.example_inputs).__name__}")
        if isinstance(self.init, bool) or not (self.init in passes.INIT_CHOICES or (
                isinstance(self.init, numbers.Real) and math.isfinite(self.init) and self.init > 0)):
            raise ValueError(f"l1fx.convert: init must be 'dense' (keep the dense weights), 'data' (set the l1 "
                             f"weights from input statistics) or a positive factor, got {self.init!r}")
        if self.init == "data" and self.example_inputs is None:
            raise ValueError("l1fx.convert: init='data' sets the l1 weights from the statistics of their inputs, "
                             "which needs example_inputs=(a batch of inputs,)")
        if self.strategy == "energy" and self.example_inputs is None:
            raise ValueError("l1fx.convert: strategy='energy' ranks layers by multiply-accumulates, which "
                             "needs example_inputs=(a batch of inputs,)")
        for what in ("include", "exclude"):
            spec = getattr(self, what)
            if spec is not None and not callable(spec) and not isinstance(spec, str) and not (
                    isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec)):
                raise TypeError(f"l1fx.convert: {what} must be a pattern, a list of patterns or a "
                                f"function (name, module) -> bool, got {spec!r}")
        return self


def convert(model: nn.Module, ratio: float = 1.0, *, include: Filter = None, exclude: Filter = None,
            strategy: str = "depth", normalize: Optional[str] = "auto", example_inputs: Optional[tuple] = None,
            inplace: bool = False, init: Union[str, float] = "dense") -> nn.Module:
    """Return ``model`` with inner-product layers replaced by l1 layers.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        ratio: fraction of units (shared-MLP chains or single layers) to convert, in [0, 1].
        include / exclude: fnmatch pattern(s) over qualified layer names (a pattern also matches
            everything below a module: ``"sa1"``), or ``filter_fn(name, module) -> bool``. They
            override the ratio: with ``include`` exactly the matching layers are converted;
            ``exclude`` keeps matching layers dense.
        strategy: ``"depth"`` converts the units nearest the inputs first, ``"energy"`` the units
            with the most multiply-accumulates first (needs ``example_inputs``).
        normalize: ``"auto"`` adds a learnable output normalisation (:class:`l1fx.nn.L1OutputNorm`)
            after converted layers not followed by a normalisation layer; ``None`` adds nothing.
        example_inputs: a tuple of forward() arguments; enables MACs, the energy strategy and the
            output-shape check.
        inplace: convert ``model`` itself (its submodules are swapped in place); use the return value.
        init: the converted l1 layers' weights. ``"dense"`` keeps the dense weights exactly (pretrained
            checkpoints). ``"data"`` (needs ``example_inputs``, for training from scratch) sets each
            layer's weights, as l1 templates, to ``mean_c + std_c * standardised dense weight`` per
            input channel ``c``, from the layer's inputs on ``example_inputs``
            (:func:`l1fx.passes.init_l1_weights`). A positive number multiplies them by that factor.

    Returns:
        A ``torch.fx.GraphModule`` when the model could be traced (possibly with untraced
        submodules kept as leaves), else the model itself with modules swapped. Its
        ``l1fx_summary`` attribute (also ``l1fx.summary(result)``) says what was done.
    """
    config = ConvertConfig(ratio, include, exclude, strategy, normalize, example_inputs, inplace,
                           init).validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"l1fx.convert expects an nn.Module, got {type(model).__name__}")
    state = passes.run_pipeline(model, config)
    result = state.result
    info = build_summary(state)
    if not info.rows or all(r.skip for r in info.rows):
        warnings.warn(f"l1fx.convert: {type(model).__name__} has no Linear/Conv1d/2d/3d layer or F.linear/F.conv "
                      f"call on a parameter to convert; returning it unchanged", stacklevel=2)
        result = state.model  # the copy (or the model itself with inplace=True), not a graph module
    attach_summary(result, info)
    return result


def build_summary(state: passes.ConversionState) -> Summary:
    report = state.trace or passes.TraceReport()
    rows = sorted(state.candidates, key=lambda c: (c.unit is None, c.unit if c.unit is not None else 0, c.order))
    root = state.result if state.result is not None else state.root
    return Summary(
        model_name=type(state.model).__name__, rows=rows, units=len(state.units),
        selected_units=sum(1 for u in state.units if any(c.status in ("converted", "already l1") for c in u.members)),
        ratio=getattr(state.config, "ratio", None), strategy=getattr(state.config, "strategy", ""),
        normalize=getattr(state.config, "normalize", None), leaves=dict(report.leaves),
        opaque_functions=dict(report.opaque_functions), whole_model_error=report.whole_model_error,
        order_note=state.order_note, notes=list(state.notes), l1_weight_names=l1_weight_names(root),
    )


def l1_weight_names(model: nn.Module) -> list[str]:
    """Qualified names of the parameters that l1 layers use as weights."""
    names = []
    for path, m in model.named_modules():
        if isinstance(m, L1FunctionalCall):
            names.append(m.weight_name)
        elif isinstance(m, L1Module) and isinstance(getattr(m, "weight", None), nn.Parameter):
            names.append(f"{path}.weight" if path else "weight")
    return names


def attach_summary(module: nn.Module, info: Summary) -> None:
    """Store the summary on the module so that it survives deepcopy and pickling."""
    object.__setattr__(module, SUMMARY_ATTR, info)
    if isinstance(module, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module and keeps only these user attributes
        key = fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY
        module.meta.setdefault(key, {})[SUMMARY_ATTR] = info


def summary(model: nn.Module) -> Summary:
    """What :func:`convert` did to ``model`` (``print(l1fx.summary(m))`` shows a table)."""
    info = getattr(model, SUMMARY_ATTR, None)
    if isinstance(info, Summary):
        return info
    raise ValueError(f"l1fx.summary: {type(model).__name__} was not produced by l1fx.convert "
                     f"(it has no '{SUMMARY_ATTR}' attribute); convert it with l1fx.convert(model) first")
