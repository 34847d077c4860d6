"""Operation counts, energy and latency estimates for dense and l1 models.

The paper's case for l1 networks is arithmetic cost: an inner-product output
element costs K multiplies and K additions, an l1 output element K
subtractions and K accumulations and no multiply (``|.|`` clears a sign bit).
This module counts those operations per layer for one forward pass and turns
them into energy with a per-operation table (Horowitz, ISSCC 2014, 45 nm by
default) and, optionally, into a serial latency in cycles.

Counting runs the model once under ``torch.utils.flop_counter.FlopCounterMode``,
which already knows the aten matmul and convolution ops; each op is booked to
the innermost module running it. This module registers formulas for the l1fx
custom ops, so a plain ``FlopCounterMode`` counts them too. FlopCounterMode's convention is
FLOP = 2 x multiply-accumulate and it ignores bias; an inner-product FLOP
count is therefore split evenly into multiplies and additions, and an l1
FLOP count (2K per output element) is all additions. See docs/energy.md.

    report = energy_report(model, x)                  # one model
    print(compare(model, l1fx.convert(model), x))     # dense vs l1, with ratios
    python -m l1fx.report --demo                      # command line
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

from . import ops as _ops  # noqa: F401  (registers torch.ops.l1fx.*)
from ._cli import CLIError, build_model, json_object, parse_shape

__all__ = [
    "energy_report", "compare", "EnergyReport", "Comparison", "LayerRow",
    "HOROWITZ_45NM_PJ", "SKYLAKE_LATENCY_CYCLES", "main",
]

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

_L1_OPS = (torch.ops.l1fx.linear, torch.ops.l1fx.conv)


# ---------------------------------------------------------------- FLOP formulas for the l1 ops
def _l1_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """Both l1 ops take ``(x, weight, ...)``: per output element K subtractions + K accumulations,
    K = weight[0].numel() (in_features, or in_channels/groups * prod(kernel)). The bias add is
    absorbed in the accumulator's initial value, as FlopCounterMode does for dense layers."""
    return 2 * math.prod(out_shape) * math.prod(w_shape[1:])


# `python -m l1fx.report` or importlib.reload may run this module twice: register once.
_new = [p for p in _L1_OPS if p not in flop_registry]
if _new:
    register_flop_formula(_new)(_l1_flop)


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
    args = _as_args(example_inputs)
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
def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple/list of positional inputs, "
                    f"got {type(example_inputs).__name__}")


def _count_per_module(model: nn.Module, args: tuple) -> dict[str, tuple[int, int]]:
    """{qualified module name: (multiplies, additions)} of the ops each module runs itself.

    FlopCounterMode dispatches and prices every op; each of its formulas is wrapped
    (through its public ``custom_mapping``) to also book the FLOPs to the innermost
    module running at that moment, tracked by global forward hooks. Booking by module
    identity keeps shared modules and repeated calls exact, which module names
    (FlopCounterMode's own per-module table adds each op to every enclosing name) do not.
    """
    stack: list[nn.Module] = []
    booked: dict[tuple[int, Any], int] = {}  # (id(innermost module) or 0, op packet) -> FLOPs
    modules_by_id = {0: None}

    def book(packet, formula):
        def counted(*a, out_val=None, **kw):
            flops = formula(*a, out_val=out_val, **kw)
            key = (id(stack[-1]) if stack else 0, packet)
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
    training = {m: m.training for m in model.modules()}
    hooks = [register_module_forward_pre_hook(push), register_module_forward_hook(pop, always_call=True)]
    try:
        model.eval()  # inference cost; also keeps batch-norm running stats untouched
        with torch.no_grad(), counter:
            model(*args)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
        raise RuntimeError(f"energy_report: running {type(model).__name__} on the example inputs {shapes} "
                           f"failed with {type(e).__name__}: {e}") from e
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag

    names = {id(m): n for n, m in model.named_modules()}  # a shared module: its first name
    own: dict[str, tuple[int, int]] = {}
    for (mod_id, packet), flops in booked.items():
        if mod_id == 0:
            name = "(outside any module)"
        else:
            name = names.get(mod_id, f"({type(modules_by_id[mod_id]).__name__} outside the model)")
        mul, add = _split(packet, flops)
        old = own.get(name, (0, 0))
        own[name] = (old[0] + mul, old[1] + add)
    return own


def _split(packet, flops: int) -> tuple[int, int]:
    """FLOPs of one op -> (multiplies, additions)."""
    if packet in _L1_OPS:
        return 0, flops  # K subtractions + K accumulations, all additions
    # FlopCounterMode's formulas count 2 per multiply-accumulate.
    return flops // 2, flops - flops // 2

