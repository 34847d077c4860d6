"""l1 convolution lowered onto the linear core by chunked im2col.

The padded input is copied once to channels-last layout and viewed as
patches with ``Tensor.unfold`` (a view). Patch rows are ordered
(kernel offset, channel) with channels innermost, so copying one chunk of
rows into a dense ``[rows, prod(kernel) * C_g]`` matrix moves contiguous
channel runs instead of gathering 3-wide kernel windows (about 10x faster);
the filters are permuted to the same order, which the l1 sum does not mind.
Only one chunk of rows exists at a time, so the extra memory is bounded by
the chunk budget whatever the grid size. The input gradient is folded back
with one strided add per kernel offset (no col2im buffer).

Backends may replace this lowering: the ``cpu`` backend runs the forward and
the stride-1 input gradient as direct C++ kernels and comes back here only
for the rest (see :mod:`l1fx.kernels.cpu`).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import chunk_bytes

# Smallest chunk worth a kernel call; below it, per-call overhead dominates.
_MIN_CHUNK = 1 << 20


def _pad_pairs(padding: Sequence[int]) -> list[int]:
    # F.pad wants (last_lo, last_hi, ..., first_lo, first_hi).
    out: list[int] = []
    for p in reversed(padding):
        out += [p, p]
    return out


def out_shape(spatial: Sequence[int], kernel, stride, padding, dilation) -> list[int]:
    return [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(spatial, kernel, stride, padding, dilation)
    ]


def _channels_last_padded(x: Tensor, padding) -> Tensor:
    """``[B, *spatial + 2 * padding, C]`` contiguous copy of the zero-padded input."""
    xp = F.pad(x, _pad_pairs(padding)) if any(padding) else x
    return xp.movedim(1, -1).contiguous()


def _patch_view(xcl: Tensor, kernel, stride, dilation, groups: int) -> Tensor:
    """``[B, *out, *kernel, G, C_g]`` view of the channels-last padded input's patches."""
    nd = len(kernel)
    v = xcl
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        v = v.unfold(1 + i, (k - 1) * d + 1, s)  # appends the window dim: [B, *out, C, *k]
    if any(d != 1 for d in dilation):
        v = v[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]
    v = v.movedim(1 + nd, -1)  # [B, *out, *k, C]
    return v.unflatten(-1, (groups, v.shape[-1] // groups))


def _filters(w: Tensor, groups: int) -> Tensor:
    """``[G, M_g, prod(kernel) * C_g]`` filters in the (kernel offset, channel) order of the patches."""
    m, cg = w.shape[0], w.shape[1]
    wg = w.reshape(groups, m // groups, cg, -1).transpose(2, 3)
    return wg.reshape(groups, m // groups, -1).contiguous()


def _chunk_budget(out_bytes: int) -> int:
    # Keep the im2col chunk near the output size for small layers, so a layer's
    # extra memory stays a small multiple of its output, never above the global budget.
    return min(chunk_bytes(), max(out_bytes // 2, _MIN_CHUNK))


def _row_chunks(batch: int, out: Sequence[int], row_bytes: int, budget: int) -> Iterator[tuple[slice, slice]]:
    """Chunks of output rows as (batch slice, first-spatial-dim slice)."""
    per_sample = math.prod(out)
    rows = max(1, budget // max(row_bytes, 1))
    if per_sample <= rows:
        bs = max(1, rows // max(per_sample, 1))
        for b0 in range(0, batch, bs):
            yield slice(b0, min(b0 + bs, batch)), slice(None)
        return
    per_slice = math.prod(out[1:])
    n1 = max(1, rows // max(per_slice, 1))
    for b in range(batch):
        for o0 in range(0, out[0], n1):
            yield slice(b, b + 1), slice(o0, min(o0 + n1, out[0]))


def conv_forward(backend, x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    kernel = tuple(w.shape[2:])
    batch, m = x.shape[0], w.shape[0]
    out = out_shape(x.shape[2:], kernel, stride, padding, dilation)
    y = torch.empty((batch, m, *out), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    pv = _patch_view(_channels_last_padded(x, padding), kernel, stride, dilation, groups)
    wg = _filters(w, groups)
    mg, kg = wg.shape[1], wg.shape[2]
    y_rows = y.movedim(1, -1).unflatten(-1, (groups, mg))  # [B, *out, G, Mg] view
    budget = _chunk_budget(y.numel() * y.element_size())
    for bsl, osl in _row_chunks(batch, out, kg * x.element_size(), budget):
        for g in range(groups):
            cols = pv[bsl, osl][..., g, :].reshape(-1, kg)
            yb = backend.linear_forward(cols, wg[g], None if bias is None else bias[g * mg:(g + 1) * mg])
            dst = y_rows[bsl, osl][..., g, :]
            dst.copy_(yb.view(dst.shape))
    return y


def conv_backward(
    backend, grad: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int,
    mix: float, need_x: bool, need_w: bool,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    kernel = tuple(w.shape[2:])
    batch, c, m = x.shape[0], x.shape[1], w.shape[0]
    out = list(grad.shape[2:])
    cg, mg = c // groups, m // groups
    # 16-bit inputs: the chunks go to the linear core as float32 and the sums over
    # chunks and kernel offsets stay float32, so the result is rounded once
    # (summing rounded bfloat16 partial sums would not be exact to bfloat16).
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xcl = _channels_last_padded(x, padding)
    gxcl = torch.zeros(xcl.shape, dtype=acc, device=x.device) if need_x else None
    wg = _filters(w, groups).to(acc)
    kg = wg.shape[2]
    gwg = torch.zeros_like(wg) if need_w else None
    if grad.numel() and (need_x or need_w):
        pv = _patch_view(xcl, kernel, stride, dilation, groups)
        g_rows = grad.movedim(1, -1).unflatten(-1, (groups, mg))
        budget = _chunk_budget(grad.numel() * grad.element_size())
        for bsl, osl in _row_chunks(batch, out, (kg + mg) * x.element_size(), budget):
            for g in range(groups):
                cols = pv[bsl, osl][..., g, :].reshape(-1, kg).to(acc)
                gb = g_rows[bsl, osl][..., g, :].reshape(-1, mg).to(acc)
                gcols, gwb = backend.linear_backward(gb, cols, wg[g], mix, need_x, need_w)
                if need_w:
                    gwg[g] += gwb
                if need_x:
                    _fold_add(gxcl[bsl, ..., g * cg:(g + 1) * cg], gcols, osl, out, kernel, stride, dilation)
    gx = _unpad(gxcl.movedim(-1, 1), padding).to(x.dtype) if need_x else None
    gw = None
    if need_w:
        # Back from (kernel offset, channel) order to the weight's [M, C_g, *kernel].
        gw = gwg.reshape(groups, mg, -1, cg).transpose(2, 3).reshape(w.shape).to(w.dtype)
    return gx, gw


def _fold_add(dst: Tensor, gcols: Tensor, osl: slice, out, kernel, stride, dilation) -> None:
    """Scatter-add patch gradients ``[rows, prod(k) * C_g]`` into the channels-last padded input grad."""
    nb, cg = dst.shape[0], dst.shape[-1]
    o0 = osl.start or 0
    o_first = (osl.stop if osl.stop is not None else out[0]) - o0
    chunk_out = [o_first] + list(out[1:])
    gc = gcols.reshape(nb, *chunk_out, *kernel, cg)
    nd = len(kernel)
    for offs in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None)]
        for i, (j, s, d, n) in enumerate(zip(offs, stride, dilation, chunk_out)):
            start = j * d + (o0 * s if i == 0 else 0)
            index.append(slice(start, start + (n - 1) * s + 1, s))
        dst[tuple(index)] += gc[(slice(None),) * (1 + nd) + offs]


def _unpad(t: Tensor, padding) -> Tensor:
    """Crop the padding of an NC... tensor and return it contiguous (NCDHW)."""
    index = [slice(None), slice(None)] + [slice(p, t.shape[2 + i] - p) for i, p in enumerate(padding)]
    return t[tuple(index)].contiguous()
