"""The int8 l1 CPU kernels (``csrc/l1_int8.cpp``): VPSADBW on AVX-512BW / AVX2, portable C++ elsewhere.

Built on first use and cached exactly like the fp32 kernels (same
:func:`l1fx.kernels.cpu_build.load`: compiled with ``-march=native`` where
the compiler takes it, verified by size and sha256 before every load, per-user
and per-process fallbacks for an unusable cache). Which instruction set the
library was compiled for is ``build_info()["isa"]``; every call may ask for a
lower one (``isa=``), so the tests check the AVX2 and portable paths against
the reference on an AVX-512 machine too.

If the library cannot be built, :func:`available` says why; the int8 layers
then use the reference kernel with one warning (``L1FX_BACKEND=auto``) or
raise :class:`~l1fx.errors.BackendUnavailable` (``L1FX_BACKEND=cpu``).
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..errors import BackendUnavailable
from . import int8_reference as ref
from .cpu_build import build_info as build_info_of
from .cpu_build import load_once

SOURCE = Path(__file__).with_name("csrc") / "l1_int8.cpp"
LIB_NAME = "l1fx_int8"
ISA_NAMES = {0: "portable", 1: "avx2", 2: "avx512bw"}

_lock = threading.Lock()
_state: dict = {}


def _declare(lib: ctypes.CDLL) -> Optional[dict]:
    """ctypes signatures of the library's functions."""
    vp, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.l1fx_i8_linear.argtypes = [i32, vp, vp, i64, i64, i64, f32, i32, i32, f32, vp, vp, i32, i32, i32]
    lib.l1fx_i8_linear.restype = i32
    lib.l1fx_i8_quantize.argtypes = [vp, vp, i64, f32, i32, i32]
    lib.l1fx_i8_quantize.restype = i64
    lib.l1fx_i8_patches.argtypes = [vp, i64, i64, i64, i64, i64, vp, i64, i64, vp, i32]
    lib.l1fx_i8_patches.restype = i32
    lib.l1fx_i8_pointwise_cf.argtypes = [vp, vp, i64, i64, i64, i64, f32, i32, f32, vp, vp, i32]
    lib.l1fx_i8_pointwise_cf.restype = i32
    lib.l1fx_i8_isa.argtypes = []
    lib.l1fx_i8_isa.restype = i32
    return {"isa": ISA_NAMES[lib.l1fx_i8_isa()]}


def _library() -> Optional[ctypes.CDLL]:
    return load_once(_state, _lock, SOURCE, LIB_NAME, _declare)


def reset() -> None:
    """Forget the build/load outcome (tests; after installing a compiler)."""
    with _lock:
        _state.clear()


def available() -> tuple[bool, str]:
    return (True, "") if _library() is not None else (False, _state["error"])


def build_info() -> dict:
    """Library path and instruction set (or the build error), and the seconds spent on first use."""
    _library()
    return build_info_of(_state)


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise BackendUnavailable(f"l1fx int8 cpu kernels are unavailable: {_state['error'].splitlines()[0]}")
    return lib


def _isa(isa: Optional[int]) -> int:
    return 2 if isa is None else int(isa)


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(rc: int) -> None:
    if rc:
        from ..errors import KernelError

        why = {1: "bad kind", 2: "int32 output could overflow", 3: "float input with integer output"}.get(rc, "?")
        raise KernelError(f"l1fx int8 kernel l1fx_i8_linear failed with code {rc} ({why}); this is a bug in l1fx, "
                          f"please report it (set L1FX_BACKEND=reference to work around it)")


def linear_codes(qx: Tensor, packed: Tensor, m: int, *, isa: Optional[int] = None) -> Tensor:
    """Exact ``sum_k |qx - qw|`` of uint8 codes ``qx [N, K]``: int32 when ``255 K < 2^31``, else int64."""
    n, k = qx.shape
    qx = qx.contiguous()
    out_kind = 1 if k <= ref.INT32_MAX_K else 2
    out = torch.empty(n, m, dtype=torch.int32 if out_kind == 1 else torch.int64)
    _check(_lib().l1fx_i8_linear(1, _ptr(qx), _ptr(packed), n, k, m, 1.0, 0, out_kind, 1.0, None, _ptr(out),
                                 _isa(isa), torch.get_num_threads(), 0))
    return out


