"""Export l1fx models to ONNX, verified against PyTorch before the file appears.

``export_onnx(model, example_inputs, path)`` runs ``torch.onnx.export``
(the torch.export-based exporter) with a translation that turns every l1 op
into one node of the ``l1fx`` domain (``L1Linear``, ``L1Conv``), appends the
ops' definitions as model-local ONNX functions so plain onnxruntime runs the
file (see :mod:`l1fx.onnx_ops`), checks the model with
``onnx.checker.check_model(full_check=True)`` and, with ``verify=True``, runs
it in onnxruntime on the example inputs and on a different batch size and
compares with PyTorch. The file is written to a temporary name in the
destination directory and renamed only when everything passed, so an error
never leaves a partial or silently wrong file.

Command line (builds the model, converts it with :func:`l1fx.convert.convert`, exports)::

    python -m l1fx.export models/pointnet.py:PointNetCls --input-shape 2,3,1024 -o pointnet_l1.onnx
    python -m l1fx.export mypkg.models:build --model-kwargs '{"k": 10}' --input-shape 2,3,1024 \\
        --ratio 0.67 --checkpoint dense.pt -o model.onnx

See docs/onnx.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ._cli import CLIError, build_model, json_object, parse_shape

__all__ = ["export_onnx", "ExportResult", "OnnxExportError", "OnnxVerificationError", "main"]

DEFAULT_RTOL = 1e-4


class OnnxExportError(RuntimeError):
    """The model could not be exported; the message says what failed and what to do."""


class OnnxVerificationError(OnnxExportError):
    """onnxruntime's output differs from PyTorch's (or is NaN/inf where PyTorch's is finite)."""

    def __init__(self, message: str, *, max_abs_diff: float, max_rel_diff: float, output: int, batch: int):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.max_rel_diff = max_rel_diff
        self.output = output
        self.batch = batch


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and checked."""

    path: Path
    opset: int
    custom_op: bool
    l1_nodes: dict[str, int]              # l1fx op type -> node count (empty when custom_op=False)
    verified_batches: tuple[int, ...] = ()  # batch sizes run in onnxruntime and compared
    max_rel_error: Optional[float] = None   # largest relative difference seen (None: not verified)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        nodes = ", ".join(f"{n} x{c}" for n, c in sorted(self.l1_nodes.items())) or "none"
        lines = [f"wrote {self.path} (opset {self.opset}, l1fx nodes: {nodes})"]
        if self.verified_batches:
            lines.append(f"verified in onnxruntime at batch sizes {list(self.verified_batches)}: "
                         f"max relative error {self.max_rel_error:.2e}")
        else:
            lines.append("not verified (verify=False)")
        return "\n".join(lines + self.notes)


# ---------------------------------------------------------------- input checks
def _as_input_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(
            f"export_onnx: example_inputs must be a tensor or a tuple of tensors (the positional arguments "
            f"of model.forward), got {type(example_inputs).__name__}"
        )
    for i, t in enumerate(example_inputs):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"export_onnx: example_inputs[{i}] is a {type(t).__name__}, not a tensor; pass only tensors "
                f"(fix other forward arguments with functools.partial or a wrapper module)"
            )
    if not example_inputs:
        raise TypeError("export_onnx: example_inputs is empty; pass the tensors model.forward takes")
    return tuple(example_inputs)


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)


def _reserve_temp(path: Path) -> Path:
    """Create the temporary output file now, so an unwritable destination fails before the slow export."""
    if path.exists() and path.is_dir():
        raise OnnxExportError(f"export_onnx: {path} is a directory; pass a file path such as {path / 'model.onnx'}")
    parent = path.parent
    if not parent.is_dir():
        raise OnnxExportError(f"export_onnx: directory {parent} does not exist; create it or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise OnnxExportError(f"export_onnx: cannot write to {parent} ({e.strerror}); choose a writable path") from e
    os.close(fd)
    # mkstemp creates the file 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Export the inference graph (dropout off, batch-norm running stats), then restore each module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _tensor_leaves(out: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _run_torch(model: nn.Module, inputs: tuple[Tensor, ...], what: str) -> list[Tensor]:
    try:
        with torch.no_grad():
            return [t.detach() for t in _tensor_leaves(model(*inputs))]
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise OnnxExportError(
            f"export_onnx: {type(model).__name__}(*{what}) raised {type(e).__name__}: {e}\n"
            f"  example inputs: {_shapes(inputs)}\n"
            f"  pass example_inputs that model.forward accepts (a tuple of its positional tensor arguments)"
        ) from e


# ---------------------------------------------------------------- export
def _dynamic_shapes(inputs: tuple[Tensor, ...], dynamic_batch: bool):
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if t.dim() > 0 else None for t in inputs)


def _summarize(text: str, max_lines: int = 14) -> str:
    """The informative part of a torch.export / torch.onnx error (its exception summary), without colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
        text = re.split(r"\n## |\nThe error above occurred", text, maxsplit=1)[0]
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[:max_lines] + (["..."] if len(lines) > max_lines else []))


