"""The ``cpu`` backend's ℓp kernels (``csrc/lp_cpu.cpp``, built and cached like the ℓ1 kernels).

float32 (and bfloat16, computed in float32) CPU tensors with finite values;
anything else (NaN/inf in the data, found by the C++ entry points; mixed dtypes)
runs the reference ℓp kernel,
which puts NaN/inf where the formula does. Fast paths for p = 2 (one FMA per
element, no ``||x||^2 + ||w||^2 - 2 x.w``), p = inf (a max), integer and
half-integer p (multiplies, a square root); other p take two passes (the max,
then the scaled powers by a vector exp2/log2). See the top of the C++ file.
Convolutions are lowered onto this linear core by :mod:`l1fx.kernels.conv`.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..errors import KernelError
from . import lp_reference
from .cpu_build import load_once

SOURCE = Path(__file__).with_name("csrc") / "lp_cpu.cpp"
LIB_NAME = "l1fx_lp_cpu"
DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_state: dict = {}


def _declare(lib: ctypes.CDLL) -> Optional[dict]:
    """ctypes signatures of the library's functions."""
    vp, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.l1fx_lp_forward.argtypes = [vp, vp, vp, vp, i64, i64, i64, f32, ctypes.c_int]
    lib.l1fx_lp_backward.argtypes = [vp, vp, vp, vp, vp, vp, f32, i64, i64, i64, f32, ctypes.c_int]
    lib.l1fx_lp_forward.restype = lib.l1fx_lp_backward.restype = ctypes.c_int


def _library() -> Optional[ctypes.CDLL]:
    return load_once(_state, _lock, SOURCE, LIB_NAME, _declare)


def available() -> tuple[bool, str]:
    return (True, "") if _library() is not None else (False, _state["error"])


def supports(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPES


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(rc: int, fn: str) -> None:
    if rc:
        raise KernelError(f"l1fx cpu kernel {fn} failed with code {rc}; this is a bug in l1fx, please report it "
                          "(set L1FX_BACKEND=reference to work around it)")


NONFINITE = 3  # the C++ return code for a NaN/inf input (then the reference kernel answers)


def _same_dtype(*ts: Optional[Tensor]) -> bool:
    present = [t for t in ts if t is not None]
    return all(t.dtype == present[0].dtype for t in present)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def lp_linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], p: float) -> Tensor:
    if not _same_dtype(x, w, bias):
        return lp_reference.linear_forward(x, w, bias, p)
    n, k = x.shape
    m = w.shape[0]
    xf, wf, bf = _f32(x), _f32(w), _f32(bias)
    y = torch.empty(n, m, dtype=torch.float32)
    rc = _library().l1fx_lp_forward(_ptr(xf), _ptr(wf), _ptr(bf), _ptr(y), n, k, m, float(p), torch.get_num_threads())
    if rc == NONFINITE:
        return lp_reference.linear_forward(x, w, bias, p)
    _check(rc, "l1fx_lp_forward")
    return y.to(x.dtype)


def lp_linear_backward(g: Tensor, x: Tensor, w: Tensor, p: float, mix: float, need_x: bool, need_w: bool):
    if not (need_x or need_w):
        return None, None
    if not _same_dtype(g, x, w):
        return lp_reference.linear_backward(g, x, w, p, mix, need_x, need_w)
    n, k = x.shape
    m = w.shape[0]
    gf, xf, wf = _f32(g), _f32(x), _f32(w)
    # The exact half needs the norms r; mix = 1 (AdderNet's full-precision gradient) does not.
    r = lp_linear_forward(xf, wf, None, p).neg_() if mix != 1.0 else torch.zeros(n, m)
    gx = torch.empty(n, k) if need_x else None
    gw = torch.empty(m, k) if need_w else None
    rc = _library().l1fx_lp_backward(_ptr(gf), _ptr(xf), _ptr(wf), _ptr(r), _ptr(gx), _ptr(gw), float(mix),
                                     n, k, m, float(p), torch.get_num_threads())
    if rc == NONFINITE:
        return lp_reference.linear_backward(g, x, w, p, mix, need_x, need_w)
    _check(rc, "l1fx_lp_backward")
    return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(w.dtype))
