"""The l1 operators as ``torch.library`` custom ops.

Registering them as custom ops (rather than autograd.Functions) makes each
one a single opaque node under torch.fx, torch.compile and torch.export,
which is what the passes, the ONNX exporter and the reports key on:

* ``torch.ops.l1fx.linear(x, weight, bias, mix)``
* ``torch.ops.l1fx.conv(x, weight, bias, stride, padding, dilation, groups, mix)``

Padding here is explicit and symmetric; the functional wrappers resolve
``'same'``/``'valid'`` and padding modes first. ``mix`` only affects the
backward pass (the Mixed Gradient Strategy, see docs/l1_ops.md).

Backends are chosen per op: ``get_backend(x, op="linear")`` for linear and
``kernels.conv_kernels(x)`` for conv (the backend's own conv kernels, or the
im2col lowering onto its linear core), so under ``auto`` a backend that runs
only linear leaves conv to the next one. This module must not import
``l1fx.layers`` (the registry refers to these ops, so they come first).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from l1fx.kernels import conv as _conv
from l1fx.kernels import conv_kernels, get_backend

LINEAR = "l1fx::linear"
CONV = "l1fx::conv"


def _empty_like_none(t: Tensor) -> Tensor:
    # Custom ops must return tensors; an empty tensor stands for "no gradient".
    return t.new_empty((0,))


# Zero sizes are answered here, before any backend runs, so no backend needs
# code for them: with an empty reduction (K = 0: no features, or no input
# channels per group) every output is its bias (or 0), as in F.linear; with
# no rows or no filters there is nothing to compute; every gradient of an
# empty sum is 0. (F.conv*d with zero input channels returns a tensor with
# zero output channels, a PyTorch quirk not copied: the output has M channels.)

def _filled(shape, bias: Optional[Tensor], like: Tensor) -> Tensor:
    """A new ``shape`` tensor [N, M, *spatial] holding ``bias`` per output channel (dim 1), or zeros."""
    y = like.new_zeros(shape)
    if bias is not None and y.numel():
        y += bias.to(y.dtype).reshape(-1, *[1] * (len(shape) - 2))
    return y


# ---------------------------------------------------------------- linear
@torch.library.custom_op(LINEAR, mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], mix: float) -> Tensor:
    k, m = weight.shape[1], weight.shape[0]
    if x.numel() == 0 or weight.numel() == 0:  # N, M or K is 0
        rows = x.shape[:-1].numel()
        return _filled((rows, m), bias, x).reshape(*x.shape[:-1], m)
    x2 = x.reshape(-1, k).contiguous()
    y = get_backend(x, op="linear").linear_forward(x2, weight.contiguous(), None if bias is None else bias.contiguous())
    return y.reshape(*x.shape[:-1], m)


@linear.register_fake
def _(x, weight, bias, mix):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("l1fx::linear_backward", mutates_args=())
def linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, mix: float, need_x: bool, need_w: bool
) -> tuple[Tensor, Tensor]:
    k, m = weight.shape[1], weight.shape[0]
    if x.numel() == 0 or weight.numel() == 0:
        return (torch.zeros_like(x) if need_x else _empty_like_none(x),
                torch.zeros_like(weight) if need_w else _empty_like_none(weight))
    gx, gw = get_backend(x, op="linear").linear_backward(
        grad.reshape(-1, m).contiguous(), x.reshape(-1, k).contiguous(), weight.contiguous(), mix, need_x, need_w
    )
    return (
        gx.reshape(x.shape) if gx is not None else _empty_like_none(x),
        gw if gw is not None else _empty_like_none(weight),
    )


@linear_backward.register_fake
def _(grad, x, weight, mix, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, mix = inputs
    ctx.save_for_backward(x, weight)
    ctx.mix = mix
    ctx.has_bias = bias is not None


def _linear_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = linear_backward(grad, x, weight, ctx.mix, need_x, need_w)
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and need_b:
        gb = grad.reshape(grad.shape[:-1].numel(), weight.shape[0]).sum(0)  # (not -1: M may be 0)
    return gx, gw, gb, None


linear.register_autograd(_linear_bwd, setup_context=_linear_setup)


# ---------------------------------------------------------------- conv

@torch.library.custom_op(CONV, mutates_args=())
def conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
    dilation: list[int], groups: int, mix: float,
) -> Tensor:
    if _conv_is_empty(x, weight, groups):
        out = _conv.out_shape(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        return _filled((x.shape[0], weight.shape[0], *out), bias, x)
    _, forward, _ = conv_kernels(x)
    return forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
               stride, padding, dilation, groups)


def _conv_is_empty(x: Tensor, weight: Tensor, groups: int) -> bool:
    """No batch, no filters or no input channels per group (an empty reduction)."""
    return x.shape[0] == 0 or weight.shape[0] == 0 or weight.shape[1] == 0


@conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, mix):
    out = _conv.out_shape(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], *out))


@torch.library.custom_op("l1fx::conv_backward", mutates_args=())
def conv_backward(
    grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, mix: float, need_x: bool, need_w: bool,
) -> tuple[Tensor, Tensor]:
    if _conv_is_empty(x, weight, groups):
        return (torch.zeros_like(x) if need_x else _empty_like_none(x),
                torch.zeros_like(weight) if need_w else _empty_like_none(weight))
    _, _, backward = conv_kernels(x)
    gx, gw = backward(grad.contiguous(), x.contiguous(), weight.contiguous(), stride, padding, dilation, groups,
                 mix, need_x, need_w)
    return (gx if gx is not None else _empty_like_none(x), gw if gw is not None else _empty_like_none(weight))


@conv_backward.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, mix, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, mix = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (list(stride), list(padding), list(dilation), groups, mix)
    ctx.has_bias = bias is not None


def _conv_bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups, mix = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = conv_backward(grad, x, weight, stride, padding, dilation, groups, mix, need_x, need_w)
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and need_b:
        gb = grad.sum(dim=[0] + list(range(2, grad.dim())))
    return gx, gw, gb, None, None, None, None, None


conv.register_autograd(_conv_bwd, setup_context=_conv_setup)
