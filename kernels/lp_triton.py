"""The ``triton`` backend's ℓp kernels: the forward in Triton, the backward by the reference kernel.

The forward (:mod:`.lp_triton_kernels`) has fast paths for p = 2, inf, n and
n + 1/2 (n <= 8) and a scaled two-pass path for other p; rows it flags (a sum
that overflowed, underflowed or is NaN) are recomputed by the reference kernel,
so NaN/inf and extreme magnitudes come out as the formula says. The backward
(the MGS blend of docs/l1_ops.md) runs the chunked reference kernel on the
tensors' device. Same availability and tensor rules as :mod:`.triton_backend`
(a GPU, or ``TRITON_INTERPRET=1`` with ``L1FX_BACKEND=triton`` for tests).
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Optional

import torch
from torch import Tensor

from . import lp_reference
from . import triton_backend as tb

available = tb.available
supports = tb.supports


@functools.lru_cache(maxsize=None)
def _kernels():
    return importlib.import_module(f"{__package__}.lp_triton_kernels")


def mode_for(p: float) -> tuple[int, int, bool]:
    """(MODE, NPOW, HALF) of the kernel for ``p`` (see :mod:`.lp_triton_kernels`)."""
    p = float(p)
    if math.isinf(p):
        return 1, 1, False
    if p == 2.0:
        return 0, 2, False
    if p <= 8.5 and (2 * p).is_integer():
        return 2, int(p), p != int(p)
    return 3, 1, False


def lp_norms(x: Tensor, w: Tensor, p: float) -> Tensor:
    """``r[n, m] = ||x[n] - w[m]||_p`` (accumulation dtype), flagged rows recomputed by the reference."""
    tb._check_device(x)
    n, k = x.shape
    m = w.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = torch.empty(n, m, dtype=acc, device=x.device)
    mode, npow, half = mode_for(p)
    block_n, block_m = (16, 16) if _kernels().INTERPRETED else (64, 64)
    grid = (tb._cdiv(n, block_n), tb._cdiv(m, block_m))
    with tb._device_guard(x):
        _kernels().lp_norm_fwd[grid](
            x, w, r, n, m, k, float(p), 0.0 if math.isinf(p) else 1.0 / p,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            MODE=mode, NPOW=npow, HALF=half, ACC=tb._tl_acc(x.dtype), BLOCK_N=block_n, BLOCK_M=block_m,
        )
    bad = (r < 0).any(1)
    if bool(bad.any()):
        r[bad] = lp_reference.linear_forward(x[bad].to(acc), w.to(acc), None, p).neg_()
    return r


def lp_linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], p: float) -> Tensor:
    n, m = x.shape[0], w.shape[0]
    if n == 0 or m == 0:
        return torch.empty(n, m, dtype=x.dtype, device=x.device)
    r = lp_norms(x.contiguous(), w.contiguous(), p).neg_()
    if bias is not None:
        r += bias.to(r.dtype)
    return r.to(x.dtype)


def lp_linear_backward(g: Tensor, x: Tensor, w: Tensor, p: float, mix: float, need_x: bool, need_w: bool):
    return lp_reference.linear_backward(g, x, w, p, mix, need_x, need_w)
