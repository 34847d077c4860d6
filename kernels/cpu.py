"""The ``cpu`` backend: register-tiled C++/OpenMP kernels for the l1 core.

The kernels (``csrc/l1_cpu.cpp``) are built on first use by the system C++
compiler and cached across runs (see :mod:`l1fx.kernels.cpu_build`): the first
call in a fresh cache pays one compile of a few seconds (4–5 s with
g++ 12 here), every later call and every shape reuses the library. float32
and bfloat16 CPU tensors are handled (accumulating in float32); other dtypes
stay on the reference kernel.

Every kernel is exact to float32 rounding of its result: each summand is
formed from the difference ``x - w`` itself (rounded once), never from an
identity like ``|x - w| = x + w - 2 min(x, w)`` or ``g^T x - w * colsum(g)``
whose terms grow with the data's offset (see docs/l1_ops.md, "Numerics").
The input gradient and the whole MGS weight gradient (both halves of the blend)
come from one C++ pass over the rows; NaN and infinities land where the
formula puts them, as in the reference kernel.

Convolutions do not go through im2col on this backend where avoidable:
the forward is a direct implicit-GEMM kernel. Kernel size 1 with stride 1 and
no padding reads x as the [C, positions] matrix it is ("pointwise"). When the last spatial axis has
stride 1 and the output is large next to the per-thread buffers, it copies the
input lines a tile of output rows needs (zero padded) into a per-thread
buffer of at most 256 KiB and reads the patches straight from it ("rows");
otherwise the patches of 64 output positions are packed from the NC...
input a slice of channels at a time (a panel of at most 32 KiB per thread, by
vector loads: masked at the borders, a permute at stride 2; "packed"). The
line buffers total at most half the output, so either way the only sizeable
allocation is the output (:func:`conv_forward_kernel` says which kernel a
shape gets). The input gradient (any stride; stride > 1 along the line by
phases) is a direct kernel too (one thread per input line, no col2im). The
weight gradient (both halves of the MGS blend, any geometry) is a direct
kernel too: patch tiles packed per thread, reduced in registers. Chunked im2col
(:mod:`l1fx.kernels.conv`) is left for mixed dtypes and > 3-d convolutions.

If no compiler is found or the build fails, ``available()`` says why: under
``L1FX_BACKEND=auto`` the ops fall back to the reference kernel with a
one-line warning, and ``L1FX_BACKEND=cpu`` raises ``BackendUnavailable``.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import Backend, BackendUnavailable, requested_backend
from . import conv as _conv
from . import reference
from .cpu_build import build_info as build_info_of
from .cpu_build import load_once

SOURCE = Path(__file__).with_name("csrc") / "l1_cpu.cpp"
LIB_NAME = "l1fx_cpu"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_state: dict = {}  # "lib" and "path", or "error"; plus "build_seconds"; empty until first use
_warned = False


def _declare(lib: ctypes.CDLL) -> Optional[dict]:
    """ctypes signatures of the library's functions."""
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.l1fx_forward.argtypes = [ctypes.c_int, vp, vp, vp, vp, i64, i64, i64, ctypes.c_int]
    lib.l1fx_backward.argtypes = [ctypes.c_int, vp, vp, vp, vp, vp, ctypes.c_float, i64, i64, i64,
                                  ctypes.c_int]
    lib.l1fx_conv_forward.argtypes = [ctypes.c_int, vp, vp, vp, vp, i64, i64, i64, i64, vp, ctypes.c_int]
    lib.l1fx_conv_input_grad.argtypes = [ctypes.c_int, vp, vp, vp, vp, ctypes.c_float, i64, i64, i64, i64,
                                         vp, ctypes.c_int]
    lib.l1fx_conv_forward_uses_rows.argtypes = [i64, i64, i64, i64, vp, ctypes.c_int]
    for fn in (lib.l1fx_forward, lib.l1fx_backward, lib.l1fx_conv_forward, lib.l1fx_conv_input_grad,
               lib.l1fx_conv_forward_uses_rows):
        fn.restype = ctypes.c_int


def _library() -> Optional[ctypes.CDLL]:
    return load_once(_state, _lock, SOURCE, LIB_NAME, _declare)


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise BackendUnavailable(f"l1fx backend 'cpu' is unavailable: {_state['error']}")
    return lib


def reset() -> None:
    """Forget the build/load outcome (after installing a compiler; tests)."""
    global _warned
    with _lock:
        _state.clear()
        _warned = False


def build_info() -> dict:
    """What happened on first use: library loaded (and its path) or error, and seconds spent (build + load)."""
    _library()
    return build_info_of(_state)


def available() -> tuple[bool, str]:
    global _warned
    if _library() is not None:
        return True, ""
    reason = _state["error"]
    if not _warned and requested_backend() == "auto":
        _warned = True
        warnings.warn(
            f"l1fx: cpu backend unavailable ({reason.splitlines()[0]}); using the slower reference kernel",
            RuntimeWarning,
            stacklevel=2,
        )
    return False, reason


