"""``python -m l1fx.export``: build a model, convert it with :func:`l1fx.convert`, export it to verified ONNX.

The library is :mod:`l1fx.onnx_export` (``export_onnx``, verification, the
error explanations); its public names are re-exported here, so
``from l1fx.export import export_onnx, ExportResult, OnnxExportError`` keeps
working. This module adds the command line: building the model, ``--inputs``
files and ``--checkpoint`` loading. ::

    python -m l1fx.export models/pointnet.py:PointNetCls --input-shape 2,3,1024 -o pointnet_l1.onnx
    python -m l1fx.export mypkg.models:build --model-kwargs '{"k": 10}' --input-shape 2,3,1024 \\
        --ratio 0.67 --checkpoint dense.pt -o model.onnx

See docs/onnx.md.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import _cli
from ._cli import CLIError, build_model, json_object, parse_shape
from ._util import as_input_tuple
from .onnx_export import (  # noqa: F401  (re-exported: the library's names, as before the split)
    DEFAULT_RTOL, ConstantOutputWarning, ExportResult, NondeterministicModelError, OnnxExportError, OnnxInputError,
    OnnxPathError, OnnxVerificationError, batch_variant, check_input_sizes, compare_outputs, export_onnx,
    verify_onnx,
)

__all__ = ["export_onnx", "ExportResult", "OnnxExportError", "OnnxVerificationError", "NondeterministicModelError",
           "OnnxInputError", "OnnxPathError", "ConstantOutputWarning", "main"]


# ---------------------------------------------------------------- command line
def _build_parser() -> argparse.ArgumentParser:
    ap = _cli.ArgumentParser(
        prog="python -m l1fx.export",
        description="Build a model, convert it to l1 layers with l1fx.convert and export it to ONNX, verified "
                    "in onnxruntime against PyTorch (see docs/onnx.md). Exit status: 0 written, 1 the export or "
                    "its verification failed, 2 a bad argument, input or output path (nothing written).",
        epilog="example: python -m l1fx.export models/pointnet.py:PointNetCls --input-shape 2,3,1024 "
               "--ratio 0.67 -o pointnet_l1.onnx")
    _cli.add_model_arguments(ap)
    _cli.add_output_argument(ap, required=True, help="ONNX file to write (its directory must exist)")
    inputs = ap.add_mutually_exclusive_group(required=True)
    _cli.add_input_arguments(inputs)
    inputs.add_argument("--inputs", metavar="FILE.pt", help="torch.save'd tensor or tuple of tensors to use as "
                                                           "example inputs")
    ap.add_argument("--checkpoint", metavar="FILE.pt", help="state_dict to load before converting (a dense or an "
                                                            "l1fx checkpoint: parameter names are the same)")
    _cli.add_selection_arguments(ap)
    ap.add_argument("--no-convert", action="store_true", help="export the model as built (already l1, or dense)")
    ap.add_argument("--static-batch", action="store_true", help="fix the batch size (default: dynamic dim 0)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ap.add_argument("--standard-ops", action="store_true",
                    help="inline the l1 ops into standard ONNX ops (no l1fx domain in the file)")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    ap.add_argument("--allow-nondeterministic", action="store_true",
                    help="export a model with random ops in eval mode (only output shapes are checked)")
    ap.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"verification tolerance (default {DEFAULT_RTOL})")
    ap.add_argument("--seed", type=int, default=0, help="seed for model init and random inputs (default 0)")
    return ap


def _cli_inputs(args) -> tuple[Tensor, ...]:
    if args.inputs:
        try:
            loaded = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"cannot load --inputs {args.inputs}: {e}") from e
        try:
            return as_input_tuple(loaded, "the loaded object", tensors_only=True)
        except TypeError as e:
            raise CLIError(f"--inputs {args.inputs}: {e}") from None
    return tuple(torch.randn(parse_shape(s)) for s in args.input_shape)


def _load_checkpoint(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"loading --checkpoint {path} failed: {e}") from e
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_into(model: nn.Module, state: dict, path: str, what: str) -> None:
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"loading --checkpoint {path} into the {what} model failed: {e}") from e


def _cli_model(args, inputs) -> nn.Module:
    """Build, check the inputs, convert (unless --no-convert) and load the checkpoint where its keys fit.

    A dense checkpoint has the model's own keys and is loaded before conversion;
    a checkpoint of a converted model also has the inserted ``*.l1fx_norm.*``
    entries, so it is loaded into the converted model.
    """
    model = build_model(args.model, json_object(args.model_kwargs, "--model-kwargs"))
    state = _load_checkpoint(args.checkpoint) if args.checkpoint else None
    dense_keys = set(model.state_dict())
    if state is not None and (args.no_convert or set(state) == dense_keys):
        _load_into(model, state, args.checkpoint, "dense" if not args.no_convert else "")
        state = None
    _cli.check_inputs(model, inputs, f"--inputs {args.inputs}" if args.inputs else "--input-shape")
    if not args.no_convert:
        model = _cli.convert_model(model, args, inputs)
        if state is not None:
            ratio = 1.0 if args.ratio is None else args.ratio
            _load_into(model, state, args.checkpoint, f"converted (ratio={ratio})")
    return model


def _main(argv) -> int:
    args = _build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    inputs = _cli_inputs(args)
    check_input_sizes(inputs, not args.static_batch)  # before building and converting the model
    model = _cli_model(args, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantOutputWarning)  # the summary says it
        result = export_onnx(model, inputs, args.output, dynamic_batch=not args.static_batch, opset=args.opset,
                             custom_op=not args.standard_ops, verify=not args.no_verify, rtol=args.rtol,
                             allow_nondeterministic=args.allow_nondeterministic)
    _cli.write_stdout(result.summary() + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 export/verification failed, 2 usage)."""
    return _cli.run_cli("l1fx.export", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
