"""The ``cpu`` backend: register-tiled C++/OpenMP kernels for the l1 core.

The kernels (``csrc/l1_cpu.cpp``) are built on first use by the system C++
compiler and cached across runs (see :mod:`l1fx.kernels.cpu_build`): the first
call in a fresh cache pays one compile of a few seconds (4–5 s with
g++ 12 here), every later call and every shape reuses the library. float32
and bfloat16 CPU tensors are handled (accumulating in float32); other dtypes
stay on the reference kernel.

The weight gradient splits along the Mixed Gradient Strategy blend:
``gw = mix * (g^T x - w * colsum(g)) + (1 - mix) * sum_n g * sign(x - w)``.
The first half is a matrix product and goes to BLAS (``torch.mm``); the sign
half and the input gradient come from one C++ pass over the rows.

Convolutions do not go through im2col on this backend where avoidable:
the forward is a direct implicit-GEMM kernel. When the last spatial axis has
stride 1 and the output is large next to the per-thread buffers, it copies the
input lines a tile of output rows needs (centred, zero padded) into a per-thread
buffer of at most 256 KiB and reads the patches straight from it ("rows");
otherwise patches are packed per tile of output positions from the NC...
input into per-thread panels of ~256 KiB ("packed"). The line buffers total at
most half the output, so either way the only sizeable allocation is the output
(:func:`conv_forward_kernel` says which kernel a shape gets). The input gradient
for stride 1 is a direct kernel too (one thread per input line, no col2im);
the weight gradient's ``mix`` half is the inner-product conv's weight gradient
(ATen) minus ``w * sum(g)``. What remains on chunked im2col
(:mod:`l1fx.kernels.conv`): the input gradient for stride > 1 and the sign
half of the weight gradient (``mix < 1``).

If no compiler is found or the build fails, ``available()`` says why: under
``L1FX_BACKEND=auto`` the ops fall back to the reference kernel with a
one-line warning, and ``L1FX_BACKEND=cpu`` raises ``BackendUnavailable``.
"""
from __future__ import annotations

import ctypes
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import Backend, BackendUnavailable, requested_backend
from . import conv as _conv
from . import reference
from ..errors import KernelBuildError
from .cpu_build import load

SOURCE = Path(__file__).with_name("csrc") / "l1_cpu.cpp"
LIB_NAME = "l1fx_cpu"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Rows per chunk of the bfloat16 weight-gradient matmul (converted to float32).
BF16_MM_ROWS = 4096

_lock = threading.Lock()
_state: dict = {}  # "lib" and "path", or "error"; plus "build_seconds"; empty until first use
_warned = False


def _library() -> Optional[ctypes.CDLL]:
    with _lock:
        if not _state:
            t0 = time.perf_counter()
            try:
                lib = load(SOURCE, LIB_NAME)
            except KernelBuildError as e:  # no compiler, failed build, no usable directory
                _state["error"] = str(e)
            else:
                _state["path"] = lib._name
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
                _state["lib"] = lib
            _state["build_seconds"] = time.perf_counter() - t0
        return _state.get("lib")


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
    return {k: v for k, v in _state.items() if k != "lib"} | {"loaded": "lib" in _state}


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
    assert rc == 0, f"l1fx_forward failed with code {rc}"
    return y


