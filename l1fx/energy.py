"""Operation counts, energy and latency estimates for dense and l1 models (the library of ``l1fx.report``).

The paper's case for l1 networks is arithmetic cost: an inner-product output
element costs K multiplies and K additions, an l1 output element K
subtractions and K accumulations and no multiply (``|.|`` clears a sign bit).
This module counts those operations per layer for one forward pass and turns
them into energy with a per-operation table (Horowitz, ISSCC 2014, 45 nm by
default) and, optionally, into a serial latency in cycles.

Counting runs the model once under ``torch.utils.flop_counter.FlopCounterMode``,
which already knows the aten matmul and convolution ops; each op is booked to
the innermost module running it. The FLOP formula of the l1fx custom ops is the
layer registry's (:func:`l1fx.layers.l1_flops`, registered when
``l1fx.layers`` is imported), so a plain ``FlopCounterMode`` counts them too.
FlopCounterMode's convention is FLOP = 2 x multiply-accumulate and it ignores
bias; an inner-product FLOP count is therefore split evenly into multiplies and
additions, and the FLOP count of a registered kind's l1 op (2K per output
element) is all additions. See docs/energy.md.

    report = energy_report(model, x)                  # one model
    print(compare(model, l1fx.convert(model), x))     # dense vs l1, with ratios
    python -m l1fx.report --demo                      # command line (l1fx/report.py)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from . import layers
from .layers import lp as lp_layers
from ._util import as_input_tuple, evaluating
from .errors import L1fxError, UsageError

__all__ = [
    "energy_report", "compare", "op_costs", "EnergyReport", "Comparison", "LayerRow",
    "HOROWITZ_45NM_PJ", "SKYLAKE_LATENCY_CYCLES", "ReportError",
]

# The l1 ops' FLOP formula is the registry's; registering is idempotent (only what is missing).
layers.register_l1_flop_formulas()


class ReportError(L1fxError, RuntimeError):
    """Running the model to count its operations failed; the message names the model and the input shapes."""

# Energy per scalar operation in picojoules, 45 nm, from M. Horowitz,
# "Computing's energy problem (and what we can do about it)", ISSCC 2014.
HOROWITZ_45NM_PJ: dict[str, dict[str, float]] = {
    "fp32": {"add": 0.9, "mul": 3.7},
    "fp16": {"add": 0.4, "mul": 1.1},
    "int32": {"add": 0.1, "mul": 3.1},
    "int8": {"add": 0.03, "mul": 0.2},
}

# Latency in cycles of one scalar add / multiply on Intel Skylake, from A. Fog,
# "Instruction tables" (Skylake section): ADDSS/MULSS 4/4, integer ADD/IMUL r32 1/3.
# Only the precisions with a scalar instruction on that core are listed; see docs/energy.md.
SKYLAKE_LATENCY_CYCLES: dict[str, dict[str, float]] = {
    "fp32": {"add": 4, "mul": 4},
    "int32": {"add": 1, "mul": 3},
}

# ---------------------------------------------------------------- report objects
@dataclass
class LayerRow:
    """Forward-pass cost of one module (ops of its own, not of its children)."""

    name: str
    type: str
    multiplies: int
    additions: int
    parameters: int
    energy: float  # pJ
    cycles: Optional[float] = None


@dataclass
class EnergyReport:
    layers: list[LayerRow]
    total: dict[str, Any]
    precision: str
    costs: dict[str, float]  # pJ per "add" / "mul"
    latency: Optional[dict[str, float]] = None  # cycles per "add" / "mul"
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "costs_pJ": self.costs, "latency_cycles": self.latency,
                "input_shapes": [list(s) for s in self.input_shapes],
                "total": self.total, "layers": [asdict(r) for r in self.layers]}

    def __str__(self) -> str:
        cols = ["Layer", "Type", "Mul", "Add", "Params", "Energy"]
        if self.latency is not None:
            cols.append("Cycles")
        rows = [_row_cells(r, self.latency is not None) for r in self.layers]
        t = self.total
        tot = LayerRow("TOTAL", "", t["mul"], t["add"], t["params"], t["energy_pJ"], t.get("cycles"))
        rows.append(_row_cells(tot, self.latency is not None))
        head = (f"Forward pass on inputs {_shapes_str(self.input_shapes)}, {self.precision} "
                f"(add {self.costs['add']} pJ, mul {self.costs['mul']} pJ"
                + (f"; add {self.latency['add']:g}, mul {self.latency['mul']:g} cycles" if self.latency else "") + ")")
        return head + "\n" + _format_table(cols, rows, footer_rows=1)


@dataclass
class Comparison:
    """Two reports side by side; ``ratio[k] = converted.total[k] / original.total[k]``."""

    original: EnergyReport
    converted: EnergyReport
    ratio: dict[str, Optional[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"original": self.original.as_dict(), "converted": self.converted.as_dict(), "ratio": self.ratio}

    def __str__(self) -> str:
        o, c = self.original, self.converted
        by_name = {r.name: r for r in c.layers}
        names = [r.name for r in o.layers] + [r.name for r in c.layers if r.name not in {x.name for x in o.layers}]
        orig = {r.name: r for r in o.layers}
        rows, hidden = [], 0
        for n in names:
            a, b = orig.get(n), by_name.get(n)
            if not any(r and (r.multiplies or r.additions) for r in (a, b)):
                hidden += 1  # e.g. batch norm: parameters but no counted ops
                continue
            types = _pair_str(a and a.type, b and b.type)
            rows.append([n, types, _count(a and a.multiplies), _count(b and b.multiplies),
                         _count(a and a.additions), _count(b and b.additions),
                         _energy(a and a.energy), _energy(b and b.energy)])
        rows.append(["TOTAL", "", _count(o.total["mul"]), _count(c.total["mul"]), _count(o.total["add"]),
                     _count(c.total["add"]), _energy(o.total["energy_pJ"]), _energy(c.total["energy_pJ"])])
        cols = ["Layer", "Type", "Mul", "Mul (l1)", "Add", "Add (l1)", "Energy", "Energy (l1)"]
        table = _format_table(cols, rows, footer_rows=1)
        lines = [f"Original vs converted, forward pass on inputs {_shapes_str(o.input_shapes)}, {o.precision} "
                 f"(add {o.costs['add']} pJ, mul {o.costs['mul']} pJ)", table]
        if hidden:
            lines.append(f"({hidden} layers without counted operations not shown, e.g. normalisation)")
        lines.append("")
        e = self.ratio.get("energy_pJ")
        lines.append("Energy: {} -> {}  (converted/original = {}{})".format(
            _energy(o.total["energy_pJ"]), _energy(c.total["energy_pJ"]), _ratio_str(e),
            f", {1 / e:.2f}x less" if e else ""))
        lines.append("Mul: {} -> {}   Add: {} -> {}   Params: {} -> {}".format(
            _count(o.total["mul"]), _count(c.total["mul"]), _count(o.total["add"]), _count(c.total["add"]),
            _count(o.total["params"]), _count(c.total["params"])))
        if "cycles" in self.ratio:
            cy = self.ratio["cycles"]
            lines.append("Serial latency: {} -> {} cycles (converted/original = {}; add {:g}, mul {:g} cycles "
                         "per op, no overlap)".format(_count(o.total["cycles"]), _count(c.total["cycles"]),
                                                      _ratio_str(cy), o.latency["add"], o.latency["mul"]))
        return "\n".join(lines)


# ---------------------------------------------------------------- public API
def energy_report(model: nn.Module, example_inputs, *, precision: str = "fp32",
                  table: Optional[Mapping] = None, latency: Optional[Mapping] = None) -> EnergyReport:
    """Count one forward pass of ``model(*example_inputs)`` per layer and price it.

    ``example_inputs``: a tensor or a tuple/list of positional inputs.
    ``precision``: a key of ``table`` (default table: ``HOROWITZ_45NM_PJ``).
    ``table``: either ``{"add": pJ, "mul": pJ}`` or ``{precision: {"add": pJ, "mul": pJ}, ...}``.
    ``latency``: cycles per op in the same two forms (default ``SKYLAKE_LATENCY_CYCLES``,
    which has no entry for fp16/int8: then no cycle column is shown).

    The model runs once in eval mode under ``torch.no_grad()``; its training flags are
    restored and nothing else about it changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"energy_report expects an nn.Module, got {type(model).__name__}")
    costs = _costs(table, precision, HOROWITZ_45NM_PJ, "energy table")
    cycles = _costs(latency, precision, SKYLAKE_LATENCY_CYCLES, "latency table", required=latency is not None)
    args = as_input_tuple(example_inputs)
    own_counts = _count_per_module(model, args)

    modules = dict(model.named_modules())
    seen_params: set[int] = set()
    rows = []
    for name, module in modules.items():
        n_params = 0
        for p in module.parameters(recurse=False):
            if id(p) not in seen_params:  # a shared parameter is counted once, at its first owner
                seen_params.add(id(p))
                n_params += p.numel()
        mul, add = own_counts.pop(name, (0, 0))
        if mul or add or n_params:
            rows.append(_priced_row(name or "(top level)", type(module).__name__, mul, add, n_params, costs, cycles))
    for name, (mul, add) in own_counts.items():  # modules called in forward but not in the model's tree
        rows.append(_priced_row(name, "(outside the model's modules)", mul, add, 0, costs, cycles))

    total = {"mul": sum(r.multiplies for r in rows), "add": sum(r.additions for r in rows),
             "params": sum(r.parameters for r in rows), "energy_pJ": sum(r.energy for r in rows)}
    if cycles is not None:
        total["cycles"] = sum(r.cycles for r in rows)
    label = "custom" if table is not None and _is_flat(table) else precision
    shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)]
    return EnergyReport(rows, total, label, costs, cycles, shapes)


