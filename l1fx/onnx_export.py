"""Export l1fx models to ONNX, verified against PyTorch before the file appears (the library of ``l1fx.export``).

``export_onnx(model, example_inputs, path)`` runs ``torch.onnx.export``
(the torch.export-based exporter) with a translation that turns every l1 op
into one node of the ``l1fx`` domain (``L1Linear``, ``L1Conv``: the ONNX ops
of the layer kinds in :mod:`l1fx.layers`), appends the ops' definitions as
model-local ONNX functions so plain onnxruntime runs the file (see
:mod:`l1fx.onnx_ops`), checks the model with
``onnx.checker.check_model(full_check=True)`` and, with ``verify=True``, runs
it in onnxruntime on the example inputs and on a different batch size and
compares with PyTorch. The file is written to a temporary name in the
destination directory and renamed only when everything passed
(:mod:`l1fx._atomicfile`), so an error never leaves a partial or silently
wrong file.

The command line (``python -m l1fx.export``, checkpoint loading included) is
:mod:`l1fx.export`, which re-exports this module's public names. See docs/onnx.md.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import os
import re
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.overrides
from torch import Tensor, nn
from torch.nn import functional as F

from . import _cli
from ._util import as_input_tuple, evaluating
from .errors import ExportError, UsageError, VerificationError

__all__ = ["export_onnx", "ExportResult", "OnnxExportError", "OnnxVerificationError", "NondeterministicModelError",
           "OnnxInputError", "OnnxPathError", "ConstantOutputWarning", "DEFAULT_RTOL", "check_input_sizes",
           "verify_onnx", "compare_outputs", "batch_variant"]

DEFAULT_RTOL = 1e-4


class OnnxExportError(ExportError):
    """The model could not be exported; the message says what failed and what to do."""


class OnnxVerificationError(OnnxExportError, VerificationError):
    """onnxruntime's output differs from PyTorch's (NaN/inf where PyTorch's is finite or the other way round),
    or the comparison would prove nothing (PyTorch's outputs are all NaN/inf)."""

    def __init__(self, message: str, *, max_abs_diff: float = math.inf, max_rel_diff: float = math.inf,
                 output: int = -1, batch: int = -1):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.max_rel_diff = max_rel_diff
        self.output = output
        self.batch = batch


class NondeterministicModelError(OnnxExportError):
    """Two PyTorch runs in eval mode on the same inputs differ; ``random_calls`` lists the random calls seen."""

    def __init__(self, message: str, random_calls: Sequence[str] = ()):
        super().__init__(message)
        self.random_calls = list(random_calls)


class OnnxInputError(OnnxExportError, UsageError):
    """The example inputs cannot be exported or compared (e.g. a zero-size dimension)."""


class OnnxPathError(OnnxExportError, _cli.OutputPathError):
    """The output path cannot be written; on the command line a usage error (exit 2)."""


class ConstantOutputWarning(UserWarning):
    """The model's outputs do not depend on its inputs, so the verification compared constants only."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and checked."""

    path: Path
    opset: int
    custom_op: bool
    l1_nodes: dict[str, int]              # l1fx op type -> node count (empty when custom_op=False)
    verified_batches: tuple[int, ...] = ()  # batch sizes run in onnxruntime and compared
    max_rel_error: Optional[float] = None   # largest relative difference seen (None: values not compared)
    # False: two different inputs gave the same outputs, so the comparison only proved the constants
    # right (a note and a ConstantOutputWarning say so); None: not checked (verify=False, no float input).
    input_dependent: Optional[bool] = None
    deterministic: Optional[bool] = None    # False only with allow_nondeterministic=True
    # Helpers exported as l1fx.points nodes (farthest point sampling), one line each.
    point_ops: list[str] = field(default_factory=list)
    # Random draws that onnxruntime got from PyTorch for the comparison (FPS start indices drawn from a fixed
    # generator): a non-empty list means the random ops themselves were not compared, only what follows them.
    fed_random: list[str] = field(default_factory=list)
    # The tolerance the comparison used: ``rtol``, or wider where float32 is ill-conditioned (see
    # ``float64_error``: PyTorch float32's own relative error against a float64 run of the same model).
    tolerance: Optional[float] = None
    float64_error: Optional[float] = None
    export_seconds: Optional[float] = None  # the torch exporter's time
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        nodes = ", ".join(f"{n} x{c}" for n, c in sorted(self.l1_nodes.items())) or "none"
        lines = [f"wrote {self.path} (opset {self.opset}, l1fx nodes: {nodes})"]
        if self.verified_batches and self.max_rel_error is not None:
            tol = f" (tolerance {self.tolerance:.0e})" if self.tolerance is not None else ""
            lines.append(f"verified in onnxruntime at batch sizes {list(self.verified_batches)}: "
                         f"max relative error {self.max_rel_error:.2e}{tol}")
        elif self.verified_batches:
            lines.append(f"NOT verified: onnxruntime ran it at batch sizes {list(self.verified_batches)} with the "
                         f"right output shapes, but the values of a random model cannot be compared")
        else:
            lines.append("not verified (verify=False)")
        return "\n".join(lines + self.notes)


# ---------------------------------------------------------------- input checks
def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)


def check_input_sizes(inputs: tuple[Tensor, ...], dynamic_batch: bool) -> None:
    """No zero-size dimension (the exporter specialises it), and a batch dim 0 with ``dynamic_batch``."""
    for i, t in enumerate(inputs):
        if t.numel() == 0:
            raise OnnxInputError(
                f"export_onnx: example input {i} has shape {tuple(t.shape)}, with a zero-size dimension: the "
                f"exporter specialises such dimensions and verification would compare nothing; pass inputs with "
                f"at least one element per dimension (e.g. batch 2)")
    if dynamic_batch and any(t.dim() == 0 for t in inputs):
        raise OnnxInputError("export_onnx: dynamic_batch=True needs every example input to have a batch "
                             f"dimension 0, got {_shapes(inputs)}; pass dynamic_batch=False")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _tensor_leaves(out: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _rng_devices(inputs: Sequence[Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in inputs if t.is_cuda})


def _run_torch(model: nn.Module, inputs: tuple[Tensor, ...], what: str, control=None) -> list[Tensor]:
    """``model(*inputs)``'s tensors; with ``control`` (an :class:`l1fx.onnx_pointops.StartControl`) the random
    FPS starts come from its fixed generator (and are kept in ``control.last``)."""
    try:
        with torch.no_grad(), (control.run() if control is not None else contextlib.nullcontext()):
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


def _squeeze_translations() -> dict:
    """``aten.squeeze.dim(s)``: torch ignores a squeezed dim that is not 1, ONNX ``Squeeze`` rejects it
    (torch.onnx emits it anyway: "Dimension of input 1 must be 1 instead of 16" from the checker, for the
    dense model too). Keep only the dims that are not known to differ from 1."""
    from onnxscript import opset18 as op

    def squeeze_dims(self, dim):
        dims = [dim] if isinstance(dim, int) else list(dim)
        shape = self.shape
        if shape is not None:
            rank = len(shape)
            dims = [d % rank for d in dims if not (isinstance(shape[d % rank], int) and shape[d % rank] != 1)]
        if not dims:
            return op.Identity(self)
        return op.Squeeze(self, op.Constant(value_ints=dims))

    return {torch.ops.aten.squeeze.dim: squeeze_dims, torch.ops.aten.squeeze.dims: squeeze_dims}


def _translations(dense: bool = False) -> dict:
    """The exporter's custom translations: l1 ops as l1fx nodes (``dense``: as MatMul/Conv, the dense form
    of the same model), point helpers, cdist, squeeze."""
    from . import onnx_ops, onnx_pointops

    table = _dense_translations() if dense else onnx_ops.translation_table()
    table.update(onnx_pointops.translation_table())
    table.update(_squeeze_translations())
    return table


def _dense_translations() -> dict:
    """The l1 ops translated as the inner-product layers they replaced (same shapes): the dense form."""
    from onnxscript import opset18 as op

    def linear(x, weight, bias=None, mix: float = 1.0):
        y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
        return y if bias is None else op.Add(y, bias)

    def conv(x, weight, bias, stride, padding, dilation, groups: int, mix: float = 1.0):
        args = [x, weight] + ([bias] if bias is not None else [])
        return op.Conv(*args, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
                       group=int(groups))

    return {torch.ops.l1fx.linear.default: linear, torch.ops.l1fx.conv.default: conv}


def _torch_export(model, inputs, dynamic_batch, opset, table):
    import warnings

    # torch.onnx's optimizer runs onnxscript's no-op rewrites (x + 0, x * 1, ...), whose constant match has an
    # absolute tolerance of 1e-8, so `1 / (d ** 2 + 1e-8)` (PointNet++'s 3-NN weights) loses its `+ 1e-8` and
    # gives inf/NaN. Where onnxscript's rule list can be read, l1fx runs the same optimizer without those
    # rules (_optimize); otherwise torch's own.
    passes = _optimizer_passes()
    kwargs = dict(dynamo=True, custom_translation_table=table, dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch),
                  optimize=passes is None, verbose=False, external_data=False)
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    # The exporter prints progress lines, graphs and warnings (through print, warnings and
    # logging, e.g. "torchvision is not installed"); its errors carry what matters. The redirection is
    # process-wide while it runs (documented: export_onnx is not meant to run beside other printing threads).
    log = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, inputs, **kwargs)
        if passes is not None:
            passes(program.model)
    finally:
        onnx_logger.setLevel(level)
    return program.model_proto


