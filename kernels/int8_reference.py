"""Reference int8 l1 kernels in plain PyTorch: the oracle of the int8 C++ kernels.

The quantised l1 layer (see docs/int8.md) computes, on uint8 codes that share
one scale ``s`` and zero point ``z`` for input and weight,

    acc[n, m] = sum_k |qx[n, k] - qw[m, k]|        (exact, int64)
    y[n, m]   = bias[m] + -(s * float32(acc))      (the only rounding)

``quantize_codes`` is the one definition of the codes,
``q = clamp(round_half_even(x / s) + z, 0, 255)`` in float32: the operations of
the C++ kernel and of ONNX ``QuantizeLinear``, so all three give the same codes
bit for bit. Everything here is chunked by :func:`l1fx.kernels.chunk_bytes`.

The conv lowering (:func:`conv_rows`) is shared by both backends: the input
is quantised once, padded with the zero point (zero padding in float is the
code ``z`` exactly, since the grid always holds 0), and the patch rows of a
chunk of output positions are gathered from strided views (no full unfold)
and handed to the linear core.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import chunk_bytes, split

QMIN, QMAX = 0, 255
INT32_MAX_K = (2**31 - 1) // QMAX  # 8,421,504: 255 * K < 2^31 for every K up to this


def scale_tensor(scale: float) -> Tensor:
    """``scale`` as a 0-d float32 tensor (the grid's scales are float32 values, see ``choose_qparams``)."""
    return torch.tensor(float(scale), dtype=torch.float32)


def quantize_codes(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """uint8 codes of float ``x`` (NaN -> ``zero_point``; callers that care find NaNs themselves)."""
    q = torch.round(x.to(torch.float32) / scale_tensor(scale)) + float(zero_point)
    q = q.clamp_(QMIN, QMAX).nan_to_num_(float(zero_point))
    return q.to(torch.uint8)


def pack_weight(qw: Tensor) -> Tensor:
    """``[M, K]`` uint8 codes -> the C++ kernels' layout ``[ceil(M/8), ceil(K/8), 8, 8]``, zero padded."""
    m, k = qw.shape
    mb, kb = -(-m // 8), -(-k // 8)
    padded = torch.zeros(mb * 8, kb * 8, dtype=torch.uint8)
    padded[:m, :k] = qw
    return padded.view(mb, 8, kb, 8).permute(0, 2, 1, 3).contiguous()


def linear_codes(qx: Tensor, qw: Tensor) -> Tensor:
    """``acc[n, m] = sum_k |qx[n, k] - qw[m, k]|`` as int64 (exact for any size), chunked."""
    n, k = qx.shape
    m = qw.shape[0]
    out = torch.empty(n, m, dtype=torch.int64)
    wi = qw.to(torch.int16)
    budget = chunk_bytes()
    bm = split(m, max(k, 1) * 2, budget)
    bn = split(n, max(k, 1) * 2 * bm, budget)
    for n0 in range(0, n, bn):
        xi = qx[n0:n0 + bn].to(torch.int16)
        for m0 in range(0, m, bm):
            d = xi[:, None, :] - wi[None, m0:m0 + bm, :]
            out[n0:n0 + bn, m0:m0 + bm] = d.abs_().sum(-1, dtype=torch.int64)
    return out


def dequantize(acc: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    """``bias + -(scale * float32(acc))`` in float32, the operations the C++ kernel does."""
    y = (acc.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)).neg_()
    if bias is not None:
        y = bias.to(torch.float32) + y
    return y


def linear(x: Tensor, qw: Tensor, scale: float, zero_point: int, bias: Optional[Tensor]) -> Tensor:
    """Float ``x [N, K]`` -> float32 ``y [N, M]`` of the int8 layer; a row holding NaN gives NaN."""
    y = dequantize(linear_codes(quantize_codes(x, scale, zero_point), qw), scale, bias)
    if x.is_floating_point():
        nan = torch.isnan(x).any(-1)
        if bool(nan.any()):
            y[nan] = float("nan")
    return y


# ---------------------------------------------------------------- conv lowering (both backends)

def _patch_view(qp: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """``[N, C, *in]`` (padded codes) -> the strided view ``[N, *out, C, *kernel]`` of its patches."""
    nd = len(kernel)
    v = qp
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        v = v.unfold(2 + i, span, stride[i])  # appends a window axis of length span
    # windows -> every dilation-th element
    idx = (slice(None),) * (2 + nd) + tuple(slice(None, None, d) for d in dilation)
    v = v[idx]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return v.permute(perm)


def conv_rows(q: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int, zero_point: int, m: int,
              linear_fn: Callable[[Tensor, int], Tensor], gather: Optional[Callable] = None) -> Tensor:
    """The conv of uint8 codes ``q [N, C, *in]`` through ``linear_fn(rows [R, C/g*prod(kernel)], group)``.

    ``linear_fn`` returns ``[R, M/g]`` float32; the result is ``[N, M, *out]``.
    Rows are gathered a chunk of output positions at a time (bounded memory):
    by ``gather(qp3 [C, D, H, W], geometry, p0, p1, c0, cg)`` (the C++ gather,
    :func:`l1fx.kernels.int8_cpu.patches`) where given, else from strided views.
    """
    nd = len(kernel)
    pads = [p for i in reversed(range(nd)) for p in (padding[i], padding[i])]
    qp = F.pad(q, pads, value=zero_point) if any(pads) else q
    n, c = q.shape[0], q.shape[1]
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
           for s, p, d, k, st in zip(q.shape[2:], padding, dilation, kernel, stride)]
    cg, mg = c // groups, m // groups
    kg = cg * math.prod(kernel)
    positions = math.prod(out)
    y = torch.empty(n, positions, m, dtype=torch.float32)
    step = split(positions, max(kg, 1), chunk_bytes())
    if gather is not None:
        lead = 3 - nd
        geometry = [1] * lead + list(kernel) + [1] * lead + list(stride) + [1] * lead + list(dilation) + [1] * lead + out
        qp3 = qp.reshape(n, c, *([1] * lead), *qp.shape[2:])
        for b in range(n):
            sample = qp3[b].contiguous()
            for p0 in range(0, positions, step):
                p1 = min(p0 + step, positions)
                for g in range(groups):
                    rows = gather(sample, geometry, p0, p1, g * cg, cg)
                    y[b, p0:p1, g * mg:(g + 1) * mg] = linear_fn(rows, g)
        return y.view(n, *out, m).movedim(-1, 1)
    view = _patch_view(qp, kernel, stride, dilation)  # [N, *out, C, *kernel]
    inner = math.prod(out[1:])  # positions per index of the first output axis
    yv = y.view(n, *out, m)
    # chunks of the first output axis: each reshape copies only the patch rows of one chunk
    step = max(1, step // max(inner, 1))
    for b in range(n):
        for a0 in range(0, out[0], step):
            block = view[b, a0:a0 + step].reshape(-1, c, *kernel)
            dst = yv[b, a0:a0 + step].view(-1, m)
            for g in range(groups):
                rows = block[:, g * cg:(g + 1) * cg].reshape(block.shape[0], kg)
                dst[:, g * mg:(g + 1) * mg] = linear_fn(rows.contiguous(), g)
    return yv.movedim(-1, 1)


def nan_positions(x: Tensor, kernel: Sequence[int], stride, padding, dilation, groups: int, m: int) -> Optional[Tensor]:
    """Boolean ``[N, M, *out]``: outputs whose patch holds a NaN (None when ``x`` has none)."""
    bad = torch.isnan(x)
    if not bool(bad.any()):
        return None
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    ones = torch.ones(m, x.shape[1] // groups, *kernel)
    return conv(bad.to(torch.float32), ones, None, stride, padding, dilation, groups) > 0

