"""The state the conversion passes hand to each other, and the summary built from it.

A pipeline is a sequence of functions ``state -> state``. Each pass fills in
its part: ``trace`` the graph module and the traced/swapped regions,
``analyse`` the candidates and units, ``select`` the chosen candidates,
``rewrite`` the converted module, ``verify`` the checks. The config is any
object with the attributes of :class:`l1fx.convert.ConvertConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from l1fx.errors import ConversionError, ConversionFailed, ConversionTypeError  # noqa: F401  (re-exported)

from .status import Region, Status

__all__ = ["Candidate", "Unit", "TraceReport", "ConversionState", "Summary", "ConversionFailed",
           "ConversionTypeError", "shared_groups"]


def shared_groups(model: nn.Module) -> list[list[str]]:
    """Qualified names of each parameter or buffer registered under more than one name (weight ties)."""
    names: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    return [sorted(set(g)) for g in names.values() if len(set(g)) > 1]


@dataclass
class Candidate:
    """One inner-product layer: a module, or a functional call on a model parameter."""

    name: str  # qualified module name; for functional calls the weight parameter's name
    kind: str  # CandidateKind: "module" or "function"
    op: str  # "Linear", "Conv2d", "F.conv1d", ...
    region: str  # "traced", or the qualified name of the swapped module it lives in ("" = whole model)
    pointwise: bool = False
    node: Optional[str] = None  # fx node name, traced candidates only
    already_l1: bool = False  # already an l1 layer when conversion started
    skip: Optional[str] = None  # why it cannot be converted
    macs: Optional[int] = None  # multiply-accumulates per forward on example_inputs
    order: tuple = ()  # sort key: (depth from inputs, topological index, registration index)
    unit: Optional[int] = None
    selected: bool = False
    status: str = ""  # filled by rewrite: a Status ("converted", "already l1", "kept", "skipped")
    norm: str = ""  # output normalisation: "inserted", "existing", "followed by <type>", ""
    measured_norm: Optional[bool] = None  # seen feeding a normalisation on example_inputs
    module_path: Optional[str] = None  # the L1FunctionalCall module of an already converted functional call

    @property
    def traced(self) -> bool:
        return self.region == Region.TRACED


@dataclass
class Unit:
    """Layers converted together: a shared-MLP chain, or a single layer."""

    index: int
    members: list[Candidate]
    kind: str  # UnitKind: "shared-mlp" or "single"

    @property
    def order(self) -> tuple:
        return min(c.order for c in self.members)

    @property
    def macs(self) -> Optional[int]:
        vals = [c.macs for c in self.members]
        return None if any(v is None for v in vals) else sum(vals)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.members]


@dataclass
class TraceReport:
    """What tracing achieved: the graph, and which parts had to be swapped instead."""

    graph_module: Optional[torch.fx.GraphModule] = None
    # qualified name -> first line of the error that made the module a leaf
    leaves: dict[str, str] = field(default_factory=dict)
    # helper function qualname -> first line of the error; each is one opaque graph node
    opaque_functions: dict[str, str] = field(default_factory=dict)
    # set when even leaves did not help and the whole model is converted by module swap
    whole_model_error: Optional[str] = None
    attempts: int = 0
    # the comparison of the traced graph with the eager model (passes/trace_check.py), one line
    check: str = ""
    # branches on shapes decided by example_inputs while tracing ("gt_1 -> True")
    shape_branches: list[str] = field(default_factory=list)

    @property
    def fully_traced(self) -> bool:
        return self.graph_module is not None and not self.leaves


@dataclass
class ConversionState:
    """Everything the passes know about one conversion."""

    model: nn.Module  # the (copied unless inplace) model being converted
    config: Any
    trace: Optional[TraceReport] = None
    graph: Any = None  # networkx.DiGraph of the fx graph
    candidates: list[Candidate] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    order_note: str = ""
    original_outputs: Any = None  # output shapes of the original model on example_inputs
    unmatched_patterns: list[str] = field(default_factory=list)
    result: Optional[nn.Module] = None
    notes: list[str] = field(default_factory=list)

    @property
    def root(self) -> nn.Module:
        """The module being rewritten: the graph module if there is one, else the model itself."""
        if self.result is not None:
            return self.result
        if self.trace is not None and self.trace.graph_module is not None:
            return self.trace.graph_module
        return self.model

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass
class Summary:
    """What ``l1fx.convert`` did to a model; ``str()`` prints a table."""

    model_name: str
    rows: list[Candidate]
    units: int
    selected_units: int
    ratio: Optional[float]
    strategy: str
    normalize: Optional[str]
    leaves: dict[str, str] = field(default_factory=dict)
    opaque_functions: dict[str, str] = field(default_factory=dict)
    whole_model_error: Optional[str] = None
    order_note: str = ""
    notes: list[str] = field(default_factory=list)
    # qualified names of the parameters used as l1 weights (for optimisers / training wrappers)
    l1_weight_names: list[str] = field(default_factory=list)
    # groups of qualified names that are one Parameter/buffer (weight ties), kept tied by convert
    shared_weights: list[list[str]] = field(default_factory=list)
    # the traced graph compared with the eager model before converting (TraceReport.check)
    trace_check: str = ""
    shape_branches: list[str] = field(default_factory=list)
    p: float = 1.0  # the norm of the converted layers (1: l1)

    @property
    def converted(self) -> list[str]:
        return [r.name for r in self.rows if Status.is_l1(r.status)]

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.skip for r in self.rows if r.skip}

    @property
    def tracing(self) -> str:
        if self.whole_model_error is not None:
            return "none (whole model converted by module swap)"
        return "partial" if self.leaves else "full"

    def __str__(self) -> str:
        dense = sum(1 for r in self.rows if r.skip)
        lines = [f"l1fx conversion of {self.model_name}: {len(self.converted)} of {len(self.rows)} layers are l1"
                 + (f", {dense} left dense (reasons in the note column)" if dense else "")
                 + f" ({self.selected_units}/{self.units} units, ratio={self.ratio}, strategy={self.strategy}, "
                 f"normalize={self.normalize}{self._p_text()})"]
        lines.append(f"tracing: {self.tracing}")
        if getattr(self, "trace_check", ""):  # absent in summaries pickled before it existed
            lines.append(f"  trace check: {self.trace_check}")
        if getattr(self, "shape_branches", None):
            lines.append(f"  branches on shapes decided by example_inputs: {', '.join(self.shape_branches)}")
        if self.whole_model_error is not None:
            lines.append(f"  whole model swapped: {self.whole_model_error}")
        for name, why in self.leaves.items():
            lines.append(f"  swapped (untraced) module {name}: {why}")
        for name, why in self.opaque_functions.items():
            lines.append(f"  helper called as one graph node {name}: {why}")
        if self.order_note:
            lines.append(f"order: {self.order_note}")
        header = ("unit", "layer", "type", "region", "status", "norm", "MACs", "note")
        table = [header]
        for r in self.rows:
            table.append((
                "-" if r.unit is None else str(r.unit), r.name, r.op,
                "traced" if r.traced else f"swapped:{r.region or '<model>'}", r.status, r.norm,
                "-" if r.macs is None else f"{r.macs:,}", r.skip or "",
            ))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        l1 = set(self.l1_weight_names)
        for group in getattr(self, "shared_weights", ()):  # absent in summaries pickled before it existed
            kinds = {name in l1 for name in group}
            what = {frozenset({True, False}): "l1 and other layers", frozenset({True}): "l1 layers only"}.get(
                frozenset(kinds), "no l1 layer")
            lines.append(f"shared weight (one Parameter, used by {what}): {' = '.join(group)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _p_text(self) -> str:
        p = getattr(self, "p", 1.0)  # absent in summaries pickled before it existed
        return "" if p == 1.0 else f", p={'inf' if p == float('inf') else f'{p:g}'}"

    __repr__ = __str__