def _optimizer_passes():
    """onnxscript's ``optimize_ir`` (what torch.onnx runs) without its tolerant no-op rewrite rules, or None
    when this onnxscript's internals differ (then torch.onnx's optimizer runs as it is)."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common_passes
        from onnxscript import rewriter
        from onnxscript.optimizer import _constant_folding
        from onnxscript.rewriter.rules.common import _no_op

        no_op = set(_no_op.rules)
        rules = tuple(r for r in rewriter._DEFAULT_REWRITE_RULES if r not in no_op)
        return ir.passes.Sequential(
            common_passes.InlinePass(),
            ir.passes.PassManager([_constant_folding.FoldConstantsPass(
                shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                                   rewriter.RewritePass(rules), common_passes.RemoveUnusedNodesPass(),
                                   common_passes.RemoveUnusedFunctionsPass(), common_passes.RemoveUnusedOpsetsPass()],
                                  steps=2, early_stop=True),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.LiftSubgraphInitializersToMainGraphPass(),
            common_passes.DeduplicateInitializersPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.OutputFixPass(),
            common_passes.NameFixPass())
    except Exception:  # noqa: BLE001 - another onnxscript version: fall back to torch.onnx's optimizer
        return None


def _default_opset(model_proto) -> int:
    return next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))


def _finish_model(model_proto, custom_op: bool, chunk_bytes: Optional[int]):
    """Attach the l1fx function definitions, or inline them into standard ops."""
    import onnx
    import onnx.inliner

    from . import onnx_ops

    from . import onnx_pointops, onnx_resize

    opset = _default_opset(model_proto)
    onnx_resize.nearest_upsample_as_expand(model_proto, opset)  # onnxruntime's Resize is slow on CPU
    uses_l1 = any(n.domain == onnx_ops.DOMAIN for n in model_proto.graph.node)
    if uses_l1:
        used = {n.op_type for n in model_proto.graph.node if n.domain == onnx_ops.DOMAIN}
        model_proto.functions.extend(onnx_ops.functions(opset, chunk_bytes, used))
    point_functions = onnx_pointops.functions_used(model_proto, opset)
    model_proto.functions.extend(point_functions)
    if point_functions and not any(o.domain == onnx_pointops.DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(onnx.helper.make_opsetid(onnx_pointops.DOMAIN, onnx_pointops.DOMAIN_VERSION))
    if not custom_op:
        if uses_l1 or point_functions:
            model_proto = onnx.inliner.inline_local_functions(model_proto)
        del_ops = [o for o in model_proto.opset_import if o.domain in (onnx_ops.DOMAIN, onnx_pointops.DOMAIN)]
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


def compare_outputs(got: Sequence, want: Sequence[Tensor], rtol: float, *, batch: int, where: str,
                    values: bool = True) -> float:
    """Largest relative error ``max|got - want| / max|want|`` over the outputs; raises past ``rtol``.

    ``values=False`` (a random model) checks only the number, shapes and dtypes of the outputs."""
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
        if not values:
            if g.dtype != w.dtype:
                raise OnnxVerificationError(
                    f"export_onnx: output {i} is {g.dtype} in onnxruntime but {w.dtype} in PyTorch ({where})",
                    output=i, batch=batch)
            continue
        if not np.issubdtype(w.dtype, np.floating):
            bad = int((g != w).sum())
            if bad:
                raise OnnxVerificationError(
                    f"export_onnx: output {i} ({w.dtype}) differs from PyTorch in {bad} of {w.size} entries ({where})",
                    max_abs_diff=math.inf, max_rel_diff=math.inf, output=i, batch=batch)
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        finite_w, finite_g = np.isfinite(w64), np.isfinite(g64)
        _check_nonfinite_in_place(g64, w64, finite_g, finite_w, i, batch, where)
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


def _check_nonfinite_in_place(g64, w64, finite_g, finite_w, i: int, batch: int, where: str) -> None:
    """NaN, +inf and -inf must be exactly where PyTorch has them, in both directions."""
    import numpy as np

    only_g = ~finite_g & finite_w  # onnxruntime NaN/inf where PyTorch is finite
    only_w = finite_g & ~finite_w  # PyTorch NaN/inf where onnxruntime is finite
    both = ~finite_g & ~finite_w
    other = both & ~((np.isnan(g64) & np.isnan(w64)) | (g64 == w64))  # e.g. NaN vs inf, +inf vs -inf
    if only_g.any():
        raise OnnxVerificationError(
            f"export_onnx: onnxruntime output {i} has {int(only_g.sum())} NaN/inf entries where PyTorch's is "
            f"finite ({where}); the exported graph is wrong for these inputs (a known cause: index arithmetic such "
            f"as ball-query/gather patterns that torch.onnx translates incorrectly). The file was not written.",
            output=i, batch=batch)
    if only_w.any() or other.any():
        n = int(only_w.sum() + other.sum())
        raise OnnxVerificationError(
            f"export_onnx: PyTorch output {i} has {n} NaN/inf entries where onnxruntime's is finite or a different "
            f"NaN/inf ({where}); the exported graph does not compute what PyTorch does. The file was not written.",
            output=i, batch=batch)


def _refuse_all_nonfinite(model: nn.Module, reference: list[Tensor]) -> None:
    """A comparison of NaN with NaN proves nothing: refuse when PyTorch has no finite float output entry."""
    floats = [t for t in reference if t.is_floating_point() or t.is_complex()]
    if floats and not any(bool(torch.isfinite(t).any()) for t in floats) and len(floats) == len(reference):
        kinds = sorted({k for t in floats for k, bad in (("NaN", torch.isnan(t).any()), ("inf", torch.isinf(t).any()))
                        if bad})
        raise OnnxVerificationError(
            f"export_onnx: every output of {type(model).__name__} on the example inputs is "
            f"{'/'.join(kinds) or 'empty'} "
            f"in PyTorch, so comparing onnxruntime with it would prove nothing. Check the weights (e.g. a checkpoint "
            f"with NaN), the inputs and the forward; or pass verify=False (CLI: --no-verify) to write the file "
            f"unverified. The file was not written.")


# Torch functions that draw random numbers, and those that do only when ``training`` (default True) and p > 0.
_RANDOM_FUNCTIONS = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli, torch.multinomial,
    torch.poisson, torch.rand_like, torch.randn_like, torch.randint_like,
}
_RANDOM_METHODS = {"uniform_", "normal_", "bernoulli_", "bernoulli", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "multinomial"}
_TRAINING_RANDOM = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
}


def _random_call(func, args, kwargs) -> bool:
    if func in _RANDOM_FUNCTIONS or (getattr(func, "__name__", "") in _RANDOM_METHODS
                                     and "Tensor" in getattr(func, "__qualname__", "")):
        return True
    if func in _TRAINING_RANDOM:
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
        except TypeError:
            return True
        bound.apply_defaults()
        p = bound.arguments.get("p", 1.0)
        return bool(bound.arguments.get("training", True)) and (not isinstance(p, (int, float)) or p > 0)
    if func is F.gumbel_softmax:
        return True
    return False


def _call_site() -> str:
    """``file:line`` of the innermost frame outside torch and this file; fx-generated code names its source."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name.startswith("<eval_with_key>"):  # "<eval_with_key>.3 from /src/model.py:12 in forward"
            return name.split(" from ", 1)[1] if " from " in name else "the fx graph's generated code"
        if name.startswith(torch_dir) or name == __file__:
            continue
        return f"{os.path.basename(name)}:{frame.lineno}"
    return "?"


