"""l1 convolution lowered onto the linear core by chunked im2col.

``x`` is padded once, then viewed as patches with ``Tensor.unfold`` (a view,
no copy). Only one chunk of patch rows is copied into a dense
``[rows, C_g * prod(kernel)]`` matrix at a time, so the extra memory is
bounded by the chunk budget whatever the grid size. The input gradient is
folded back with one strided add per kernel offset (no col2im buffer).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import chunk_bytes


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


def _patch_view(xp: Tensor, kernel, stride, dilation) -> Tensor:
    """``[B, C, *out, *kernel]`` view of the padded input's patches."""
    nd = len(kernel)
    v = xp
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        v = v.unfold(2 + i, (k - 1) * d + 1, s)
    if any(d != 1 for d in dilation):
        v = v[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]
    assert v.dim() == 2 + 2 * nd
    return v


def _row_chunks(batch: int, out: Sequence[int], row_bytes: int) -> Iterator[tuple[slice, slice]]:
    """Chunks of output rows as (batch slice, first-spatial-dim slice)."""
    budget = chunk_bytes()
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


def _group_view(v: Tensor, groups: int) -> Tensor:
    """``[B, C, *out, *k]`` -> ``[G, B, *out, C_g, *k]`` (a view)."""
    nd = (v.dim() - 2) // 2
    v = v.unflatten(1, (groups, v.shape[1] // groups))  # [B, G, Cg, *out, *k]
    order = [1, 0] + list(range(3, 3 + nd)) + [2] + list(range(3 + nd, 3 + 2 * nd))
    return v.permute(order)


def conv_forward(backend, x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    nd = x.dim() - 2
    kernel = tuple(w.shape[2:])
    batch, m = x.shape[0], w.shape[0]
    out = out_shape(x.shape[2:], kernel, stride, padding, dilation)
    y = torch.empty((batch, m, *out), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    xp = F.pad(x, _pad_pairs(padding)) if any(padding) else x
    pv = _group_view(_patch_view(xp, kernel, stride, dilation), groups)
    mg = m // groups
    wg = w.reshape(groups, mg, -1)
    kg = wg.shape[-1]
    y_rows = y.movedim(1, -1).unflatten(-1, (groups, mg))  # [B, *out, G, Mg] view
    for bsl, osl in _row_chunks(batch, out, kg * x.element_size()):
        for g in range(groups):
            cols = pv[g][bsl, osl].reshape(-1, kg)
            yb = backend.linear_forward(cols, wg[g], None if bias is None else bias[g * mg:(g + 1) * mg])
            dst = y_rows[bsl, osl][..., g, :]
            dst.copy_(yb.view(dst.shape))
    return y


def conv_backward(
    backend, grad: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int,
    mix: float, need_x: bool, need_w: bool,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    nd = x.dim() - 2
    kernel = tuple(w.shape[2:])
    batch, c, m = x.shape[0], x.shape[1], w.shape[0]
    out = list(grad.shape[2:])
    cg, mg = c // groups, m // groups
    wg = w.reshape(groups, mg, -1)
    kg = wg.shape[-1]
    xp = F.pad(x, _pad_pairs(padding)) if any(padding) else x
    gxp = torch.zeros_like(xp) if need_x else None
    gw = torch.zeros_like(wg) if need_w else None
    if grad.numel() == 0 or not (need_x or need_w):
        return (_unpad(gxp, padding) if need_x else None), (gw.reshape(w.shape) if need_w else None)
    pv = _group_view(_patch_view(xp, kernel, stride, dilation), groups)
    g_rows = grad.movedim(1, -1).unflatten(-1, (groups, mg))
    row_bytes = (kg + mg) * x.element_size()
    for bsl, osl in _row_chunks(batch, out, row_bytes):
        for g in range(groups):
            cols = pv[g][bsl, osl].reshape(-1, kg)
            gb = g_rows[bsl, osl][..., g, :].reshape(-1, mg)
            gcols, gwb = backend.linear_backward(gb, cols, wg[g], mix, need_x, need_w)
            if need_w:
                gw[g] += gwb
            if need_x:
                _fold_add(gxp[bsl, g * cg:(g + 1) * cg], gcols, osl, out, kernel, stride, dilation)
    return (_unpad(gxp, padding) if need_x else None), (gw.reshape(w.shape) if need_w else None)


def _fold_add(dst: Tensor, gcols: Tensor, osl: slice, out, kernel, stride, dilation) -> None:
    """Scatter-add patch gradients ``[rows, Cg * prod(k)]`` into the padded input grad."""
    nb, cg = dst.shape[0], dst.shape[1]
    o0 = osl.start or 0
    o_first = (osl.stop if osl.stop is not None else out[0]) - o0
    chunk_out = [o_first] + list(out[1:])
    gc = gcols.reshape(nb, *chunk_out, cg, *kernel)
    nd = len(kernel)
    # [b, *o, cg, *k] -> [b, cg, *o, *k]
    gc = gc.movedim(1 + nd, 1)
    for offs in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)]
        for i, (j, s, d, n) in enumerate(zip(offs, stride, dilation, chunk_out)):
            start = j * d + (o0 * s if i == 0 else 0)
            index.append(slice(start, start + (n - 1) * s + 1, s))
        dst[tuple(index)] += gc[(Ellipsis,) + offs]


def _unpad(t: Tensor, padding) -> Tensor:
    if not any(padding):
        return t
    index = [slice(None), slice(None)] + [slice(p, t.shape[2 + i] - p) for i, p in enumerate(padding)]
    return t[tuple(index)].contiguous()