def supports(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPE_CODES


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _same_dtype(x: Tensor, *others: Optional[Tensor]) -> bool:
    return all(o is None or (o.dtype == x.dtype and o.device == x.device) for o in others)


def _conv_weight_grad_fn():
    """``l1fx_conv_weight_grad`` with its signature (declared here, next to its only caller)."""
    fn = _lib().l1fx_conv_weight_grad
    if fn.argtypes is None:
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [ctypes.c_int, vp, vp, vp, vp, ctypes.c_float, i64, i64, i64, i64, vp, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def _check_rc(rc: int, fn: str) -> None:
    """Turn a C return code into an exception (not an ``assert``: ``python -O`` would drop it).

    A kernel failing at run time is a :class:`~l1fx.errors.KernelError`, not a build error.
    """
    if rc == 0:
        return
    from ..errors import KernelError  # local: leaves the module's import block to the loader

    why = {1: "unsupported dtype code", 2: "unsupported geometry (stride != 1)"}.get(rc, "unknown error")
    raise KernelError(
        f"l1fx cpu kernel {fn} failed with code {rc} ({why}); this is a bug in l1fx, please report it "
        f"(set L1FX_BACKEND=reference to work around it)"
    )


def linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    if not _same_dtype(x, w, bias):  # mixed dtypes: the reference promotes per element
        return reference.linear_forward(x, w, bias)
    n, k = x.shape
    m = w.shape[0]
    y = torch.empty(n, m, dtype=x.dtype, device=x.device)
    if n == 0 or m == 0:
        return y
    x, w = x.contiguous(), w.contiguous()
    bias = None if bias is None else bias.contiguous()
    rc = _lib().l1fx_forward(
        DTYPE_CODES[x.dtype], _ptr(x), _ptr(w), _ptr(bias), _ptr(y), n, k, m, torch.get_num_threads()
    )
    _check_rc(rc, "l1fx_forward")
    return y


def linear_backward(
    g: Tensor, x: Tensor, w: Tensor, mix: float, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    if not _same_dtype(x, w, g):
        return reference.linear_backward(g, x, w, mix, need_x, need_w)
    n, k = x.shape
    m = w.shape[0]
    mix = float(mix)
    g, x, w = g.contiguous(), x.contiguous(), w.contiguous()
    gx = torch.empty_like(x) if need_x else None
    # The weight gradient accumulates in float32 (its own dtype for float32, converted after for bfloat16).
    gw = torch.empty(m, k, dtype=torch.float32) if need_w else None
    if n > 0 and m > 0 and k > 0 and (gx is not None or gw is not None):
        rc = _lib().l1fx_backward(
            DTYPE_CODES[x.dtype], _ptr(g), _ptr(x), _ptr(w), _ptr(gx), _ptr(gw), mix, n, k, m,
            torch.get_num_threads(),
        )
        _check_rc(rc, "l1fx_backward")
    else:
        for t in (gx, gw):
            if t is not None:
                t.zero_()
    return gx, None if gw is None else gw.to(w.dtype)


def _geometry_3d(x: Tensor, w: Tensor, stride, padding, dilation) -> tuple[list[int], list[int]]:
    """(geometry array for the C++ conv, output spatial shape): 1-D/2-D as 3-D with leading size-1 dims."""
    nd = x.dim() - 2
    out = _conv.out_shape(x.shape[2:], w.shape[2:], stride, padding, dilation)
    lead = 3 - nd
    geom = ([1] * lead + list(x.shape[2:]) + [1] * lead + list(w.shape[2:]) + [1] * lead + list(stride)
            + [0] * lead + list(padding) + [1] * lead + list(dilation) + [1] * lead + out)
    return geom, out


def conv_forward_kernel(x: Tensor, w: Tensor, stride, padding, dilation, groups: int) -> str:
    """Which direct forward kernel :func:`conv_forward` runs here: ``"pointwise"``, ``"rows"`` or ``"packed"``
    (tests, benchmarks)."""
    geom, _ = _geometry_3d(x, w, stride, padding, dilation)
    g = (ctypes.c_int64 * 18)(*geom)
    kind = _lib().l1fx_conv_forward_uses_rows(
        x.shape[0], x.shape[1], w.shape[0], groups, ctypes.cast(g, ctypes.c_void_p), torch.get_num_threads()
    )
    return {2: "pointwise", 1: "rows"}.get(kind, "packed")


def conv_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """Direct l1 conv (implicit GEMM in C++): patches are read per tile from x, never unfolded whole."""
    if not _same_dtype(x, w, bias) or x.dim() > 5:
        return _conv.conv_forward(BACKEND, x, w, bias, stride, padding, dilation, groups)
    geom, out = _geometry_3d(x, w, stride, padding, dilation)
    y = torch.empty((x.shape[0], w.shape[0], *out), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x, w = x.contiguous(), w.contiguous()
    bias = None if bias is None else bias.contiguous()
    g = (ctypes.c_int64 * 18)(*geom)
    rc = _lib().l1fx_conv_forward(
        DTYPE_CODES[x.dtype], _ptr(x), _ptr(w), _ptr(bias), _ptr(y), x.shape[0], x.shape[1], w.shape[0], groups,
        ctypes.cast(g, ctypes.c_void_p), torch.get_num_threads(),
    )
    _check_rc(rc, "l1fx_conv_forward")
    return y


def conv_forward_fused(xs: list, w: Tensor, col: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                       relu: bool, stride, padding, dilation, groups: int) -> Tensor:
    """The C ABI of onnxruntime's ``l1fx.L1FusedConv`` (float32; see ``l1fx_conv_forward_fused``):
    ``act(scale * (col - sum |cat(xs, 1) - w|) + shift)`` with ``col`` [M] or [B, M], the inputs read in
    place as their concatenation along channels. Used by the native onnxruntime library; exposed for its tests."""
    x0 = xs[0]
    whole = x0.new_empty((x0.shape[0], sum(x.shape[1] for x in xs), *x0.shape[2:]))  # shape only
    geom, out = _geometry_3d(whole, w, stride, padding, dilation)
    y = torch.empty((x0.shape[0], w.shape[0], *out), dtype=torch.float32)
    xs = [x.contiguous() for x in xs]
    ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])
    chans = (ctypes.c_int64 * len(xs))(*[x.shape[1] for x in xs])
    w, col = w.contiguous(), col.contiguous()
    scale = None if scale is None else scale.contiguous()
    shift = None if shift is None else shift.contiguous()
    fn = _lib().l1fx_conv_forward_fused
    if fn.argtypes is None:
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [ctypes.c_int, vp, vp, vp, vp, ctypes.c_int, vp, vp, ctypes.c_int, vp, i64, i64, i64, i64, vp,
                       ctypes.c_int]
        fn.restype = ctypes.c_int
    g = (ctypes.c_int64 * 18)(*geom)
    rc = fn(len(xs), ctypes.cast(ptrs, ctypes.c_void_p), ctypes.cast(chans, ctypes.c_void_p), _ptr(w), _ptr(col),
            int(col.dim() == 2), _ptr(scale), _ptr(shift), int(relu), _ptr(y), x0.shape[0], whole.shape[1], w.shape[0],
            groups, ctypes.cast(g, ctypes.c_void_p), torch.get_num_threads())
    _check_rc(rc, "l1fx_conv_forward_fused")
    return y


def conv_backward(
    grad: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int, mix: float, need_x: bool,
    need_w: bool,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """MGS conv gradients, exact (see docs/l1_ops.md), without im2col where a kernel exists.

    * input gradient, any stride: a direct C++ kernel (each thread owns input
      lines; no patch matrix, no col2im).
    * weight gradient: a direct C++ kernel for both halves of the blend (patch
      tiles packed per thread, reduced in registers; not the dense identity
      ``conv_weight_grad(g, x) - w * sum(g)``, which cancels catastrophically
      for data far from zero).
    """
    mix = float(mix)
    if not _same_dtype(x, w, grad) or x.dim() > 5:
        return _conv.conv_backward(BACKEND, grad, x, w, stride, padding, dilation, groups, mix, need_x, need_w)
    grad, x, w = grad.contiguous(), x.contiguous(), w.contiguous()  # autograd may hand an expanded grad
    gx = gw = None
    if need_x:
        gx = torch.empty_like(x)
        geom, _ = _geometry_3d(x, w, stride, padding, dilation)
        g = (ctypes.c_int64 * 18)(*geom)
        rc = _lib().l1fx_conv_input_grad(
            DTYPE_CODES[x.dtype], _ptr(grad), _ptr(x), _ptr(w), _ptr(gx), mix, x.shape[0], x.shape[1], w.shape[0],
            groups, ctypes.cast(g, ctypes.c_void_p), torch.get_num_threads(),
        )
        _check_rc(rc, "l1fx_conv_input_grad")
    if need_w:
        gw = torch.empty(w.shape, dtype=torch.float32)
        geom, _ = _geometry_3d(x, w, stride, padding, dilation)
        g = (ctypes.c_int64 * 18)(*geom)
        rc = _conv_weight_grad_fn()(
            DTYPE_CODES[x.dtype], _ptr(grad), _ptr(x), _ptr(w), _ptr(gw), mix, x.shape[0], x.shape[1], w.shape[0], groups, ctypes.cast(g, ctypes.c_void_p), torch.get_num_threads(),
        )
        _check_rc(rc, "l1fx_conv_weight_grad")
        gw = gw.to(w.dtype)
    return gx, gw


BACKEND = Backend(
    name="cpu",
    linear_forward=linear_forward,
    linear_backward=linear_backward,
    available=available,
    supports=supports,
    priority=10,
    conv_forward=conv_forward,
    conv_backward=conv_backward,
    extra={"build_info": build_info, "reset": reset},
)