class _RandomCallRecorder(torch.overrides.TorchFunctionMode):
    """Records which random torch functions a forward calls, in which module and where (for the error)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(m): n or "(top level)" for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _random_call(func, args, kwargs):
            module = self.stack[-1] if self.stack else None
            where = (f" in module {self.names.get(id(module), '?')!r} ({type(module).__name__})"
                     if module is not None else "")
            name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
            name = name.replace("_VariableFunctionsClass.", "torch.").replace("TensorBase.", "Tensor.")
            if getattr(func, "__module__", None) == "torch.nn.functional":
                name = f"torch.nn.functional.{func.__name__}"
            call = f"{name}{where} at {_call_site()}"
            if call not in self.calls:
                self.calls.append(call)
        return func(*args, **kwargs)

    def run(self, model: nn.Module, inputs) -> None:
        def push(module, _inputs):
            self.stack.append(module)

        def pop(module, _inputs, _output):
            if self.stack and self.stack[-1] is module:
                self.stack.pop()

        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        hooks = [register_module_forward_pre_hook(push), register_module_forward_hook(pop, always_call=True)]
        try:
            with self:
                _run_torch(model, inputs, "example_inputs")
        finally:
            for h in hooks:
                h.remove()


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _check_deterministic(model: nn.Module, inputs: tuple[Tensor, ...], reference: list[Tensor],
                         control=None) -> None:
    """A second PyTorch run (other random numbers, same inputs) must agree, or nothing can be verified.

    On a difference the random calls are found by a third run under a :class:`TorchFunctionMode` that records
    them (works for eager modules and fx GraphModules alike). The caller forks the RNG, so the user's
    random state is not consumed.
    """
    torch.manual_seed(torch.initial_seed() + 1)
    again = _run_torch(model, inputs, "example_inputs", control)
    for i, (a, b) in enumerate(zip(again, reference)):
        if a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=0.0, equal_nan=True):
            continue
        diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else math.inf
        recorder = _RandomCallRecorder(model)
        recorder.run(model, inputs)
        if recorder.calls:
            cause = "random calls in forward: " + "; ".join(recorder.calls[:4]) + (
                f" (and {len(recorder.calls) - 4} more)" if len(recorder.calls) > 4 else "")
            todo = ("make forward deterministic in eval mode (e.g. start sampling at index 0, pass "
                    "training=self.training to F.dropout)")
        else:
            cause = ("no random torch call was seen, so forward depends on state that changes between calls "
                     "(a counter, a cache, a Python random module, the time)")
            todo = "make forward a function of its inputs and parameters"
        raise NondeterministicModelError(
            f"export_onnx: {type(model).__name__} is not deterministic: two PyTorch runs in eval mode on the "
            f"same example inputs differ (output {i}, largest difference {diff:.3e}), so onnxruntime cannot be "
            f"checked against it; {cause}. What to do: {todo}, or pass allow_nondeterministic=True "
            f"(CLI: --allow-nondeterministic) to export it anyway (the random ops become ONNX Random* ops; "
            f"only the output shapes are then checked).", recorder.calls)


def _alternative_inputs(inputs: tuple[Tensor, ...]) -> Optional[tuple[Tensor, ...]]:
    """Inputs of the same shapes with other floating-point values (None if no input is floating-point)."""
    gen = torch.Generator().manual_seed(20240613)
    out, changed = [], False
    for t in inputs:
        if t.is_floating_point() and t.numel():
            scale = float(t.detach().abs().max())
            scale = scale if math.isfinite(scale) and scale > 0 else 1.0
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
            out.append(t.detach() + scale * noise)
            changed = True
        else:
            out.append(t)  # integer inputs may be indices or labels: keep them valid
    return tuple(out) if changed else None


def _depends_on_input(model: nn.Module, inputs: tuple[Tensor, ...], reference: list[Tensor],
                      control=None) -> Optional[bool]:
    """Whether other input values change any output; ``None`` when there is no floating-point input."""
    alternative = _alternative_inputs(inputs)
    if alternative is None:
        return None
    other = _run_torch(model, alternative, "example inputs with other values", control)
    return not (len(other) == len(reference) and all(_same(a, b) for a, b in zip(other, reference)))


def _run_onnxruntime(session, inputs: tuple[Tensor, ...], fed: Optional[dict] = None) -> list:
    """``fed``: extra inputs by name (the random draws PyTorch made, see :func:`verify_onnx`)."""
    fed = fed or {}
    names = [i.name for i in session.get_inputs() if i.name not in fed]
    if len(names) != len(inputs):
        raise OnnxExportError(
            f"export_onnx: the ONNX graph has {len(names)} inputs ({names}) but {len(inputs)} example inputs "
            f"were given; an input the forward does not use is dropped by the exporter - remove it")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    feed.update(fed)
    return session.run(None, feed)


# Where float32 is ill-conditioned, onnxruntime may differ from PyTorch float32 by as much as PyTorch float32
# differs from float64: accepted up to this multiple of that discrepancy (against the float64 reference).
ILL_CONDITIONED_FACTOR = 4.0


def _float64_reference(model: nn.Module, control=None):
    """``run(inputs) -> outputs`` of a float64 copy of ``model`` (None where the model cannot run in float64)."""
    import copy

    try:
        model64 = copy.deepcopy(model).double().eval()  # verification compares eval-mode outputs
    except Exception:  # noqa: BLE001 - e.g. a module that cannot be copied: no float64 reference
        return None

    def run(inputs):
        xs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        try:
            return _run_torch(model64, xs, "the float64 reference", control)
        except OnnxExportError:
            return None

    return run


def _relative_error(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` over the entries finite in both (0 for non-float tensors)."""
    if not (a.is_floating_point() and b.is_floating_point()) or a.shape != b.shape:
        return 0.0
    a, b = a.double(), b.double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    if not ok.any():
        return 0.0
    scale = float(b[ok].abs().max())
    diff = float((a[ok] - b[ok]).abs().max())
    return diff / scale if scale > 0 else diff


