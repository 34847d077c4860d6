"""The ℓp operators (``p > 1`` or ``p = inf``) as ``torch.library`` custom ops.

* ``torch.ops.l1fx.lp_linear(x, weight, bias, p, mix)``
* ``torch.ops.l1fx.lp_conv(x, weight, bias, stride, padding, dilation, groups, p, mix)``

``y = -||x - w||_p + b`` per row (linear) or patch (conv). ``p = 1`` is the ℓ1
op of :mod:`l1fx.ops` (the functional wrappers route it there); these ops are
for every other ``p``. As there, padding is explicit and symmetric, zero sizes
are answered before any kernel runs, and ``mix`` only affects the backward
(the MGS blend for ℓp, docs/l1_ops.md "ℓp layers").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from l1fx.kernels import conv as _conv
from l1fx.kernels import lp as _lp

from .ops import _conv_is_empty, _empty_like_none, _filled

LP_LINEAR = "l1fx::lp_linear"
LP_CONV = "l1fx::lp_conv"


# ---------------------------------------------------------------- linear
@torch.library.custom_op(LP_LINEAR, mutates_args=())
def lp_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, mix: float) -> Tensor:
    k, m = weight.shape[1], weight.shape[0]
    if x.numel() == 0 or weight.numel() == 0:  # N, M or K is 0: every norm of an empty vector is 0
        rows = x.shape[:-1].numel()
        return _filled((rows, m), bias, x).reshape(*x.shape[:-1], m)
    y = _lp.lp_linear_forward(x.reshape(-1, k).contiguous(), weight.contiguous(),
                              None if bias is None else bias.contiguous(), p)
    return y.reshape(*x.shape[:-1], m)


@lp_linear.register_fake
def _(x, weight, bias, p, mix):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("l1fx::lp_linear_backward", mutates_args=())
def lp_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, p: float, mix: float, need_x: bool,
                       need_w: bool) -> tuple[Tensor, Tensor]:
    k, m = weight.shape[1], weight.shape[0]
    if x.numel() == 0 or weight.numel() == 0:
        return (torch.zeros_like(x) if need_x else _empty_like_none(x),
                torch.zeros_like(weight) if need_w else _empty_like_none(weight))
    gx, gw = _lp.lp_linear_backward(grad.reshape(-1, m).contiguous(), x.reshape(-1, k).contiguous(),
                                    weight.contiguous(), p, mix, need_x, need_w)
    return (gx.reshape(x.shape) if gx is not None else _empty_like_none(x),
            gw if gw is not None else _empty_like_none(weight))


@lp_linear_backward.register_fake
def _(grad, x, weight, p, mix, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, p, mix = inputs
    ctx.save_for_backward(x, weight)
    ctx.p, ctx.mix, ctx.has_bias = p, mix, bias is not None


def _linear_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = lp_linear_backward(grad, x, weight, ctx.p, ctx.mix, need_x, need_w)
        gx, gw = (gx if need_x else None), (gw if need_w else None)
    if ctx.has_bias and need_b:
        gb = grad.reshape(grad.shape[:-1].numel(), weight.shape[0]).sum(0)
    return gx, gw, gb, None, None


lp_linear.register_autograd(_linear_bwd, setup_context=_linear_setup)


# ---------------------------------------------------------------- conv
@torch.library.custom_op(LP_CONV, mutates_args=())
def lp_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
            dilation: list[int], groups: int, p: float, mix: float) -> Tensor:
    if _conv_is_empty(x, weight, groups):
        out = _conv.out_shape(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        return _filled((x.shape[0], weight.shape[0], *out), bias, x)
    return _lp.lp_conv_forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                               stride, padding, dilation, groups, p)


@lp_conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, p, mix):
    out = _conv.out_shape(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], *out))


@torch.library.custom_op("l1fx::lp_conv_backward", mutates_args=())
def lp_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, p: float, mix: float, need_x: bool,
                     need_w: bool) -> tuple[Tensor, Tensor]:
    if _conv_is_empty(x, weight, groups):
        return (torch.zeros_like(x) if need_x else _empty_like_none(x),
                torch.zeros_like(weight) if need_w else _empty_like_none(weight))
    gx, gw = _lp.lp_conv_backward(grad.contiguous(), x.contiguous(), weight.contiguous(), stride, padding,
                                  dilation, groups, p, mix, need_x, need_w)
    return (gx if gx is not None else _empty_like_none(x), gw if gw is not None else _empty_like_none(weight))


@lp_conv_backward.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, p, mix, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, p, mix = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (list(stride), list(padding), list(dilation), groups, p, mix)
    ctx.has_bias = bias is not None


def _conv_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = lp_conv_backward(grad, x, weight, *ctx.args, need_x, need_w)
        gx, gw = (gx if need_x else None), (gw if need_w else None)
    if ctx.has_bias and need_b:
        gb = grad.sum(dim=[0] + list(range(2, grad.dim())))
    return gx, gw, gb, None, None, None, None, None, None


lp_conv.register_autograd(_conv_bwd, setup_context=_conv_setup)