def _explain_export_failure(model: nn.Module, e: Exception, dynamic_batch: bool) -> str:
    text = f"{type(e).__name__}: {e}"
    cause = None if "## Exception summary" in text else e.__cause__
    while cause is not None:
        text += f"\ncaused by {type(cause).__name__}: {cause}"
        cause = cause.__cause__
    low = text.lower()
    hints = []
    if "data-dependent" in low or "data dependent" in low:
        hints.append("the forward branches on tensor values (e.g. `.item()` in an `if`, or a shape that depends "
                     "on the data); an ONNX graph cannot: replace it with tensor ops (torch.where, torch.clamp) "
                     "or move it out of forward")
    elif dynamic_batch and ("specializ" in low or "constraints violated" in low):
        hints.append("the forward treats the batch size as a constant (e.g. a Python loop over the batch, or "
                     "a shape checked with `if`); export with dynamic_batch=False (CLI: --static-batch) "
                     "or rewrite that code with batched tensor ops")
    if "no onnx function" in low or "unsupported" in low:
        hints.append("an operator has no ONNX translation; replace it, or register one through "
                     "torch.onnx.export's custom_translation_table")
    if not hints:
        hints.append("make the forward exportable with torch.export.export(model, example_inputs) first")
    return (f"export_onnx: torch.onnx.export could not export {type(model).__name__}:\n    {_summarize(text)}"
            + "".join(f"\n  what to do: {h}" for h in hints))


def _torch_export(model, inputs, dynamic_batch, opset, table):
    import warnings

    kwargs = dict(dynamo=True, custom_translation_table=table, dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch),
                  optimize=True, verbose=False, external_data=False)
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    # The exporter prints progress lines, graphs and warnings (through print, warnings and
    # logging, e.g. "torchvision is not installed"); its errors carry what matters.
    log = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, inputs, **kwargs)
    finally:
        onnx_logger.setLevel(level)
    return program.model_proto


def _default_opset(model_proto) -> int:
    return next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))


def _finish_model(model_proto, custom_op: bool, chunk_bytes: Optional[int]):
    """Attach the l1fx function definitions, or inline them into standard ops."""
    import onnx
    import onnx.inliner

    from . import onnx_ops

    opset = _default_opset(model_proto)
    uses_l1 = any(n.domain == onnx_ops.DOMAIN for n in model_proto.graph.node)
    if uses_l1:
        model_proto.functions.extend(onnx_ops.functions(opset, chunk_bytes))
    if not custom_op:
        if uses_l1:
            model_proto = onnx.inliner.inline_local_functions(model_proto)
        del_ops = [o for o in model_proto.opset_import if o.domain == onnx_ops.DOMAIN]
        for o in del_ops:
            model_proto.opset_import.remove(o)
        left = {n.domain for n in model_proto.graph.node} - {"", "ai.onnx"}
        if left:
            raise OnnxExportError(f"export_onnx: custom_op=False but the graph still uses domains {sorted(left)}")
    else:
        if uses_l1 and not any(o.domain == onnx_ops.DOMAIN for o in model_proto.opset_import):
            model_proto.opset_import.append(onnx.helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION))
    from . import __version__

    onnx.helper.set_model_props(model_proto, {"l1fx.version": __version__, "l1fx.custom_op": str(bool(custom_op))})
    return model_proto, opset


