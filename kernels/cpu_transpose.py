"""The ``cpu`` backend's l1 transposed convolution: direct gather kernels in C++/OpenMP.

``csrc/l1_conv_transpose.cpp`` (built and cached by :mod:`l1fx.kernels.cpu_build`
on first use, like the other CPU kernels) visits only the real (input, tap)
pairs of each output (docs/l1_ops.md, "Transposed convolution"): the forward
and the weight gradient run over blocks of 16 output channels as vector lanes,
the input gradient over blocks of 16 input channels (the wrapper zero-pads the
channel counts to 16; padded lanes are computed and dropped). float32 runs in place; bfloat16 is widened to
float32 (exact) and the result rounded once; other dtypes, mixed dtypes and
> 3-d inputs take the reference kernel (:mod:`l1fx.kernels.conv_transpose`).

If the library cannot be built, :func:`kernels` raises ``BackendUnavailable``:
under ``L1FX_BACKEND=auto`` the op then runs on the reference kernel with a
one-line warning (:func:`l1fx.kernels.conv_transpose_kernels`), and forced
``cpu`` raises.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import BackendUnavailable
from . import conv_transpose as _ct
from .cpu_build import load_once

SOURCE = Path(__file__).with_name("csrc") / "l1_conv_transpose.cpp"
LIB_NAME = "l1fx_conv_transpose"

_lock = threading.Lock()
_state: dict = {}  # "lib" or "error", empty until first use


def _declare(lib: ctypes.CDLL) -> Optional[dict]:
    """ctypes signatures of the library's functions."""
    vp, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.l1fx_convt_forward.argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, vp, ctypes.c_int]
    for fn in (lib.l1fx_convt_input_grad, lib.l1fx_convt_weight_grad):
        fn.argtypes = [vp, vp, vp, vp, f32, i64, i64, i64, i64, vp, ctypes.c_int]
    for fn in (lib.l1fx_convt_forward, lib.l1fx_convt_input_grad, lib.l1fx_convt_weight_grad):
        fn.restype = ctypes.c_int


def _library() -> Optional[ctypes.CDLL]:
    return load_once(_state, _lock, SOURCE, LIB_NAME, _declare)


def reset() -> None:
    """Forget the build/load outcome (tests)."""
    with _lock:
        _state.clear()


def kernels():
    """``(forward, backward)``; raises ``BackendUnavailable`` when the library cannot be built."""
    if _library() is None:
        raise BackendUnavailable(f"the cpu transposed-convolution kernels are unavailable: "
                                 f"{_state['error'].splitlines()[0]}")
    return conv_transpose_forward, conv_transpose_backward


def _native(*ts: Optional[Tensor]) -> bool:
    """float32/bfloat16 CPU tensors of one dtype, at most 3 spatial dims: the C++ kernels run them."""
    present = [t for t in ts if t is not None]
    x = present[0]
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() <= 5
            and all(t.dtype == x.dtype and t.device == x.device for t in present))


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _geometry(x_spatial, out, kernel, stride, padding, dilation):
    lead = 3 - len(kernel)
    geom = ([1] * lead + list(x_spatial) + [1] * lead + list(kernel) + [1] * lead + list(stride)
            + [0] * lead + list(padding) + [1] * lead + list(dilation) + [1] * lead + list(out))
    return (ctypes.c_int64 * 18)(*geom)


def _ptr(t: Optional[Tensor]):
    # The caller keeps ``t`` alive until the C call returns (a temporary would be freed before it runs).
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(rc: int, fn: str) -> None:
    if rc:
        from ..errors import KernelError

        raise KernelError(f"l1fx cpu kernel {fn} failed with code {rc}; this is a bug in l1fx, please report it "
                          f"(set L1FX_BACKEND=reference to work around it)")


LANES = 16  # the C++ kernels' vector width (channels per block); channel counts are zero-padded to it


