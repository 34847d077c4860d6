"""``l1fx.convert``: make a model's inner-product layers l1 layers, with torch.fx.

    l1_model = l1fx.convert(model, ratio=0.667)
    print(l1fx.summary(l1_model))

Runs the passes of :mod:`l1fx.passes` (trace -> analyse -> select ->
rewrite [-> init_l1_weights] -> verify) on a copy of ``model``; see docs/convert.md.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch.fx as fx
from torch import nn

from . import passes
from ._util import as_input_tuple
from .errors import ConversionError
from .nn import L1FunctionalCall, L1Module
from .passes.select import STRATEGIES, check_ratio, check_strategy  # noqa: F401  (STRATEGIES: old name)
from .passes.state import ConversionFailed, ConversionTypeError, shared_groups
from .passes.status import Normalize, Status, Strategy

__all__ = ["convert", "summary", "ConvertConfig", "Summary", "ConversionError", "ConversionFailed",
           "ConversionTypeError"]

Summary = passes.Summary
Filter = Union[None, str, Sequence[str], Callable[[str, Optional[nn.Module]], bool]]
FilterFn = Callable[[nn.Module, str], bool]
SUMMARY_ATTR = "l1fx_summary"
_PREFIX = "l1fx.convert: "


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """Arguments of :func:`convert`: keyword-only and frozen; :meth:`validate` returns a checked copy.

    Change one with ``dataclasses.replace(config, ratio=0.5)``.
    """

    ratio: float = 1.0
    include: Filter = None
    exclude: Filter = None
    filter_fn: Optional[FilterFn] = None  # filter_fn(module, fqn) -> bool, torchao's order
    strategy: str = "depth"
    normalize: Optional[str] = "auto"
    example_inputs: Optional[tuple] = None
    inplace: bool = False
    init: Union[str, float] = "auto"
    pretrained: bool = False  # True: the dense weights are trained, keep them (init="dense")
    p: float = 1.0  # the norm of the new layers: 1 (l1, the default), any real >= 1, or inf

    def validate(self) -> "ConvertConfig":
        """A copy with ``ratio`` a float, ``strategy`` a :class:`Strategy` and ``example_inputs`` a tuple;
        ConversionError (a ValueError) or ConversionTypeError (a TypeError) naming the bad argument."""
        ratio = check_ratio(self.ratio, prefix=_PREFIX, error=ConversionError)
        strategy = check_strategy(self.strategy, prefix=_PREFIX, error=ConversionError)
        if self.normalize not in (Normalize.AUTO, None):
            raise ConversionError(f"{_PREFIX}normalize must be 'auto' or None, got {self.normalize!r}")
        example_inputs = self.example_inputs
        if example_inputs is not None:
            try:  # one tensor is the common case; anything else must already be the positional args
                example_inputs = as_input_tuple(example_inputs)
            except TypeError as e:
                raise ConversionTypeError(f"{_PREFIX}{e}") from None
        if isinstance(self.init, bool) or not (self.init in passes.INIT_CHOICES or (
                isinstance(self.init, numbers.Real) and math.isfinite(self.init) and self.init > 0)):
            raise ConversionError(f"{_PREFIX}init must be 'auto' (weights that train: 'data' with example_inputs, "
                                  f"else a scale rule), 'dense' (keep the dense weights), 'data' (set the l1 "
                                  f"weights from input statistics) or a positive factor, got {self.init!r}")
        if not isinstance(self.pretrained, bool):
            raise ConversionTypeError(f"{_PREFIX}pretrained must be True or False, got {self.pretrained!r}")
        init = self.init
        if self.pretrained:
            if init not in ("auto", "dense"):
                raise ConversionError(f"{_PREFIX}pretrained=True keeps the dense weights; it contradicts "
                                      f"init={init!r} (drop one of them)")
            init = "dense"
        if init == "data" and example_inputs is None:
            raise ConversionError(f"{_PREFIX}init='data' sets the l1 weights from the statistics of their inputs, "
                                  "which needs example_inputs=(a batch of inputs,)")
        if strategy == Strategy.ENERGY and example_inputs is None:
            raise ConversionError(f"{_PREFIX}strategy='energy' ranks layers by multiply-accumulates, which "
                                  "needs example_inputs=(a batch of inputs,)")
        for what in ("include", "exclude"):
            spec = getattr(self, what)
            if spec is not None and not callable(spec) and not isinstance(spec, str) and not (
                    isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec)):
                raise ConversionTypeError(f"{_PREFIX}{what} must be a pattern or a list of patterns (or use "
                                          f"filter_fn=lambda module, fqn: ...), got {spec!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConversionTypeError(f"{_PREFIX}filter_fn must be a function (module, fqn) -> bool, "
                                      f"got {self.filter_fn!r}")
        from .kernels.lp import check_p

        p = check_p(self.p, f"{_PREFIX}p", error=ConversionError)
        return dataclasses.replace(self, ratio=ratio, strategy=strategy, example_inputs=example_inputs, init=init,
                                   p=p)


def _warn_old_filter_order(include: Filter, exclude: Filter) -> None:
    """A function as include=/exclude= is called (name, module): still works, but filter_fn is the way now."""
    for what, spec in (("include", include), ("exclude", exclude)):
        if callable(spec):
            hint = "filter_fn=lambda module, fqn: ..." if what == "include" else \
                "filter_fn=lambda module, fqn: not ..."
            warnings.warn(f"{_PREFIX}a function as {what}= (called as fn(name, module)) is deprecated; pass "
                          f"{hint} instead (torchao's argument order: the module first)",
                          DeprecationWarning, stacklevel=3)


def convert(model: nn.Module, ratio: float = 1.0, *, include: Filter = None, exclude: Filter = None,
            filter_fn: Optional[FilterFn] = None, strategy: str = "depth", normalize: Optional[str] = "auto",
            example_inputs: Optional[tuple] = None, inplace: bool = False,
            init: Union[str, float] = "auto", pretrained: bool = False, p: float = 1.0) -> nn.Module:
    """Return ``model`` with inner-product layers replaced by l1 layers.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        ratio: fraction of units (shared-MLP chains or single layers) to convert, in [0, 1].
        include / exclude: fnmatch pattern(s) over qualified layer names (a pattern also matches
            everything below a module: ``"sa1"``). They override the ratio: with ``include``
            exactly the matching layers are converted; ``exclude`` keeps matching layers dense.
            (A function ``fn(name, module) -> bool`` here still works but is deprecated: use
            ``filter_fn``.)
        filter_fn: ``filter_fn(module, fqn) -> bool`` (torchao's order), applied like ``include``:
            exactly the layers it accepts (and ``include`` matches, if given) are converted, minus
            ``exclude``. For a functional call it gets the module owning the weight and the
            weight's name.
        strategy: ``"depth"`` converts the units nearest the inputs first, ``"energy"`` the units
            with the most multiply-accumulates first (needs ``example_inputs``).
        normalize: ``"auto"`` adds a learnable output normalisation (:class:`l1fx.nn.L1OutputNorm`)
            after converted layers not followed by a normalisation layer; ``None`` adds nothing.
        example_inputs: a tuple of forward() arguments; enables MACs, the energy strategy and the
            output-shape check.
        inplace: convert ``model`` itself (its submodules are swapped in place); use the return value.
        init: the converted l1 layers' weights. ``"auto"`` (default; weights that train from scratch):
            ``"data"`` when ``example_inputs`` are given, else a scale rule that needs no data (templates
            at the statistics of a ReLU's or a unit-normal input, see :mod:`l1fx.passes.init`).
            ``"dense"`` keeps the dense weights exactly (pretrained
            checkpoints). ``"data"`` (needs ``example_inputs``, for training from scratch) sets each
            layer's weights, as l1 templates, to ``mean_c + std_c * standardised dense weight`` per
            input channel ``c``, from the layer's inputs on ``example_inputs``
            (:func:`l1fx.passes.init_l1_weights`). A positive number multiplies them by that factor.
            The summary's notes say which init was used.
        pretrained: ``True`` says the dense weights are trained: they are kept exactly (``init="dense"``).
        p: the norm of the new layers, ``y = -||x - w||_p + b``: ``1`` (default) makes the ℓ1 layers
            (:class:`l1fx.nn.L1Linear` ...), any other real ``p >= 1`` or ``float("inf")`` the ℓp layers
            (:class:`l1fx.nn.LpLinear` ..., the registry's ``"lp"`` variant); see docs/l1_ops.md.

    Returns:
        A ``torch.fx.GraphModule`` when the model could be traced (possibly with untraced
        submodules kept as leaves), else the model itself with modules swapped. Its
        ``l1fx_summary`` attribute (also ``l1fx.summary(result)``) says what was done.

    Weight ties survive (converted layers use the dense layers' own Parameters), random calls in
    ``forward`` stay calls, and the global RNG states (torch, CUDA if initialised, ``random``,
    numpy) are as they were on return.

    Raises:
        ConversionError: one line naming the argument or layer; a ``ValueError`` for bad values,
            :class:`ConversionTypeError` (a ``TypeError``) for wrong types, :class:`ConversionFailed`
            (a ``RuntimeError``) when a layer or the model fails part-way. The cause is chained.
    """
    config = ConvertConfig(ratio=ratio, include=include, exclude=exclude, filter_fn=filter_fn, strategy=strategy,
                           normalize=normalize, example_inputs=example_inputs, inplace=inplace,
                           init=init, pretrained=pretrained, p=p).validate()
    _warn_old_filter_order(include, exclude)
    if not isinstance(model, nn.Module):
        raise ConversionTypeError(f"l1fx.convert expects an nn.Module, got {type(model).__name__}")
    # The passes run the model (tracing, the example run, init='data'); run_pipeline keeps the RNG
    # states, so a seeded script draws the same numbers after convert as without it.
    try:
        state = passes.run_pipeline(model, config)  # called here: warnings' stacklevel counts on it
    except ConversionError:
        raise
    except Exception as e:
        raise _conversion_error(e) from e
    result = state.result
    info = build_summary(state)
    if not info.rows or all(r.skip for r in info.rows):
        warnings.warn(f"l1fx.convert: {type(model).__name__} has no Linear/Conv1d/2d/3d layer or F.linear/F.conv "
                      f"call on a parameter to convert; returning it unchanged", stacklevel=2)
        result = state.model  # the copy (or the model itself with inplace=True), not a graph module
    attach_summary(result, info)
    return result


def _conversion_error(e: Exception) -> ConversionError:
    """``e`` as a one-line ConversionError that is still the builtin type it was (the cause is chained)."""
    text = " ".join(str(e).split())
    if not text.startswith("l1fx.convert"):
        text = f"l1fx.convert: {type(e).__name__}: {text}"
    if isinstance(e, TypeError):  # e.g. the model cannot be deep-copied
        return ConversionTypeError(text)
    if isinstance(e, ValueError):  # keeps `except ValueError` working
        return ConversionError(text)
    return ConversionFailed(text)


def build_summary(state: passes.ConversionState) -> Summary:
    report = state.trace or passes.TraceReport()
    notes = list(state.notes)
    if getattr(state.config, "init", None) == "dense" and not any(n.startswith("init='dense'") for n in notes):
        notes.append("init='dense': the dense weights are kept exactly (pretrained)")
    rows = sorted(state.candidates, key=lambda c: (c.unit is None, c.unit if c.unit is not None else 0, c.order))
    root = state.result if state.result is not None else state.root
    return Summary(
        model_name=type(state.model).__name__, rows=rows, units=len(state.units),
        selected_units=sum(1 for u in state.units if any(Status.is_l1(c.status) for c in u.members)),
        ratio=getattr(state.config, "ratio", None), strategy=getattr(state.config, "strategy", ""),
        normalize=getattr(state.config, "normalize", None), leaves=dict(report.leaves),
        opaque_functions=dict(report.opaque_functions), whole_model_error=report.whole_model_error,
        order_note=state.order_note, notes=notes, l1_weight_names=l1_weight_names(root),
        shared_weights=shared_groups(root), trace_check=report.check, shape_branches=list(report.shape_branches),
        p=getattr(state.config, "p", 1.0),
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
    raise ConversionError(f"l1fx.summary: {type(model).__name__} was not produced by l1fx.convert "
                     f"(it has no '{SUMMARY_ATTR}' attribute); convert it with l1fx.convert(model) first")
