"""The l1 transposed convolution: geometry and the reference kernel (plain PyTorch, the oracle).

Definition (docs/l1_ops.md, "Transposed convolution"): output position ``o``
receives the pairs (input ``i``, tap ``k``) with ``o = i*stride + k*dilation -
padding`` per spatial dim, and

    y[n, m, o] = b[m] - sum over the pairs of o, over the channels c of m's group, of |x[n, c, i] - w[c, m_g, k]|

with the weight in torch's ConvTranspose layout ``[C_in, M/groups, *kernel]``.
Only the real pairs are summed: this is *not* an l1 convolution over a
zero-stuffed input (whose inserted zeros would add ``|w|`` terms).

For one tap ``k`` the pairs are a box of inputs mapped with stride ``stride``
onto a box of outputs, so the reference runs, per tap and group, the exact
chunked linear core (:mod:`l1fx.kernels.reference`) on the box's rows
(``[rows, C_g]`` against ``[M_g, C_g]``) and adds the result into the strided
output box. Each summand is formed from ``fl(x - w)`` in the accumulation dtype
(float32 for 16-bit inputs, which are exact in it); partial sums stay in that
dtype and the result is rounded once. Temporaries: the linear core's chunks
(``chunk_bytes``) plus input- and output-sized copies.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .reference import acc_dtype


def out_shape(spatial: Sequence[int], kernel, stride, padding, output_padding, dilation) -> list[int]:
    """Output size per dim, as ``F.conv_transpose*d``: ``(I-1)s - 2p + d(k-1) + output_padding + 1``."""
    return [(i - 1) * s - 2 * p + d * (k - 1) + op + 1
            for i, k, s, p, op, d in zip(spatial, kernel, stride, padding, output_padding, dilation)]


def tap_range(k: int, size_in: int, size_out: int, stride: int, padding: int, dilation: int) -> Optional[tuple]:
    """Inputs ``[i0, i1)`` whose tap ``k`` lands inside the output, and the first output ``o0``; None if none."""
    shift = k * dilation - padding  # o = i*stride + shift
    i0 = max(0, -(shift // stride)) if shift < 0 else 0  # smallest i with o >= 0: ceil(-shift / stride)
    i1 = min(size_in, (size_out - 1 - shift) // stride + 1) if size_out - 1 - shift >= 0 else 0
    if i1 <= i0:
        return None
    return i0, i1, i0 * stride + shift


def taps(x_spatial, out, kernel, stride, padding, dilation) -> Iterator[tuple[int, tuple, tuple]]:
    """``(flat tap index, input slices, output slices)`` for every tap that has pairs."""
    for t, offs in enumerate(itertools.product(*(range(k) for k in kernel))):
        ranges = [tap_range(k, i, o, s, p, d)
                  for k, i, o, s, p, d in zip(offs, x_spatial, out, stride, padding, dilation)]
        if any(r is None for r in ranges):
            continue
        isl = tuple(slice(i0, i1) for i0, i1, _ in ranges)
        osl = tuple(slice(o0, o0 + (i1 - i0 - 1) * s + 1, s) for (i0, i1, o0), s in zip(ranges, stride))
        yield t, isl, osl


def _filters(w: Tensor, groups: int, acc: torch.dtype) -> Tensor:
    """``[G, K, M_g, C_g]``: per group and tap, the filters of the linear core (rows: output channels)."""
    c, mg = w.shape[0], w.shape[1]
    return w.to(acc).reshape(groups, c // groups, mg, -1).permute(0, 3, 2, 1).contiguous()


def conv_transpose_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, output_padding,
                           groups: int, dilation) -> Tensor:
    """``y = b - sum_pairs |x - w|`` over the real (input, tap) pairs (see the module docstring)."""
    batch, c = x.shape[:2]
    mg, cg = w.shape[1], c // groups
    m = mg * groups
    kernel = tuple(w.shape[2:])
    out = out_shape(x.shape[2:], kernel, stride, padding, output_padding, dilation)
    acc = acc_dtype(x.dtype)
    xcl = x.movedim(1, -1).to(acc)  # [N, *I, C]
    wf = _filters(w, groups, acc)
    ycl = torch.zeros((batch, *out, m), dtype=acc, device=x.device)
    for t, isl, osl in taps(x.shape[2:], out, kernel, stride, padding, dilation):
        rows = xcl[(slice(None), *isl)].reshape(-1, c)
        dst = ycl[(slice(None), *osl)]  # strided view [N, *box, M]
        for g in range(groups):
            part = reference.linear_forward(rows[:, g * cg:(g + 1) * cg], wf[g, t], None)  # [R, M_g]
            dst[..., g * mg:(g + 1) * mg] += part.view(*dst.shape[:-1], mg)
    if bias is not None:
        ycl += bias.to(acc)
    return ycl.movedim(-1, 1).to(x.dtype).contiguous()


def conv_transpose_backward(grad: Tensor, x: Tensor, w: Tensor, stride, padding, output_padding, groups: int,
                            dilation, mix: float, need_x: bool, need_w: bool
                            ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """MGS gradients over the same pairs (docs/l1_ops.md): per tap and group, the linear core's backward.

    ``gx[c, i] = sum_{k, m} g[m, o(i, k)] * (mix*HardTanh(w - x) + (1-mix)*sign(w - x))``,
    ``gw[c, m, k] = sum_{n, i} g[m, o(i, k)] * (mix*(x - w) + (1-mix)*sign(x - w))``.
    """
    batch, c = x.shape[:2]
    mg, cg = w.shape[1], c // groups
    m = mg * groups
    kernel = tuple(w.shape[2:])
    out = list(grad.shape[2:])
    acc = acc_dtype(x.dtype)
    xcl = x.movedim(1, -1).to(acc)
    gcl = grad.movedim(1, -1).to(acc)  # [N, *O, M]
    wf = _filters(w, groups, acc)
    gxcl = torch.zeros(xcl.shape, dtype=acc, device=x.device) if need_x else None
    gwf = torch.zeros_like(wf) if need_w else None
    if need_x or need_w:
        for t, isl, osl in taps(x.shape[2:], out, kernel, stride, padding, dilation):
            rows = xcl[(slice(None), *isl)].reshape(-1, c)
            grows = gcl[(slice(None), *osl)].reshape(-1, m)
            for g in range(groups):
                gxr, gwr = reference.linear_backward(grows[:, g * mg:(g + 1) * mg], rows[:, g * cg:(g + 1) * cg],
                                                     wf[g, t], mix, need_x, need_w)
                if need_x:
                    dst = gxcl[(slice(None), *isl)][..., g * cg:(g + 1) * cg]
                    dst += gxr.view(dst.shape)
                if need_w:
                    gwf[g, t] += gwr
    gx = gxcl.movedim(-1, 1).to(x.dtype).contiguous() if need_x else None
    gw = None
    if need_w:  # [G, K, M_g, C_g] back to [C, M_g, *kernel]
        gw = gwf.permute(0, 3, 2, 1).reshape(w.shape).to(w.dtype).contiguous()
    return gx, gw