def _pad_last(t: Tensor) -> Tensor:
    """``t`` with its last dim zero-padded to a multiple of :data:`LANES` (contiguous)."""
    extra = -t.shape[-1] % LANES
    return torch.nn.functional.pad(t, (0, extra)).contiguous() if extra else t.contiguous()


def _wt(w: Tensor, groups: int, channels_last: bool) -> Tensor:
    """``[G, K, C_g, M_p]`` (``channels_last=False``: output channels innermost) or ``[G, K, M_g, C_p]``."""
    c, mg = w.shape[0], w.shape[1]
    wg = w.reshape(groups, c // groups, mg, -1)  # [G, C_g, M_g, K]
    return _pad_last(wg.permute(0, 3, 2, 1) if channels_last else wg.permute(0, 3, 1, 2))


def _grad_rows(grad: Tensor, groups: int) -> Tensor:
    """The upstream gradient as ``[N, *O, G, M_p]`` float32 (channels last, zero-padded lanes)."""
    g = grad.to(torch.float32).movedim(1, -1)
    return _pad_last(g.unflatten(-1, (groups, g.shape[-1] // groups)))


def conv_transpose_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, output_padding,
                           groups: int, dilation) -> Tensor:
    if not _native(x, w, bias):
        return _ct.conv_transpose_forward(x, w, bias, stride, padding, output_padding, groups, dilation)
    dtype = x.dtype
    x, w, bias = _f32(x), _f32(w), _f32(bias)
    kernel = tuple(w.shape[2:])
    out = _ct.out_shape(x.shape[2:], kernel, stride, padding, output_padding, dilation)
    batch, c, m = x.shape[0], x.shape[1], w.shape[1] * groups
    mg = m // groups
    ycl = torch.empty((batch, *out, groups, mg + (-mg % LANES)), dtype=torch.float32)
    if ycl.numel():
        wt, geom = _wt(w, groups, False), _geometry(x.shape[2:], out, kernel, stride, padding, dilation)  # kept alive
        rc = _library().l1fx_convt_forward(_ptr(x), _ptr(wt), _ptr(bias), _ptr(ycl), batch, c, m, groups,
                                           ctypes.cast(geom, ctypes.c_void_p), torch.get_num_threads())
        _check(rc, "l1fx_convt_forward")
    return ycl[..., :mg].flatten(-2).movedim(-1, 1).to(dtype).contiguous()


def conv_transpose_backward(grad: Tensor, x: Tensor, w: Tensor, stride, padding, output_padding, groups: int,
                            dilation, mix: float, need_x: bool, need_w: bool
                            ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    if not _native(x, w, grad):
        return _ct.conv_transpose_backward(grad, x, w, stride, padding, output_padding, groups, dilation, mix,
                                           need_x, need_w)
    xdtype, wdtype = x.dtype, w.dtype
    x, w = _f32(x), _f32(w)
    gcl = _grad_rows(grad, groups)
    kernel = tuple(w.shape[2:])
    out = list(grad.shape[2:])
    batch, c, m = x.shape[0], x.shape[1], w.shape[1] * groups
    geom_array = _geometry(x.shape[2:], out, kernel, stride, padding, dilation)  # alive during the calls
    geom = ctypes.cast(geom_array, ctypes.c_void_p)
    threads, mix = torch.get_num_threads(), float(mix)
    gx = gw = None
    if need_x:
        gx, wx = torch.empty_like(x), _wt(w, groups, True)
        rc = _library().l1fx_convt_input_grad(_ptr(gcl), _ptr(x), _ptr(wx), _ptr(gx), mix,
                                              batch, c, m, groups, geom, threads)
        _check(rc, "l1fx_convt_input_grad")
        gx = gx.to(xdtype)
    if need_w:
        gw, wt = torch.empty_like(w), _wt(w, groups, False)
        rc = _library().l1fx_convt_weight_grad(_ptr(gcl), _ptr(x), _ptr(wt), _ptr(gw), mix,
                                               batch, c, m, groups, geom, threads)
        _check(rc, "l1fx_convt_weight_grad")
        gw = gw.to(wdtype)
    return gx, gw
