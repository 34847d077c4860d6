"""The l1 transposed convolution as ``torch.library`` custom ops (one opaque node, like ``l1fx::conv``).

* ``torch.ops.l1fx.conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation, mix)``
  (the arguments of ``F.conv_transpose*d``, explicit lists; ``mix`` only affects the backward),
* ``torch.ops.l1fx.conv_transpose_backward(...)``, its MGS gradients.

``y[o] = b - sum over the real pairs (i, k) with o = i*stride + k*dilation - padding of |x[i] - w[k]|``
(docs/l1_ops.md, "Transposed convolution"). The kernels are chosen by
:func:`l1fx.kernels.conv_transpose_kernels` (``cpu`` C++ kernels, else the
reference). Like :mod:`l1fx.ops`, this module must not import ``l1fx.layers``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from l1fx.kernels import conv_transpose as _ct
from l1fx.kernels import conv_transpose_kernels

from .ops import _empty_like_none, _filled

CONV_TRANSPOSE = "l1fx::conv_transpose"


def _out(x: Tensor, weight: Tensor, stride, padding, output_padding, groups: int, dilation) -> list[int]:
    return [x.shape[0], weight.shape[1] * groups,
            *_ct.out_shape(x.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)]


def _is_empty(x: Tensor, weight: Tensor) -> bool:
    """No batch, no input channels (an empty reduction: every output is its bias) or no output channels."""
    return x.shape[0] == 0 or weight.shape[0] == 0 or weight.shape[1] == 0


@torch.library.custom_op(CONV_TRANSPOSE, mutates_args=())
def conv_transpose(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
    output_padding: list[int], groups: int, dilation: list[int], mix: float,
) -> Tensor:
    if _is_empty(x, weight):
        return _filled(_out(x, weight, stride, padding, output_padding, groups, dilation), bias, x)
    _, forward, _ = conv_transpose_kernels(x)
    return forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                   list(stride), list(padding), list(output_padding), groups, list(dilation))


@conv_transpose.register_fake
def _(x, weight, bias, stride, padding, output_padding, groups, dilation, mix):
    return x.new_empty(_out(x, weight, stride, padding, output_padding, groups, dilation))


@torch.library.custom_op("l1fx::conv_transpose_backward", mutates_args=())
def conv_transpose_backward(
    grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], output_padding: list[int],
    groups: int, dilation: list[int], mix: float, need_x: bool, need_w: bool,
) -> tuple[Tensor, Tensor]:
    if _is_empty(x, weight):
        return (torch.zeros_like(x) if need_x else _empty_like_none(x),
                torch.zeros_like(weight) if need_w else _empty_like_none(weight))
    _, _, backward = conv_transpose_kernels(x)
    gx, gw = backward(grad.contiguous(), x.contiguous(), weight.contiguous(), list(stride), list(padding),
                      list(output_padding), groups, list(dilation), mix, need_x, need_w)
    return (gx if gx is not None else _empty_like_none(x), gw if gw is not None else _empty_like_none(weight))


@conv_transpose_backward.register_fake
def _(grad, x, weight, stride, padding, output_padding, groups, dilation, mix, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)))


def _setup(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, groups, dilation, mix = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (list(stride), list(padding), list(output_padding), groups, list(dilation), mix)
    ctx.has_bias = bias is not None


def _bwd(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = gw = gb = None
    if need_x or need_w:
        gx, gw = conv_transpose_backward(grad, x, weight, *ctx.args, need_x, need_w)
        gx = gx if need_x else None
        gw = gw if need_w else None
    if ctx.has_bias and need_b:
        gb = grad.sum(dim=[0] + list(range(2, grad.dim())))
    return gx, gw, gb, None, None, None, None, None, None


conv_transpose.register_autograd(_bwd, setup_context=_setup)
