"""Select pass: which units (and so which layers) become l1.

``ratio`` is the fraction of units converted, rounded to the nearest integer
(halves round up). ``strategy="depth"`` takes the units nearest the inputs
first (the replacement ablation of "Rethinking 3D Convolution in lp-norm
Space"); ``"energy"`` the units with the most multiply-accumulates first.

``include`` / ``exclude`` override the ratio: each is an fnmatch pattern, a
list of patterns, or a ``filter_fn(name, module) -> bool``. A pattern matches
a layer's qualified name or any of its parents (``"sa1"`` matches
``"sa1.mlp_convs.0"``). With ``include`` exactly the matching layers are
converted; ``exclude`` removes layers from whatever would be converted, and
the ratio then counts only units that still have a layer to convert.
Patterns that match no layer are warned about.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Callable, Optional, Sequence, Union

from torch import nn

from .state import Candidate, ConversionState, Unit

__all__ = ["select", "nearest_count", "Matcher"]

Pattern = Union[None, str, Sequence[str], Callable[[str, Optional[nn.Module]], bool]]


def nearest_count(ratio: float, n: int) -> int:
    """Nearest integer to ``ratio * n`` (halves round up)."""
    return min(n, int(math.floor(ratio * n + 0.5)))


class Matcher:
    """fnmatch patterns (matching a name or one of its parents) or a filter function."""

    def __init__(self, spec: Pattern, what: str) -> None:
        self.what = what
        self.fn = spec if callable(spec) else None
        self.patterns = [] if spec is None or callable(spec) else ([spec] if isinstance(spec, str) else list(spec))
        for p in self.patterns:
            if not isinstance(p, str):
                raise TypeError(f"{what}: patterns must be strings, got {p!r}")
        self.hits = {p: 0 for p in self.patterns}

    def __bool__(self) -> bool:
        return self.fn is not None or bool(self.patterns)

    def __call__(self, name: str, module: Optional[nn.Module]) -> bool:
        if self.fn is not None:
            return bool(self.fn(name, module))
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


def _module_for(state: ConversionState, c: Candidate) -> Optional[nn.Module]:
    """The module a filter_fn sees: the layer, or for functional calls the module owning the weight."""
    root = state.root
    if c.kind == "module":
        return root.get_submodule(c.name)
    owner = c.name.rpartition(".")[0]
    return root.get_submodule(owner) if owner else root


def _rank(units: list[Unit], strategy: str) -> list[Unit]:
    if strategy == "depth":
        return sorted(units, key=lambda u: u.order)
    if strategy == "energy":
        return sorted(units, key=lambda u: (-(u.macs or 0), u.order))
    raise ValueError(f"strategy must be 'depth' or 'energy', got {strategy!r}")


def select(state: ConversionState) -> ConversionState:
    """Pass 3: mark ``Candidate.selected``."""
    cfg = state.config
    include, exclude = Matcher(cfg.include, "include"), Matcher(cfg.exclude, "exclude")
    eligible = {}
    for c in state.candidates:
        if c.skip:
            # still let patterns see it, so naming a skipped layer is not reported as a typo
            for matcher in (include, exclude):
                if matcher.patterns:
                    matcher(c.name, None)
            continue
        module = _module_for(state, c)
        excluded = bool(exclude) and exclude(c.name, module)
        included = include(c.name, module) if include else None
        eligible[c.name] = (included, excluded)
    if include:
        for c in state.candidates:
            inc, exc = eligible.get(c.name, (False, True))
            c.selected = bool(inc) and not exc
    else:
        units = [u for u in state.units if any(not eligible.get(c.name, (None, True))[1] for c in u.members)]
        chosen = _rank(units, cfg.strategy)[: nearest_count(cfg.ratio, len(units))]
        for u in chosen:
            for c in u.members:
                c.selected = not eligible.get(c.name, (None, True))[1]
    state.unmatched_patterns = include.unmatched() + exclude.unmatched()
    if state.unmatched_patterns:
        names = ", ".join(repr(p) for p in state.unmatched_patterns)
        known = ", ".join(c.name for c in state.candidates[:8])
        warnings.warn(f"l1fx.convert: include/exclude pattern(s) {names} match no layer "
                      f"(layers are named like: {known}{', ...' if len(state.candidates) > 8 else ''})",
                      stacklevel=4)  # the caller of l1fx.convert
    return state
