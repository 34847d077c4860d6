"""``python -m l1fx.report``: the op-count and energy report on the command line.

The library is :mod:`l1fx.energy` (cost tables, counting, report objects,
:func:`~l1fx.energy.energy_report`, :func:`~l1fx.energy.compare`); its public
names are re-exported here, so ``from l1fx.report import energy_report`` keeps
working. This module adds the command line and the small demo model of
``--demo``. See docs/energy.md.

    python -m l1fx.report --demo
    python -m l1fx.report models/pointnet.py:PointNetCls --input-shape 2,3,1024 --ratio 0.667
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import _cli
from ._cli import CLIError, build_model, json_object, parse_shape
from .energy import (  # noqa: F401  (re-exported: the library's names, as before the split)
    HOROWITZ_45NM_PJ, SKYLAKE_LATENCY_CYCLES, Comparison, EnergyReport, LayerRow, ReportError, compare,
    energy_report, op_costs,
)

__all__ = [
    "energy_report", "compare", "EnergyReport", "Comparison", "LayerRow",
    "HOROWITZ_45NM_PJ", "SKYLAKE_LATENCY_CYCLES", "ReportError", "DemoPointNet", "main",
]


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
    p = _cli.ArgumentParser(
        prog="python -m l1fx.report",
        description="Count the multiplies and additions of a model and of its l1 conversion (l1fx.convert)\n"
                    "and compare their energy (Horowitz, ISSCC 2014, 45 nm) and serial latency.\n"
                    "Exit status: 0 ok, 1 the conversion failed, 2 a bad argument, input or output path.",
        epilog="examples:\n  python -m l1fx.report --demo\n"
               "  python -m l1fx.report models/pointnet.py:PointNetCls --input-shape 2,3,1024 --ratio 0.667\n"
               "  python -m l1fx.report mypkg.nets:make_net --model-kwargs '{\"k\": 20}' --input-shape 1,3,512 "
               "--precision fp16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _cli.add_model_arguments(p, optional=True)
    p.add_argument("--demo", action="store_true", help="use the bundled small PointNet on a [2, 3, 1024] cloud")
    _cli.add_input_arguments(p)
    _cli.add_selection_arguments(p, what="layer units")
    _cli.add_output_argument(p, required=False, help="write the report to this file instead of stdout")
    p.add_argument("--precision", default="fp32", help=f"one of {', '.join(HOROWITZ_45NM_PJ)} or a key of --table")
    p.add_argument("--table", help="JSON energy table: {\"add\": pJ, \"mul\": pJ} or {precision: {...}}")
    p.add_argument("--layers", action="store_true", help="also print each model's per-layer report")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of tables")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's initialisation and the inputs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 conversion failed, 2 usage)."""
    return _cli.run_cli("l1fx.report", lambda a: _run(_parser().parse_args(a)), argv)


def _run(args) -> int:
    if args.demo == bool(args.model):
        raise CLIError("give a model (file.py:ClassName) or --demo, not both and not neither")
    torch.manual_seed(args.seed)
    if args.demo:
        model, shapes = DemoPointNet(), [parse_shape(s) for s in args.input_shape] or [(2, 3, 1024)]
    else:
        kwargs = json_object(args.model_kwargs, "--model-kwargs")
        if not args.input_shape:
            raise CLIError("--input-shape is required with a model (e.g. --input-shape 2,3,1024)")
        shapes = [parse_shape(s) for s in args.input_shape]
        model = build_model(args.model, kwargs)
    table = json_object(args.table, "--table") if args.table else None
    # Validate the precision/table and the output path before the (slower) conversion.
    try:
        op_costs(table, args.precision)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    if args.output:
        _cli.check_output_path(Path(args.output), "--output")
    inputs = tuple(torch.randn(s) for s in shapes)
    _cli.check_inputs(model, inputs, "--input-shape")
    converted = _cli.convert_model(model, args, inputs)
    result = compare(model, converted, inputs, precision=args.precision, table=table)
    if args.json:
        text = json.dumps(result.as_dict(), indent=2) + "\n"
    else:
        parts = [str(result.original), str(result.converted)] if args.layers else []
        text = "\n\n".join(parts + [str(result)]) + "\n"
    if args.output:
        _cli.write_text_atomic(args.output, text, "--output")
    else:
        _cli.write_stdout(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