def verify_onnx(path, model: nn.Module, inputs: tuple[Tensor, ...], *, dynamic_batch: bool,
                rtol: float = DEFAULT_RTOL, reference: Optional[list[Tensor]] = None,
                values: bool = True, control=None, reference64=None,
                report: Optional[dict] = None) -> tuple[tuple[int, ...], Optional[float]]:
    """Run ``path`` in plain onnxruntime and compare with ``model``; returns (batches, max relative error).

    ``values=False``: only the outputs' number, shapes and dtypes are compared (max relative error None).
    ``control`` (:class:`l1fx.onnx_pointops.StartControl`): PyTorch draws the random FPS starts from its fixed
    generator and onnxruntime gets the same numbers in place of its ``FpsRandomStart`` nodes.
    ``reference64(inputs)``: a float64 run of the model; where onnxruntime differs from PyTorch float32 by
    more than ``rtol``, it is compared with this instead, within ``ILL_CONDITIONED_FACTOR`` times PyTorch
    float32's own error (the tolerance model for ill-conditioned models). ``report`` receives
    ``tolerance``, ``float64_error`` and ``fed_random``.
    """
    import onnx
    import onnxruntime as ort

    from . import onnx_pointops

    report = report if report is not None else {}
    proto = onnx.load(str(path))
    start_names: list[str] = []
    if onnx_pointops.random_start_nodes(proto) or any(
            f.domain == onnx_pointops.DOMAIN and f.name == onnx_pointops.START for f in proto.functions):
        proto, start_names = onnx_pointops.feed_random_starts(proto)
        if not start_names:  # inlined (custom_op=False): the random ops cannot be fed, compare shapes only
            values = False
    session = ort.InferenceSession(proto.SerializeToString() if start_names else str(path),
                                   providers=["CPUExecutionProvider"])
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    runs = [(batch, inputs, reference)]
    if dynamic_batch:
        other = _other_batch(batch)
        runs.append((other, batch_variant(inputs, other), None))
    worst, tolerance, err64 = 0.0, rtol, None
    with evaluating(model, no_grad=False):
        for b, xs, ref in runs:
            ref = ref if ref is not None and control is None else _run_torch(
                model, xs, f"batch-{b} variant of example_inputs", control)
            fed = {}
            if start_names:
                draws = control.last if control is not None else []
                if len(draws) != len(start_names):
                    raise OnnxVerificationError(
                        f"export_onnx: the graph has {len(start_names)} random FPS start nodes but PyTorch drew "
                        f"{len(draws)} starts; an l1fx bug, please report it", batch=b)
                fed = {n: d.numpy() for n, d in zip(start_names, draws)}
                report["fed_random"] = start_names
            where = f"batch size {b}" + (" (the example inputs)" if b == batch else " (example inputs resampled)")
            try:
                got = _run_onnxruntime(session, xs, fed)
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
            try:
                worst = max(worst, compare_outputs(got, ref, rtol, batch=b, where=where, values=values))
            except OnnxVerificationError as e:
                if not math.isfinite(e.max_rel_diff) or reference64 is None:
                    raise
                ref64 = reference64(xs)
                if ref64 is None or len(ref64) != len(ref):
                    raise
                own = max(_relative_error(r, r64) for r, r64 in zip(ref, ref64))
                tol = max(rtol, ILL_CONDITIONED_FACTOR * own)
                if own <= rtol / 10:  # float32 is well-conditioned here: the difference is the export's
                    raise
                try:
                    err = compare_outputs(got, ref64, tol, batch=b, where=where + ", against float64 PyTorch")
                except OnnxVerificationError as e64:
                    raise OnnxVerificationError(
                        f"{e64} PyTorch float32 itself differs from float64 by {own:.2e} here (ill-conditioned), "
                        f"and onnxruntime by {e64.max_rel_diff:.2e}: more than {ILL_CONDITIONED_FACTOR:g}x that.",
                        max_abs_diff=e64.max_abs_diff, max_rel_diff=e64.max_rel_diff, output=e64.output,
                        batch=b) from e
                tolerance, err64 = max(tolerance, tol), max(err64 or 0.0, own)
                worst = max(worst, err)
    report["tolerance"], report["float64_error"] = tolerance, err64
    return tuple(b for b, _, _ in runs), (worst if values else None)


