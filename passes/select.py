"""Select pass: which units (and so which layers) become l1.

``ratio`` is the fraction of units converted, rounded to the nearest integer
(halves round up). ``strategy="depth"`` takes the units nearest the inputs
first (the replacement ablation of "Rethinking 3D Convolution in lp-norm
Space"); ``"energy"`` the units with the most multiply-accumulates first.

``include`` / ``exclude`` override the ratio: each is an fnmatch pattern, a
list of patterns, or a function ``fn(name, module) -> bool`` (deprecated in
``l1fx.convert``). A pattern matches a layer's qualified name or any of its
parents (``"sa1"`` matches ``"sa1.mlp_convs.0"``). With ``include`` exactly
the matching layers are converted; ``exclude`` removes layers from whatever
would be converted, and the ratio then counts only units that still have a
layer to convert. ``filter_fn(module, fqn) -> bool`` (torchao's argument
order) acts like ``include``; with both, a layer must pass both. Patterns
that match no layer are warned about.

The rules live in :func:`choose`, which knows nothing of fx: it takes layers
(each with the names patterns see) grouped into ranked units, so the source
codemod (:mod:`l1fx.rewrite`, one call site per unit in source order) and the
select pass here pick layers the same way. :func:`check_ratio` is the one
ratio check.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from torch import nn

from l1fx.errors import UsageError

from .state import Candidate, ConversionState, Unit
from .status import CandidateKind, Strategy

__all__ = ["select", "nearest_count", "Matcher", "check_ratio", "check_strategy", "choose", "choose_in_order",
           "Layer", "Choice", "rank_units", "STRATEGIES"]

Pattern = Union[None, str, Sequence[str], Callable[[str, Optional[nn.Module]], bool]]

STRATEGIES = tuple(s.value for s in Strategy)


def check_ratio(ratio, *, prefix: str = "", unit: str = "units", error: type = UsageError) -> float:
    """``ratio`` as a float in [0, 1]; else ValueError "<prefix>ratio must be ... (fraction of <unit> to convert)".

    The one ratio check: ``l1fx.convert`` (``unit="units"``, ``error=ConversionError``) and source
    rewriting (``"call sites"``). The default error, :class:`l1fx.UsageError`, is a ValueError.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
        raise error(f"{prefix}ratio must be a number in [0, 1] (fraction of {unit} to convert), got {ratio!r}")
    return float(ratio)


def check_strategy(strategy, *, prefix: str = "", error: type = UsageError) -> str:
    if strategy not in STRATEGIES:
        raise error(f"{prefix}strategy must be one of {STRATEGIES}, got {strategy!r}")
    return Strategy(strategy)


def nearest_count(ratio: float, n: int) -> int:
    """Nearest integer to ``ratio * n`` (halves round up)."""
    return min(n, int(math.floor(ratio * n + 0.5)))


class Matcher:
    """fnmatch patterns (matching a name or one of its parents) or a filter function.

    The function is called ``fn(name, module)``; with ``module_first=True``
    (torchao's ``filter_fn(module, fqn)`` order) ``fn(module, name)``.
    """

    def __init__(self, spec: Pattern, what: str, *, module_first: bool = False) -> None:
        self.what = what
        self.fn = spec if callable(spec) else None
        self.module_first = module_first
        self.patterns = [] if spec is None or callable(spec) else ([spec] if isinstance(spec, str) else list(spec))
        for p in self.patterns:
            if not isinstance(p, str):
                raise TypeError(f"{what}: patterns must be strings, got {p!r}")
        self.hits = {p: 0 for p in self.patterns}

    def __bool__(self) -> bool:
        return self.fn is not None or bool(self.patterns)

    def __call__(self, name: str, module: Optional[nn.Module]) -> bool:
        if self.fn is not None:
            return bool(self.fn(module, name) if self.module_first else self.fn(name, module))
        atoms = name.split(".")
        scopes = [".".join(atoms[:i]) for i in range(1, len(atoms) + 1)]
        matched = False
        for p in self.patterns:
            if any(fnmatch.fnmatchcase(s, p) for s in scopes):
                self.hits[p] += 1
                matched = True
        return matched

    def unmatched(self) -> list[str]:
        return [p for p, n in self.hits.items() if n == 0]

    def any(self, names: Sequence[str], module: Optional[nn.Module]) -> bool:
        """Whether any of ``names`` matches; every name is tried, so each pattern counts all its hits."""
        return bool(self) and any([self(n, module) for n in names])


# ------------------------------------------------------------------ the selection core
@dataclass
class Layer:
    """What the selection sees of one layer: the names patterns match, the module a filter_fn gets."""

    names: tuple[str, ...]
    module: Optional[nn.Module] = None
    skip: bool = False  # cannot be converted; patterns still see it (naming it is not a typo)


@dataclass
class Choice:
    """Result of :func:`choose`: a flag per layer and the patterns that matched nothing."""

    selected: list[bool]
    units: list[int] = field(default_factory=list)  # positions (in the ranked units) of the units taken by the ratio
    unmatched_include: list[str] = field(default_factory=list)
    unmatched_exclude: list[str] = field(default_factory=list)

    @property
    def unmatched(self) -> list[str]:
        return self.unmatched_include + self.unmatched_exclude