def _count_l1_nodes(model_proto) -> dict[str, int]:
    from . import onnx_ops

    counts: dict[str, int] = {}
    for n in model_proto.graph.node:
        if n.domain == onnx_ops.DOMAIN:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------- verification
def batch_variant(inputs: tuple[Tensor, ...], batch: int) -> tuple[Tensor, ...]:
    """The inputs at another batch size: samples repeated cyclically along dim 0."""
    out = []
    for t in inputs:
        if t.dim() == 0:
            out.append(t)
            continue
        idx = torch.arange(batch, device=t.device) % max(t.shape[0], 1)
        out.append(t[idx])
    return tuple(out)


def _other_batch(batch: int) -> int:
    return 3 if batch != 3 else 2


def compare_outputs(got: Sequence, want: Sequence[Tensor], rtol: float, *, batch: int, where: str) -> float:
    """Largest relative error ``max|got - want| / max|want|`` over the outputs; raises past ``rtol``."""
    import numpy as np

    if len(got) != len(want):
        raise OnnxVerificationError(
            f"export_onnx: onnxruntime returned {len(got)} outputs but PyTorch {len(want)} ({where})",
            max_abs_diff=math.inf, max_rel_diff=math.inf, output=-1, batch=batch)
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        w = w.cpu().numpy() if w.dtype != torch.bfloat16 else w.float().cpu().numpy()
        g = np.asarray(g)
        if g.shape != w.shape:
            raise OnnxVerificationError(
                f"export_onnx: output {i} has shape {g.shape} in onnxruntime but {w.shape} in PyTorch ({where})",
                max_abs_diff=math.inf, max_rel_diff=math.inf, output=i, batch=batch)
        if not np.issubdtype(w.dtype, np.floating):
            bad = int((g != w).sum())
            if bad:
                raise OnnxVerificationError(
                    f"export_onnx: output {i} ({w.dtype}) differs from PyTorch in {bad} of {w.size} entries ({where})",
                    max_abs_diff=math.inf, max_rel_diff=math.inf, output=i, batch=batch)
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        finite_w = np.isfinite(w64)
        nonfinite_g = ~np.isfinite(g64) & finite_w
        if nonfinite_g.any() or not np.array_equal(np.isnan(g64), np.isnan(w64)):
            n_bad = int(nonfinite_g.sum())
            raise OnnxVerificationError(
                f"export_onnx: onnxruntime output {i} has {n_bad} NaN/inf entries where PyTorch's is finite "
                f"({where}); the exported graph is wrong for these inputs (a known cause: index arithmetic such "
                f"as ball-query/gather patterns that torch.onnx translates incorrectly). The file was not written.",
                max_abs_diff=math.inf, max_rel_diff=math.inf, output=i, batch=batch)
        if not finite_w.any():
            continue
        diff = np.abs(g64[finite_w] - w64[finite_w])
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(w64[finite_w]).max()) if diff.size else 0.0
        rel = max_abs / scale if scale > 0 else max_abs
        worst = max(worst, rel)
        if rel > rtol:
            raise OnnxVerificationError(
                f"export_onnx: onnxruntime output {i} differs from PyTorch ({where}): largest difference "
                f"{max_abs:.3e} (relative {rel:.3e} of max |output| {scale:.3e}, tolerance {rtol:.0e}). "
                f"The file was not written.",
                max_abs_diff=max_abs, max_rel_diff=rel, output=i, batch=batch)
    return worst


