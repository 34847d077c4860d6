"""Reference l1 kernels: plain PyTorch, exact, chunked.

This is the oracle every faster backend is tested against. It never builds
the full N x M x K broadcast: rows and filters are processed in blocks whose
temporaries fit in :func:`l1fx.kernels.chunk_bytes`. Half-precision inputs
are accumulated in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .memory import chunk_bytes, split


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit floats, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _blocks(n: int, m: int, k: int, itemsize: int, temporaries: int):
    """Yield (n0, n1, m0, m1) blocks whose ``temporaries`` n*m*k buffers fit the budget."""
    budget = chunk_bytes()
    per_filter_row = max(k, 1) * itemsize * temporaries
    bm = split(m, per_filter_row, budget)
    bn = split(n, per_filter_row * bm, budget)
    for n0 in range(0, n, bn):
        for m0 in range(0, m, bm):
            yield n0, min(n0 + bn, n), m0, min(m0 + bm, m)


def linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y[n, m] = -sum_k |x[n, k] - w[m, k]| + bias[m]`` for 2-D ``x``, ``w``."""
    n, k = x.shape
    m = w.shape[0]
    acc = acc_dtype(x.dtype)
    out = torch.empty(n, m, dtype=x.dtype, device=x.device)
    wa = w.to(acc)
    ba = None if bias is None else bias.to(acc)
    for n0, n1, m0, m1 in _blocks(n, m, k, torch.finfo(acc).bits // 8, 1):
        d = x[n0:n1, None, :].to(acc) - wa[None, m0:m1, :]
        y = d.abs_().sum(-1).neg_()
        if ba is not None:
            y += ba[m0:m1]
        out[n0:n1, m0:m1] = y
    return out


def mgs_mix(d: Tensor, mix: float, clip: bool) -> Tensor:
    """The MGS blend of ``d = x - w``: ``mix * d' + (1 - mix) * sign(d)``.

    ``d'`` is ``d`` itself for the weight gradient and ``HardTanh(d)`` for the
    input gradient (``clip=True``), as in AdderNet. Consumes ``d``.
    """
    if mix == 0.0:
        return d.sign_()
    s = d.sign()
    if clip:
        d.clamp_(-1.0, 1.0)
    if mix == 1.0:
        return d
    return d.mul_(mix).add_(s, alpha=1.0 - mix)


def linear_backward(
    g: Tensor, x: Tensor, w: Tensor, mix: float, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """MGS gradients of ``linear_forward``.

    ``gw[m, k] = sum_n g[n, m] * (mix * (x - w) + (1 - mix) * sign(x - w))``
    ``gx[n, k] = sum_m g[n, m] * (mix * HardTanh(w - x) + (1 - mix) * sign(w - x))``
    """
    n, k = x.shape
    m = w.shape[0]
    acc = acc_dtype(x.dtype)
    ga, wa = g.to(acc), w.to(acc)
    gx = torch.zeros(n, k, dtype=acc, device=x.device) if need_x else None
    gw = torch.zeros(m, k, dtype=acc, device=x.device) if need_w else None
    if not (need_x or need_w):
        return None, None
    # Two live n*m*k temporaries at most: d and its sign inside mgs_mix.
    for n0, n1, m0, m1 in _blocks(n, m, k, torch.finfo(acc).bits // 8, 2):
        xa = x[n0:n1].to(acc)
        gb = ga[n0:n1, m0:m1]
        if need_w:
            d = xa[:, None, :] - wa[None, m0:m1, :]
            t = mgs_mix(d, mix, clip=False)
            gw[m0:m1] += torch.einsum("nm,nmk->mk", gb, t)
            del d, t
        if need_x:
            d = xa[:, None, :] - wa[None, m0:m1, :]
            # HardTanh(w - x) = -HardTanh(x - w); sign likewise.
            t = mgs_mix(d, mix, clip=True)
            gx[n0:n1] -= torch.einsum("nm,nmk->nk", gb, t)
            del d, t
    return (
        None if gx is None else gx.to(x.dtype),
        None if gw is None else gw.to(w.dtype),
    )


def _build_backend():
    from . import Backend

    return Backend(name="reference", linear_forward=linear_forward, linear_backward=linear_backward, priority=0)


BACKEND = _build_backend()