def _priced_row(name, type_, mul, add, params, costs, cycles) -> LayerRow:
    return LayerRow(name, type_, mul, add, params, mul * costs["mul"] + add * costs["add"],
                    None if cycles is None else mul * cycles["mul"] + add * cycles["add"])


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
        raise ValueError(f"a flat {what} needs both 'add' and 'mul' costs, got keys {sorted(table)}")
    else:
        if not isinstance(precision, str) or precision not in table:
            if not required:
                return None
            raise ValueError(f"unknown precision {precision!r} for the {what}; known: {', '.join(map(str, table))}"
                             " (or pass table={'add': pJ, 'mul': pJ})")
        entry = table[precision]
    if not isinstance(entry, Mapping) or set(entry) != {"add", "mul"}:
        raise ValueError(f"{what} entry for {precision!r} must be {{'add': number, 'mul': number}}, got {entry!r}")
    out = {}
    for op in ("add", "mul"):
        v = entry[op]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}: cost of {op!r} at {precision!r} must be a finite number >= 0, got {v!r}")
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


# ---------------------------------------------------------------- bundled demo model
class DemoPointNet(nn.Module):
    """A small PointNet classifier (shared MLP 3-64-128-256, max pool, MLP head) for ``--demo``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths = [3, 64, 128, 256]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, points: Tensor) -> Tensor:  # [B, 3, N] -> [B, num_classes]
        return self.head(self.features(points).amax(dim=2))


# ---------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m l1fx.report",
        description="Count the multiplies and additions of a model and of its l1 conversion (l1fx.convert)\n"
                    "and compare their energy (Horowitz, ISSCC 2014, 45 nm) and serial latency.",
        epilog="examples:\n  python -m l1fx.report --demo\n"
               "  python -m l1fx.report models/pointnet.py:PointNetCls --input-shape 2,3,1024 --ratio 0.667\n"
               "  python -m l1fx.report mypkg.nets:make_net --kwargs '{\"k\": 20}' --input-shape 1,3,512 --precision fp16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="file.py:ClassName or package.module:ClassName (class, factory or instance)")
    p.add_argument("--demo", action="store_true", help="use the bundled small PointNet on a [2, 3, 1024] cloud")
    p.add_argument("--input-shape", action="append", default=[], metavar="D0,D1,...",
                   help="shape of a random float32 input; repeat for several positional inputs")
    p.add_argument("--kwargs", default="{}", help="JSON object of constructor keyword arguments")
    p.add_argument("--ratio", type=float, default=1.0, help="fraction of layer units to convert (default 1.0)")
    p.add_argument("--precision", default="fp32", help=f"one of {', '.join(HOROWITZ_45NM_PJ)} or a key of --table")
    p.add_argument("--table", help="JSON energy table: {\"add\": pJ, \"mul\": pJ} or {precision: {...}}")
    p.add_argument("--layers", action="store_true", help="also print each model's per-layer report")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of tables")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's initialisation and the inputs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CLIError as e:
        print(f"l1fx.report: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.demo == bool(args.model):
        raise CLIError("give a model (file.py:ClassName) or --demo, not both and not neither")
    torch.manual_seed(args.seed)
    if args.demo:
        model, shapes = DemoPointNet(), [parse_shape(s) for s in args.input_shape] or [(2, 3, 1024)]
    else:
        kwargs = json_object(args.kwargs, "--kwargs")
        if not args.input_shape:
            raise CLIError("--input-shape is required with a model (e.g. --input-shape 2,3,1024)")
        model, shapes = build_model(args.model, kwargs), [parse_shape(s) for s in args.input_shape]
    table = json_object(args.table, "--table") if args.table else None
    inputs = tuple(torch.randn(s) for s in shapes)
    # Validate the precision/table before the (slower) conversion.
    try:
        _costs(table, args.precision, HOROWITZ_45NM_PJ, "energy table")
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    if not 0.0 <= args.ratio <= 1.0:
        raise CLIError(f"--ratio must be in [0, 1], got {args.ratio}")
    try:
        from l1fx.convert import convert
    except ImportError as e:
        raise CLIError(f"l1fx.convert is not available ({e})") from e
    converted = convert(model, args.ratio, example_inputs=inputs)
    result = compare(model, converted, inputs, precision=args.precision, table=table)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    if args.layers:
        print(result.original, end="\n\n")
        print(result.converted, end="\n\n")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