def _check_deterministic(model: nn.Module, inputs: tuple[Tensor, ...], reference: list[Tensor]) -> None:
    """A second PyTorch run (other random numbers, same inputs) must agree, or nothing can be verified."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        torch.manual_seed(torch.initial_seed() + 1)
        again = _run_torch(model, inputs, "example_inputs")
    for i, (a, b) in enumerate(zip(again, reference)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=0.0, equal_nan=True):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else math.inf
            raise OnnxExportError(
                f"export_onnx: {type(model).__name__} is not deterministic: two PyTorch runs in eval mode on the "
                f"same example inputs differ (output {i}, largest difference {diff:.3e}), so onnxruntime cannot be "
                f"checked against it. A usual cause is random sampling in forward (torch.randint/torch.rand, e.g. "
                f"a random farthest-point-sampling start). What to do: make forward deterministic in eval mode "
                f"(e.g. start sampling at index 0), or pass verify=False (CLI: --no-verify) to write the file "
                f"unverified; the random ops are exported as ONNX Random* ops.")


def _run_onnxruntime(session, inputs: tuple[Tensor, ...]) -> list:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise OnnxExportError(
            f"export_onnx: the ONNX graph has {len(names)} inputs ({names}) but {len(inputs)} example inputs "
            f"were given; an input the forward does not use is dropped by the exporter - remove it")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return session.run(None, feed)


def verify_onnx(path, model: nn.Module, inputs: tuple[Tensor, ...], *, dynamic_batch: bool,
                rtol: float = DEFAULT_RTOL, reference: Optional[list[Tensor]] = None) -> tuple[tuple[int, ...], float]:
    """Run ``path`` in plain onnxruntime and compare with ``model``; returns (batches, max relative error)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    runs = [(batch, inputs, reference)]
    if dynamic_batch:
        other = _other_batch(batch)
        runs.append((other, batch_variant(inputs, other), None))
    worst = 0.0
    with _eval_mode(model):
        for b, xs, ref in runs:
            ref = ref if ref is not None else _run_torch(model, xs, f"batch-{b} variant of example_inputs")
            where = f"batch size {b}" + (" (the example inputs)" if b == batch else " (example inputs resampled)")
            try:
                got = _run_onnxruntime(session, xs)
            except OnnxExportError:
                raise
            except Exception as e:  # noqa: BLE001 - onnxruntime failure at a new batch size
                hint = ""
                if "dimension" in str(e).lower() and dynamic_batch:
                    hint = ("\n  what to do: the model's graph is specialised to the example batch size (e.g. a "
                            "Python loop over the batch); export with dynamic_batch=False (CLI: --static-batch)")
                raise OnnxVerificationError(
                    f"export_onnx: onnxruntime failed to run the exported model at {where}: {e}{hint}",
                    max_abs_diff=math.inf, max_rel_diff=math.inf, output=-1, batch=b) from e
            worst = max(worst, compare_outputs(got, ref, rtol, batch=b, where=where))
    return tuple(b for b, _, _ in runs), worst