# ---------------------------------------------------------------- public API
def export_onnx(model: nn.Module, example_inputs, path, *, dynamic_batch: bool = True, opset: Optional[int] = None,
                custom_op: bool = True, verify: bool = True, rtol: float = DEFAULT_RTOL,
                chunk_bytes: Optional[int] = None, allow_nondeterministic: bool = False) -> ExportResult:
    """Export ``model`` to the ONNX file ``path``.

    Args:
        model: an ``nn.Module`` (typically the output of :func:`l1fx.convert.convert`); exported in eval mode,
            its own mode is restored afterwards and it is not otherwise modified.
        example_inputs: a tensor or tuple of tensors, the positional arguments of ``model.forward`` (no
            zero-size dimension).
        path: the ``.onnx`` file to write (its directory must exist; an existing regular file is replaced).
        dynamic_batch: make dim 0 of every input a symbolic ``batch`` dimension.
        opset: default-domain ONNX opset (default: the exporter's).
        custom_op: emit one ``l1fx.L1Linear`` / ``l1fx.L1Conv`` node per l1 layer, with its definition as a
            model-local function (plain onnxruntime runs it); ``False`` inlines those definitions so the file
            holds standard ONNX ops only.
        verify: run the file in onnxruntime on ``example_inputs`` (and at another batch size when
            ``dynamic_batch``) and raise :class:`OnnxVerificationError` if an output differs from PyTorch by
            more than ``rtol`` (relative to the output's largest magnitude) or has NaN/inf elsewhere than
            PyTorch's. A model whose outputs are all NaN/inf is refused (nothing to compare); one whose
            outputs do not depend on its inputs is exported with a :class:`ConstantOutputWarning` and
            ``result.input_dependent = False``.
        chunk_bytes: memory budget of one row block of the l1 function body (default:
            ``l1fx.onnx_ops.default_chunk_bytes()``, 4 MiB or less); ``0`` writes the unchunked broadcast body (materialises N x M x K).
        allow_nondeterministic: export a model whose eval-mode outputs differ between two runs (random ops
            in forward); by default that raises :class:`NondeterministicModelError` naming the random calls.
            With it, verification checks only the outputs' shapes and dtypes.

    Returns an :class:`ExportResult`. On any error nothing is left at ``path`` (an existing file there is
    only replaced after verification passed). The caller's global random state is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs, "export_onnx: example_inputs", tensors_only=True)
    check_input_sizes(inputs, dynamic_batch)
    target = _cli.check_output_path(Path(path), "export_onnx: output", OnnxPathError)

    def write(file) -> ExportResult:
        return _export_to(file, model, inputs, Path(path), dynamic_batch=dynamic_batch, opset=opset,
                          custom_op=custom_op, verify=verify, rtol=rtol, chunk_bytes=chunk_bytes,
                          allow_nondeterministic=allow_nondeterministic)

    # Random ops in forward draw from the global RNG: the caller's stream must not move.
    with torch.random.fork_rng(devices=_rng_devices(inputs)):
        # The temporary file exists before the work (an unwritable directory fails at once) and
        # replaces ``target`` only when write() returned: an error leaves the old file and no temp.
        result = _cli.write_atomically(target, write, "export_onnx: output", OnnxPathError)
    if result.input_dependent is False:
        warnings.warn(_CONSTANT_OUTPUT, ConstantOutputWarning, stacklevel=2)
    return result


_CONSTANT_OUTPUT = (
    "the outputs are the same for two different inputs, so the verification only shows that the exported "
    "constants are right, not that the layers compute correctly (a usual cause: l1 outputs, which are <= 0, all "
    "cut by a ReLU because batch-norm statistics were not trained or calibrated after conversion)")


def _export_to(file, model: nn.Module, inputs: tuple[Tensor, ...], path: Path, *, dynamic_batch, opset,
               custom_op, verify, rtol, chunk_bytes, allow_nondeterministic) -> ExportResult:
    """Check the model in PyTorch, export it into the open temporary ``file``, run onnx.checker and (with
    ``verify``) onnxruntime on that file."""
    import time

    import onnx

    from . import onnx_ops, onnx_pointops

    with evaluating(model, no_grad=False):
        try:  # farthest point sampling loops -> l1fx.points nodes (a new graph module; model is not changed)
            sub = onnx_pointops.substitute(model, inputs)
        except onnx_pointops.PointOpsError as e:
            raise OnnxExportError(f"export_onnx: {type(model).__name__}: {e}") from e
        exported = sub.model
        control = onnx_pointops.StartControl(seed=0) if sub.random else None
        reference = _run_torch(exported, inputs, "example_inputs", control)
        if not reference:
            raise OnnxExportError(f"export_onnx: {type(model).__name__} returns no tensors; nothing to export")
        if verify:
            _refuse_all_nonfinite(model, reference)
        deterministic = True
        try:
            _check_deterministic(exported, inputs, reference, control)
        except NondeterministicModelError:
            if not allow_nondeterministic:
                raise
            deterministic = False
        depends = _depends_on_input(exported, inputs, reference, control) if verify and deterministic else None
        t0 = time.perf_counter()
        try:
            proto = _torch_export(exported, inputs, dynamic_batch, opset, _translations())
        except Exception as e:  # noqa: BLE001 - re-raised with an explanation
            raise OnnxExportError(_explain_export_failure(model, e, dynamic_batch)
                                  + _dense_verdict(exported, inputs, dynamic_batch, opset, "export")) from e
        seconds = time.perf_counter() - t0
    budget = onnx_ops.default_chunk_bytes() if chunk_bytes is None else (int(chunk_bytes) or None)
    proto, used_opset = _finish_model(proto, custom_op, budget)
    if opset is not None and used_opset != int(opset):
        # torch's exporter silently substitutes an opset it cannot target; the user asked for this one.
        raise OnnxInputError(f"export_onnx: opset {opset} was asked for but torch's exporter wrote opset "
                              f"{used_opset}; choose an opset it supports (e.g. {used_opset}) or leave it unset")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        with evaluating(model, no_grad=False):
            verdict = _dense_verdict(exported, inputs, dynamic_batch, opset, "check")
        blame = "" if verdict else " (an l1fx bug, please report it)"
        raise OnnxExportError(f"export_onnx: the exported model fails onnx.checker{blame}: {e}{verdict}") from e
    onnx.save_model(proto, file)
    file.flush()  # onnxruntime reads it by name below
    result = ExportResult(path=path, opset=used_opset, custom_op=custom_op,
                          l1_nodes=_count_l1_nodes(proto) if custom_op else {},
                          input_dependent=depends, deterministic=deterministic,
                          point_ops=[r.describe() for r in sub.replaced], export_seconds=seconds)
    if verify:
        report: dict = {}
        result.verified_batches, result.max_rel_error = verify_onnx(
            file.name, exported, inputs, dynamic_batch=dynamic_batch, rtol=rtol, reference=reference,
            values=deterministic, control=control, reference64=_float64_reference(exported, control),
            report=report)
        result.tolerance, result.float64_error = report.get("tolerance"), report.get("float64_error")
        result.fed_random = list(report.get("fed_random", []))
        if result.float64_error is not None:
            result.notes.append(
                f"float32 is ill-conditioned here: PyTorch float32 differs from float64 by {result.float64_error:.2e} "
                f"(relative), so onnxruntime was compared with the float64 run, within {result.tolerance:.2e}"
                + (" - a weak check at this tolerance" if result.float64_error > 1e-2 else ""))
    result.notes.extend(f"point op: {line}" for line in result.point_ops)
    if result.fed_random:
        result.notes.append(
            f"the {len(result.fed_random)} random FPS start(s) were drawn in PyTorch from a fixed generator (seed "
            f"{control.seed}) and fed to onnxruntime for the comparison; the file draws its own "
            f"(RandomUniformLike), so the random draws themselves are not what was verified")
    elif sub.random and verify:
        result.notes.append("random FPS starts inlined (custom_op=False): only the output shapes were compared")
    if depends is False:
        result.notes.append(f"warning: {_CONSTANT_OUTPUT}")
    if not deterministic:
        result.notes.append("the model is random in eval mode (allow_nondeterministic=True): its outputs were "
                            "not compared")
    return result


def _dense_verdict(model: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, opset, stage: str) -> str:
    """Export the model's dense form (its l1 layers as MatMul/Conv, everything else the same): when that fails
    too, the defect is torch.onnx's (or the model's), not l1fx's; say so. ``""`` when the dense form passes."""
    import onnx

    try:
        proto = _torch_export(model, inputs, dynamic_batch, opset, _translations(dense=True))
        if stage == "check":
            onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 - the verdict, not an error of its own
        return ("\n  not an l1fx defect: the dense form of this model (its l1 layers exported as plain "
                f"MatMul/Conv, everything else the same) fails the same way in torch.onnx ({first_line(e)[:200]}); "
                "what to do: change the model code that torch.onnx cannot export (the operator named above), or "
                "report it to PyTorch")
    if stage == "check":
        return ""
    return ("\n  the dense form of this model (its l1 layers as plain MatMul/Conv) exports, so the l1 layers' "
            "translation is what fails: an l1fx bug, please report it")