def _gt_x_minus_w_colsum(g: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``g^T x - w * colsum(g)`` in float32: the mix=1 weight gradient, by BLAS."""
    if g.dtype == torch.float32:
        return torch.addcmul(torch.mm(g.t(), x), w, g.sum(0)[:, None], value=-1.0)
    # bfloat16: convert bounded row chunks so the product accumulates in float32.
    out = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    colsum = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    for n0 in range(0, g.shape[0], BF16_MM_ROWS):
        gc = g[n0:n0 + BF16_MM_ROWS].float()
        out.addmm_(gc.t(), x[n0:n0 + BF16_MM_ROWS].float())
        colsum += gc.sum(0)
    return out.addcmul_(w.float(), colsum[:, None], value=-1.0)


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
    sign_w = torch.zeros(m, k, dtype=torch.float32) if need_w and mix < 1.0 else None
    if n > 0 and m > 0 and k > 0 and (gx is not None or sign_w is not None):
        rc = _lib().l1fx_backward(
            DTYPE_CODES[x.dtype], _ptr(g), _ptr(x), _ptr(w), _ptr(gx), _ptr(sign_w), mix, n, k, m,
            torch.get_num_threads(),
        )
        assert rc == 0, f"l1fx_backward failed with code {rc}"
    elif gx is not None:
        gx.zero_()
    gw = None
    if need_w:
        gw = sign_w if sign_w is not None else torch.zeros(m, k, dtype=torch.float32)
        if mix > 0.0:
            linear_part = _gt_x_minus_w_colsum(g, x, w)
            gw = linear_part if mix == 1.0 else linear_part.mul_(mix).add_(gw, alpha=1.0 - mix)
        gw = gw.to(w.dtype)
    return gx, gw


def _geometry_3d(x: Tensor, w: Tensor, stride, padding, dilation) -> tuple[list[int], list[int]]:
    """(geometry array for the C++ conv, output spatial shape): 1-D/2-D as 3-D with leading size-1 dims."""
    nd = x.dim() - 2
    out = _conv.out_shape(x.shape[2:], w.shape[2:], stride, padding, dilation)
    lead = 3 - nd
    geom = ([1] * lead + list(x.shape[2:]) + [1] * lead + list(w.shape[2:]) + [1] * lead + list(stride)
            + [0] * lead + list(padding) + [1] * lead + list(dilation) + [1] * lead + out)
    return geom, out


def conv_forward_kernel(x: Tensor, w: Tensor, stride, padding, dilation, groups: int) -> str:
    """Which direct forward kernel :func:`conv_forward` runs here: ``"rows"`` or ``"packed"`` (tests, benchmarks)."""
    geom, _ = _geometry_3d(x, w, stride, padding, dilation)
    g = (ctypes.c_int64 * 18)(*geom)
    rows = _lib().l1fx_conv_forward_uses_rows(
        x.shape[0], x.shape[1], w.shape[0], groups, ctypes.cast(g, ctypes.c_void_p), torch.get_num_threads()
    )
    return "rows" if rows else "packed"


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
    assert rc == 0, f"l1fx_conv_forward failed with code {rc}"
    return y


def conv_backward(
    grad: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int, mix: float, need_x: bool,
    need_w: bool,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """MGS conv gradients without im2col where the math allows it.

    * input gradient, stride 1: a direct C++ kernel (each thread owns input
      lines; no patch matrix, no col2im). Other strides: chunked im2col.
    * weight gradient: its ``mix`` half is ``sum_o g (x_pad - w)`` =
      the inner-product conv's weight gradient minus ``w * sum_o g``, which
      ATen computes; the ``1 - mix`` sign half goes through chunked im2col.
    """
    mix = float(mix)
    if not _same_dtype(x, w, grad) or x.dim() > 5:
        return _conv.conv_backward(BACKEND, grad, x, w, stride, padding, dilation, groups, mix, need_x, need_w)
    direct_x = need_x and all(s == 1 for s in stride)
    gx = gw = None
    if need_x and not direct_x:
        gx = _conv.conv_backward(BACKEND, grad, x, w, stride, padding, dilation, groups, mix, True, False)[0]
    elif direct_x:
        gx = torch.empty_like(x)
        geom, _ = _geometry_3d(x, w, stride, padding, dilation)
        g = (ctypes.c_int64 * 18)(*geom)
        rc = _lib().l1fx_conv_input_grad(
            DTYPE_CODES[x.dtype], _ptr(grad), _ptr(x), _ptr(w), _ptr(gx), mix, x.shape[0], x.shape[1], w.shape[0],
            groups, ctypes.cast(g, ctypes.c_void_p), torch.get_num_threads(),
        )
        assert rc == 0, f"l1fx_conv_input_grad failed with code {rc}"
    if need_w:
        gw = torch.zeros(w.shape, dtype=torch.float32)
        if mix > 0.0:
            nd = x.dim() - 2
            dense = torch.ops.aten.convolution_backward(
                grad, x, w, None, list(stride), list(padding), list(dilation), False, [0] * nd, groups,
                [False, True, False],
            )[1]
            gsum = grad.sum(dim=[0, *range(2, grad.dim())], dtype=torch.float32)
            gw.add_(dense, alpha=mix).sub_(w.float() * gsum.view(-1, *[1] * (w.dim() - 1)), alpha=mix)
        if mix < 1.0:
            sign = _conv.conv_backward(BACKEND, grad, x, w, stride, padding, dilation, groups, 0.0, False, True)[1]
            gw.add_(sign, alpha=1.0 - mix)
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