# ---------------------------------------------------------------- public API
def export_onnx(model: nn.Module, example_inputs, path, *, dynamic_batch: bool = True, opset: Optional[int] = None,
                custom_op: bool = True, verify: bool = True, rtol: float = DEFAULT_RTOL,
                chunk_bytes: Optional[int] = None) -> ExportResult:
    """Export ``model`` to the ONNX file ``path``.

    Args:
        model: an ``nn.Module`` (typically the output of :func:`l1fx.convert.convert`); exported in eval mode,
            its own mode is restored afterwards and it is not otherwise modified.
        example_inputs: a tensor or tuple of tensors, the positional arguments of ``model.forward``.
        path: the ``.onnx`` file to write (its directory must exist).
        dynamic_batch: make dim 0 of every input a symbolic ``batch`` dimension.
        opset: default-domain ONNX opset (default: the exporter's).
        custom_op: emit one ``l1fx.L1Linear`` / ``l1fx.L1Conv`` node per l1 layer, with its definition as a
            model-local function (plain onnxruntime runs it); ``False`` inlines those definitions so the file
            holds standard ONNX ops only.
        verify: run the file in onnxruntime on ``example_inputs`` (and at another batch size when
            ``dynamic_batch``) and raise :class:`OnnxVerificationError` if an output differs from PyTorch by
            more than ``rtol`` (relative to the output's largest magnitude) or is NaN/inf where PyTorch's is not.
        chunk_bytes: memory budget of one row block of the l1 function body (default:
            ``l1fx.onnx_ops.default_chunk_bytes()``, 4 MiB or less); ``0`` writes the unchunked broadcast body (materialises N x M x K).

    Returns an :class:`ExportResult`. On any error nothing is left at ``path`` (an existing file there is
    only replaced after verification passed).
    """
    import onnx

    from . import onnx_ops

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_input_tuple(example_inputs)
    path = Path(path)
    if dynamic_batch and any(t.dim() == 0 for t in inputs):
        raise OnnxExportError("export_onnx: dynamic_batch=True needs every example input to have a batch "
                              f"dimension 0, got {_shapes(inputs)}; pass dynamic_batch=False")
    tmp = _reserve_temp(path)
    try:
        with _eval_mode(model):
            reference = _run_torch(model, inputs, "example_inputs")
            if not reference:
                raise OnnxExportError(f"export_onnx: {type(model).__name__} returns no tensors; nothing to export")
            if verify:
                _check_deterministic(model, inputs, reference)
            try:
                proto = _torch_export(model, inputs, dynamic_batch, opset, onnx_ops.translation_table())
            except Exception as e:  # noqa: BLE001 - re-raised with an explanation
                raise OnnxExportError(_explain_export_failure(model, e, dynamic_batch)) from e
        budget = onnx_ops.default_chunk_bytes() if chunk_bytes is None else (int(chunk_bytes) or None)
        proto, used_opset = _finish_model(proto, custom_op, budget)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(f"export_onnx: the exported model fails onnx.checker (an l1fx bug, please "
                                  f"report it): {e}") from e
        onnx.save_model(proto, str(tmp))
        result = ExportResult(path=path, opset=used_opset, custom_op=custom_op,
                              l1_nodes=_count_l1_nodes(proto) if custom_op else {})
        if verify:
            result.verified_batches, result.max_rel_error = verify_onnx(
                tmp, model, inputs, dynamic_batch=dynamic_batch, rtol=rtol, reference=reference)
        os.replace(tmp, path)
        return result
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------- command line
def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m l1fx.export",
        description="Build a model, convert it to l1 layers with l1fx.convert and export it to ONNX, verified "
                    "in onnxruntime against PyTorch (see docs/onnx.md).",
        epilog="example: python -m l1fx.export models/pointnet.py:PointNetCls --input-shape 2,3,1024 "
               "--ratio 0.67 -o pointnet_l1.onnx")
    ap.add_argument("model", help="MODULE:NAME - a .py file or importable module, and a class or function that "
                                  "returns the nn.Module (called with --model-kwargs)")
    ap.add_argument("-o", "--output", required=True, help="ONNX file to write (its directory must exist)")
    inputs = ap.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input-shape", action="append", type=str, metavar="B,C,...",
                        help="shape of one forward input (random normal float32); repeat for several inputs")
    inputs.add_argument("--inputs", metavar="FILE.pt", help="torch.save'd tensor or tuple of tensors to use as "
                                                           "example inputs")
    ap.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for NAME, as JSON")
    ap.add_argument("--checkpoint", metavar="FILE.pt", help="state_dict to load before converting (a dense or an "
                                                            "l1fx checkpoint: parameter names are the same)")
    ap.add_argument("--ratio", type=float, default=1.0, help="fraction of layers to convert (default 1)")
    ap.add_argument("--no-convert", action="store_true", help="export the model as built (already l1, or dense)")
    ap.add_argument("--static-batch", action="store_true", help="fix the batch size (default: dynamic dim 0)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ap.add_argument("--standard-ops", action="store_true",
                    help="inline the l1 ops into standard ONNX ops (no l1fx domain in the file)")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    ap.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"verification tolerance (default {DEFAULT_RTOL})")
    ap.add_argument("--seed", type=int, default=0, help="seed for model init and random inputs (default 0)")
    return ap


def _cli_inputs(args) -> tuple[Tensor, ...]:
    if args.inputs:
        try:
            loaded = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"cannot load --inputs {args.inputs}: {e}") from e
        return _as_input_tuple(loaded)
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
    """Build, convert (unless --no-convert) and load the checkpoint where its keys fit.

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
    if not args.no_convert:
        from .convert import convert

        model = convert(model, args.ratio, example_inputs=inputs)
        if state is not None:
            _load_into(model, state, args.checkpoint, f"converted (ratio={args.ratio})")
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = _build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        inputs = _cli_inputs(args)
        model = _cli_model(args, inputs)
        result = export_onnx(model, inputs, args.output, dynamic_batch=not args.static_batch, opset=args.opset,
                             custom_op=not args.standard_ops, verify=not args.no_verify, rtol=args.rtol)
    except (CLIError, RuntimeError, TypeError, ValueError) as e:  # clear messages from l1fx; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
