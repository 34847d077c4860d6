"""Reference ℓp kernels: plain PyTorch, exact, chunked (the oracle of the ℓp backends).

``y[n, m] = -||x[n] - w[m]||_p + bias[m]`` for a real ``p > 1`` or ``p = inf``
(``p = 1`` never comes here: it is the ℓ1 op, :mod:`l1fx.kernels.reference`).
Rows and filters are processed in blocks whose temporaries fit
:func:`l1fx.kernels.chunk_bytes`, so no N x M x K tensor exists.

The norm is computed *scaled* (see :func:`lp_norm`, docs/l1_ops.md "ℓp
layers"): ``r = a_max * (sum_k (|d_k| / a_max)^p)^(1/p)`` with
``a_max = max_k |d_k|``, so ``|d|^p`` neither overflows nor underflows for
large ``|d|`` or ``p``; every ratio is in [0, 1] and the largest is 1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .reference import _blocks, acc_dtype


def lp_norm(a: Tensor, p: float) -> Tensor:
    """``||a||_p`` over the last dim of ``a = |d| >= 0`` (consumed), scaled by the max; NaN/inf per the formula.

    ``r = 0`` where every ``|d|`` is 0, ``inf`` where one is infinite (and none NaN), NaN where one is NaN.
    """
    m = a.amax(-1, keepdim=True)  # NaN-propagating
    if math.isinf(p):
        return m.squeeze(-1)
    if p == 2.0:
        s = a.div_(m).square_().sum(-1)
    else:
        s = a.div_(m).pow_(p).sum(-1)
    m = m.squeeze(-1)
    r = m * s.pow_(1.0 / p)
    # 0/0 and inf/inf ratios are NaN: answer those rows from the max itself (0 or inf).
    return torch.where((m == 0) | torch.isinf(m), m, r)


def linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], p: float) -> Tensor:
    """``y[n, m] = -||x[n, :] - w[m, :]||_p + bias[m]`` for 2-D ``x``, ``w``."""
    n, k = x.shape
    m = w.shape[0]
    acc = acc_dtype(x.dtype)
    out = torch.empty(n, m, dtype=x.dtype, device=x.device)
    wa = w.to(acc)
    ba = None if bias is None else bias.to(acc)
    for n0, n1, m0, m1 in _blocks(n, m, k, torch.finfo(acc).bits // 8, 2):
        d = x[n0:n1, None, :].to(acc) - wa[None, m0:m1, :]
        y = lp_norm(d.abs_(), p).neg_()
        if ba is not None:
            y += ba[m0:m1]
        out[n0:n1, m0:m1] = y
    return out


def exact_grad(d: Tensor, p: float) -> Tensor:
    """``e = d||d||_p / d d``: ``sign(d) (|d| / r)^(p-1)`` per element, 0 where ``r = 0``.

    ``p = inf``: ``sign(d_k) / c`` on the ``c`` elements where ``|d_k| = r`` (ties share the unit
    subgradient evenly, as autograd of ``amax`` does), 0 elsewhere. Does not consume ``d``.
    """
    a = d.abs()
    r = lp_norm(a.clone(), p).unsqueeze(-1)
    if math.isinf(p):
        hit = (a == r).to(d.dtype)
        return d.sign() * hit / hit.sum(-1, keepdim=True).clamp_min(1.0)
    # |d| / r <= 1, so the power cannot overflow; r = 0 means d = 0 there: 0 * (0/0) -> set to 0.
    e = a.div_(r)
    e = e if p == 2.0 else e.pow_(p - 1.0)
    return torch.where(r == 0, torch.zeros_like(e), e.mul_(d.sign()))


def _blend(d: Tensor, p: float, mix: float, clip: bool) -> Tensor:
    """``mix * d' + (1 - mix) * e`` (``d'`` = ``d``, or ``HardTanh(d)`` with ``clip``); consumes ``d``."""
    if mix == 1.0:
        return d.clamp_(-1.0, 1.0) if clip else d
    e = exact_grad(d, p)
    if mix == 0.0:
        return e
    if clip:
        d.clamp_(-1.0, 1.0)
    return d.mul_(mix).add_(e, alpha=1.0 - mix)


def linear_backward(
    g: Tensor, x: Tensor, w: Tensor, p: float, mix: float, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """MGS gradients of :func:`linear_forward` (docs/l1_ops.md, "ℓp layers").

    ``gw[m, k] = sum_n g[n, m] * (mix * (x - w) + (1 - mix) * e)``,
    ``gx[n, k] = -sum_m g[n, m] * (mix * HardTanh(x - w) + (1 - mix) * e)``, ``e`` of :func:`exact_grad`.
    """
    n, k = x.shape
    m = w.shape[0]
    if not (need_x or need_w):
        return None, None
    acc = acc_dtype(x.dtype)
    ga, wa = g.to(acc), w.to(acc)
    gx = torch.zeros(n, k, dtype=acc, device=x.device) if need_x else None
    gw = torch.zeros(m, k, dtype=acc, device=x.device) if need_w else None
    for n0, n1, m0, m1 in _blocks(n, m, k, torch.finfo(acc).bits // 8, 4):
        xa = x[n0:n1].to(acc)
        gb = ga[n0:n1, m0:m1]
        if need_w:
            t = _blend(xa[:, None, :] - wa[None, m0:m1, :], p, mix, clip=False)
            gw[m0:m1] += torch.einsum("nm,nmk->mk", gb, t)
            del t
        if need_x:
            t = _blend(xa[:, None, :] - wa[None, m0:m1, :], p, mix, clip=True)
            gx[n0:n1] -= torch.einsum("nm,nmk->nk", gb, t)
            del t
    return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(w.dtype))