def compare(original: nn.Module, converted: nn.Module, example_inputs, *, precision: str = "fp32",
            table: Optional[Mapping] = None, latency: Optional[Mapping] = None) -> Comparison:
    """Reports of ``original`` and ``converted`` on the same inputs, with converted/original ratios."""
    a = energy_report(original, example_inputs, precision=precision, table=table, latency=latency)
    b = energy_report(converted, example_inputs, precision=precision, table=table, latency=latency)
    keys = [k for k in ("mul", "add", "params", "energy_pJ", "cycles") if k in a.total and k in b.total]
    ratio = {k: (b.total[k] / a.total[k] if a.total[k] else None) for k in keys}
    return Comparison(a, b, ratio)


# ---------------------------------------------------------------- counting
def _count_per_module(model: nn.Module, args: tuple) -> dict[str, tuple[int, int]]:
    """{qualified module name: (multiplies, additions)} of the ops each module runs itself.

    FlopCounterMode dispatches and prices every op; each of its formulas is wrapped
    (through its public ``custom_mapping``) to also book the FLOPs to the innermost
    module running at that moment, tracked by global forward hooks. Booking by module
    identity keeps shared modules and repeated calls exact, which module names
    (FlopCounterMode's own per-module table adds each op to every enclosing name) do not.
    """
    stack: list[nn.Module] = []
    booked: dict[tuple[int, Any, float], int] = {}  # (id(innermost module) or 0, op packet, p) -> FLOPs
    modules_by_id = {0: None}

    def book(packet, formula):
        def counted(*a, out_val=None, **kw):
            flops = formula(*a, out_val=out_val, **kw)
            key = (id(stack[-1]) if stack else 0, packet, lp_layers.p_of_call(packet, a))
            booked[key] = booked.get(key, 0) + flops
            return flops

        counted._get_raw = True  # receives raw args, as the registry's entries do
        return counted

    def push(module, _inputs):
        modules_by_id[id(module)] = module
        stack.append(module)

    def pop(module, _inputs, _output):
        if stack and stack[-1] is module:
            stack.pop()

    counter = FlopCounterMode(display=False, custom_mapping={p: book(p, f) for p, f in flop_registry.items()})
    hooks = [register_module_forward_pre_hook(push), register_module_forward_hook(pop, always_call=True)]
    try:
        # Inference cost (eval also keeps batch-norm running stats untouched); train flags restored after.
        with evaluating(model), counter:
            model(*args)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
        raise ReportError(f"energy_report: running {type(model).__name__} on the example inputs {shapes} "
                           f"failed with {type(e).__name__}: {e}") from e
    finally:
        for h in hooks:
            h.remove()

    names = {id(m): n for n, m in model.named_modules()}  # a shared module: its first name
    own: dict[str, tuple[int, int]] = {}
    for (mod_id, packet, p), flops in booked.items():
        if mod_id == 0:
            name = "(outside any module)"
        else:
            name = names.get(mod_id, f"({type(modules_by_id[mod_id]).__name__} outside the model)")
        mul, add = _split(packet, flops, p)
        old = own.get(name, (0, 0))
        own[name] = (old[0] + mul, old[1] + add)
    return own