def choose(layers: Sequence[Layer], units: Sequence[Sequence[int]], *, ratio: float = 1.0,
           include: Union[Pattern, Matcher] = None, exclude: Union[Pattern, Matcher] = None,
           filter_fn: Union[None, Callable, Matcher] = None) -> Choice:
    """Which layers to convert: convert's rules, for any list of layers.

    ``units`` are lists of indices into ``layers``, ranked (the first unit is
    converted first); layers in no unit are converted only through ``include``.
    With ``include`` exactly the layers it matches are selected, minus those
    ``exclude`` matches; otherwise the first ``nearest_count(ratio, n)`` of the
    ``n`` units that still have a layer not excluded are taken, minus the
    excluded layers. Skipped layers are never selected. ``filter_fn(module,
    fqn)`` (torchao's order) acts as an include: with both, a layer must pass both.
    """
    ratio = check_ratio(ratio)
    inc = include if isinstance(include, Matcher) else Matcher(include, "include")
    exc = exclude if isinstance(exclude, Matcher) else Matcher(exclude, "exclude")
    flt = filter_fn if isinstance(filter_fn, Matcher) else Matcher(filter_fn, "filter_fn", module_first=True)
    excluded, included = [], []
    for layer in layers:
        if layer.skip:
            for matcher in (inc, exc):  # hits only, so naming a skipped layer is not reported as a typo
                if matcher.patterns:
                    matcher.any(layer.names, None)
            excluded.append(True)
            included.append(False)
            continue
        excluded.append(exc.any(layer.names, layer.module))
        included.append((not inc or inc.any(layer.names, layer.module))
                        and (not flt or flt.any(layer.names, layer.module)))
    if inc or flt:
        selected = [i and not x for i, x in zip(included, excluded)]
    else:
        selected = [False] * len(layers)
        live = [k for k, u in enumerate(units) if any(not excluded[i] for i in u)]
        taken = live[: nearest_count(ratio, len(live))]
        for k in taken:
            for i in units[k]:
                selected[i] = not excluded[i]
        return Choice(selected, taken, inc.unmatched(), exc.unmatched())
    return Choice(selected, [], inc.unmatched(), exc.unmatched())


def choose_in_order(names: Sequence[Sequence[str]], ratio: float = 1.0, include: Pattern = None,
                    exclude: Pattern = None, *, unit: str = "call sites") -> Choice:
    """:func:`choose` for layers that are each their own unit, ranked as given (source order).

    ``names[i]`` are the names of layer ``i`` (a call site's assignment targets
    and enclosing scope); a layer matches a pattern when any of its names does.
    This is what ``l1fx.rewrite.select`` computes.
    """
    ratio = check_ratio(ratio, unit=unit)
    layers = [Layer(tuple(ns)) for ns in names]
    return choose(layers, [[i] for i in range(len(layers))], ratio=ratio, include=include, exclude=exclude)


def _module_for(state: ConversionState, c: Candidate) -> Optional[nn.Module]:
    """The module a filter_fn sees: the layer, or for functional calls the module owning the weight."""
    root = state.root
    if c.kind == CandidateKind.MODULE:
        return root.get_submodule(c.name)
    owner = c.name.rpartition(".")[0]
    return root.get_submodule(owner) if owner else root


def rank_units(units: list[Unit], strategy: str) -> list[Unit]:
    """Units in the order the ratio takes them: nearest the inputs, or most MACs, first."""
    if strategy == Strategy.DEPTH:
        return sorted(units, key=lambda u: u.order)
    if strategy == Strategy.ENERGY:
        return sorted(units, key=lambda u: (-(u.macs or 0), u.order))
    raise ValueError(f"strategy must be 'depth' or 'energy', got {strategy!r}")


_rank = rank_units  # old private name


def select(state: ConversionState) -> ConversionState:
    """Pass 3: mark ``Candidate.selected``."""
    cfg = state.config
    include, exclude = Matcher(cfg.include, "include"), Matcher(cfg.exclude, "exclude")
    filter_fn = Matcher(getattr(cfg, "filter_fn", None), "filter_fn", module_first=True)
    layers = [Layer((c.name,), None if c.skip else _module_for(state, c), bool(c.skip)) for c in state.candidates]
    index = {id(c): i for i, c in enumerate(state.candidates)}
    chosen_by_name = bool(include or filter_fn)
    # ranking only matters (and a bad strategy only raises) when the ratio decides
    ranked = state.units if chosen_by_name else rank_units(state.units, cfg.strategy)
    units = [[index[id(c)] for c in u.members] for u in ranked]
    choice = choose(layers, units, ratio=cfg.ratio, include=include, exclude=exclude, filter_fn=filter_fn)
    if chosen_by_name:
        for c, flag in zip(state.candidates, choice.selected):
            c.selected = flag
    else:  # as before: only the members of the units taken are (re)set
        for k in choice.units:
            for c in ranked[k].members:
                c.selected = choice.selected[index[id(c)]]
    state.unmatched_patterns = choice.unmatched
    if state.unmatched_patterns:
        names = ", ".join(repr(p) for p in state.unmatched_patterns)
        known = ", ".join(c.name for c in state.candidates[:8])
        warnings.warn(f"l1fx.convert: include/exclude pattern(s) {names} match no layer "
                      f"(layers are named like: {known}{', ...' if len(state.candidates) > 8 else ''})",
                      stacklevel=4)  # the caller of l1fx.convert
    return state