def linear(x: Tensor, packed: Tensor, m: int, scale: float, zero_point: int, bias: Optional[Tensor], *,
           isa: Optional[int] = None, stream: Optional[bool] = None) -> Tensor:
    """``bias + -(scale * sum_k |q(x) - qw|)`` in float32 from float32 rows ``x`` (quantised in the kernel).

    ``x`` may also be uint8 codes (then NaN cannot occur). NaN rows give NaN. ``stream``: non-temporal stores
    of the output (None: the kernel decides by size; it also needs AVX-512BW, ``m % 16 == 0``, an aligned
    output). The same bits either way; it only changes the speed.
    """
    n, k = x.shape
    kind = 1 if x.dtype == torch.uint8 else 0
    x = x.contiguous() if kind else x.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(n, m, dtype=torch.float32)
    _check(_lib().l1fx_i8_linear(kind, _ptr(x), _ptr(packed), n, k, m, float(scale), int(zero_point), 0, float(scale),
                                 _ptr(bias), _ptr(y), _isa(isa), torch.get_num_threads(),
                                 -1 if stream is None else int(bool(stream))))
    return y


def quantize(x: Tensor, scale: float, zero_point: int) -> tuple[Tensor, int]:
    """(uint8 codes of float32 ``x``, number of NaNs), as :func:`int8_reference.quantize_codes`."""
    x = x.to(torch.float32).contiguous()
    q = torch.empty(x.shape, dtype=torch.uint8)
    nans = _lib().l1fx_i8_quantize(_ptr(x), _ptr(q), x.numel(), float(scale), int(zero_point),
                                   torch.get_num_threads())
    return q, int(nans)


def patches(qp: Tensor, geometry: list[int], p0: int, p1: int, c0: int, cg: int) -> Tensor:
    """Patch rows ``[p1 - p0, cg * prod(kernel)]`` of one padded sample ``qp [C, D, H, W]`` (uint8, 3-d form).

    ``geometry``: kernel, stride, dilation and output size, 3 each (1-d/2-d as 3-d with leading 1s).
    """
    qp = qp.contiguous()
    kprod = geometry[0] * geometry[1] * geometry[2]
    rows = torch.empty(p1 - p0, cg * kprod, dtype=torch.uint8)
    g = (ctypes.c_int64 * 12)(*geometry)
    _lib().l1fx_i8_patches(_ptr(qp), c0, cg, qp.shape[1], qp.shape[2], qp.shape[3], ctypes.cast(g, ctypes.c_void_p),
                           p0, p1, _ptr(rows), torch.get_num_threads())
    return rows


def pointwise_channels_first(x: Tensor, weight_rows: Tensor, scale: float, zero_point: int,
                             bias: Optional[Tensor]) -> Optional[Tensor]:
    """``y [N, M, L]`` of a pointwise int8 layer on ``x [N, K, L]`` without transposing either (AVX-512BW only).

    ``weight_rows``: the codes ``[M, ceil(K/8)*8]``, zero padded. None where the library lacks the mode.
    """
    if _library() is None or _state.get("isa") != "avx512bw":
        return None
    n, k, l = x.shape
    m = weight_rows.shape[0]
    x = x.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(n, m, l, dtype=torch.float32)
    if y.numel() == 0:
        return y
    rc = _lib().l1fx_i8_pointwise_cf(_ptr(x), _ptr(weight_rows), n, k, l, m, float(scale), int(zero_point),
                                     float(scale), _ptr(bias), _ptr(y), torch.get_num_threads())
    if rc == 4:
        return None
    _check(rc)
    return y