def _split(packet, flops: int, p: float = 1.0) -> tuple[int, int]:
    """FLOPs of one op -> (multiplies, additions); ``p``: the norm of an ℓp op (1 for every other op)."""
    if p != 1.0:  # an ℓp op: what each of its "MACs" (flops // 2) costs, l1fx.layers.lp.ops_per_element
        mul, add = lp_layers.ops_per_element(p)
        return (flops // 2) * mul, (flops // 2) * add
    if layers.spec_for_l1_op(packet) is not None:
        return 0, flops  # a registered kind's l1 op: K subtractions + K accumulations, all additions
    # FlopCounterMode's formulas count 2 per multiply-accumulate.
    return flops // 2, flops - flops // 2


def _priced_row(name, type_, mul, add, params, costs, cycles) -> LayerRow:
    return LayerRow(name, type_, mul, add, params, mul * costs["mul"] + add * costs["add"],
                    None if cycles is None else mul * cycles["mul"] + add * cycles["add"])


def op_costs(table: Optional[Mapping] = None, precision: str = "fp32") -> dict[str, float]:
    """``{"add": pJ, "mul": pJ}`` that :func:`energy_report` uses for ``table``/``precision``; UsageError if invalid.

    (The command line checks its ``--table``/``--precision`` with it before the slower conversion.)
    """
    return _costs(table, precision, HOROWITZ_45NM_PJ, "energy table")


def _is_flat(table: Mapping) -> bool:
    return set(table) == {"add", "mul"}


def _costs(table, precision, default, what, required=True) -> Optional[dict[str, float]]:
    """Per-op costs for ``precision`` from a flat ``{add, mul}`` or a per-precision table."""
    if table is None:
        table = default
    if not isinstance(table, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(table).__name__}")
    if _is_flat(table):
        entry = table
    elif "add" in table or "mul" in table:
        raise UsageError(f"a flat {what} needs both 'add' and 'mul' costs, got keys {sorted(table)}")
    else:
        if not isinstance(precision, str) or precision not in table:
            if not required:
                return None
            raise UsageError(f"unknown precision {precision!r} for the {what}; known: {', '.join(map(str, table))}"
                             " (or pass table={'add': pJ, 'mul': pJ})")
        entry = table[precision]
    if not isinstance(entry, Mapping) or set(entry) != {"add", "mul"}:
        raise UsageError(f"{what} entry for {precision!r} must be {{'add': number, 'mul': number}}, got {entry!r}")
    out = {}
    for op in ("add", "mul"):
        v = entry[op]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"{what}: cost of {op!r} at {precision!r} must be a finite number >= 0, got {v!r}")
        out[op] = float(v)
    return out


# ---------------------------------------------------------------- formatting
def _count(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _energy(pj) -> str:
    if pj is None:
        return "-"
    joules = pj * 1e-12
    for scale, unit in ((1, "J"), (1e-3, "mJ"), (1e-6, "uJ"), (1e-9, "nJ")):
        if abs(joules) >= scale:
            return f"{joules / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def _shapes_str(shapes) -> str:
    return ", ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes) or "(none)"


def _ratio_str(r) -> str:
    return "-" if r is None else f"{r:.3f}"


def _pair_str(a, b) -> str:
    if a == b:
        return a or ""
    return f"{a or '-'} -> {b or '-'}"


def _row_cells(r: LayerRow, with_cycles: bool) -> list[str]:
    cells = [r.name, r.type, _count(r.multiplies), _count(r.additions), _count(r.parameters), _energy(r.energy)]
    if with_cycles:
        cells.append(_count(r.cycles))
    return cells


def _format_table(cols: list[str], rows: list[list[str]], footer_rows: int = 0) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells):  # first two columns are text (left), the rest numbers (right)
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [line(r) for r in rows[:len(rows) - footer_rows]]
    foot = [line(r) for r in rows[len(rows) - footer_rows:]]
    return "\n".join([line(cols), rule, *body, *([rule] + foot if foot else [])])
