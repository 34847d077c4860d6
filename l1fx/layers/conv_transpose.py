"""Layer kinds ``conv_transpose1d/2d/3d``: ``nn.ConvTransposeNd`` / ``F.conv_transposeNd`` -> ``L1ConvTransposeNd``.

The ℓ1 transposed convolution sums ``|x[i] - w[k]|`` over the real (input,
tap) pairs of each output, ``o = i*stride + k*dilation - padding``
(docs/l1_ops.md). All three share the custom op ``torch.ops.l1fx.conv_transpose``
and the ONNX op ``l1fx.L1ConvTranspose``. MACs are the dense layer's (each
input element reads one weight row ``[out/groups, *kernel]``, as
``FlopCounterMode`` counts ``ConvTranspose``), so the energy report compares
like with like. ``LazyConvTranspose`` layers convert once materialised (before
that, analyse lists them as lazy, with the reason).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import nn

from .. import ops_transpose  # noqa: F401  (defines torch.ops.l1fx.conv_transpose before it is registered)
from . import LayerSpec, OnnxSchema, count_macs, register_layer

ONNX = OnnxSchema("L1ConvTranspose", attributes=("strides", "pads", "output_padding", "dilations", "group"))


def transpose_macs(out_shape: Sequence[int], weight_shape: Sequence[int],
                   in_shape: Optional[Sequence[int]] = None) -> int:
    """``prod(in_shape) * prod(weight[1:])``: every input element meets one ``[out/groups, *kernel]`` row."""
    if in_shape is None:  # no input shape recorded: the output-side count of an equivalent convolution
        return count_macs(out_shape, weight_shape)
    return math.prod(in_shape) * math.prod(weight_shape[1:])


def call_features(weight, args: tuple, kwargs: dict) -> int:
    """``F.conv_transpose*d(x, w, b, stride, padding, output_padding, groups, ...)``: ``w.shape[1] * groups``."""
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    return weight.shape[1] * groups


def _spec(nd: int, module: type, function) -> LayerSpec:
    cls, fn = f"ConvTranspose{nd}d", f"conv_transpose{nd}d"
    return LayerSpec(
        name=fn,
        module=module,
        functions=(function,),
        source_modules=(f"torch.nn.{cls}", f"torch.nn.modules.{cls}", f"torch.nn.modules.conv.{cls}"),
        source_functions=(f"torch.nn.functional.{fn}", f"torch.{fn}"),  # F.conv_transpose*d is torch.conv_transpose*d
        l1_module=f"l1fx.nn.L1{cls}",
        l1_function=f"l1fx.functional.l1_{fn}",
        l1_aliases=(f"l1fx.L1{cls}",),
        l1_op="l1fx::conv_transpose",
        onnx=ONNX,
        channel_dim=1,
        features_attr="out_channels",
        weight_in_dim=0,  # [in, out/groups, *kernel]
        call_features=call_features,
        macs=transpose_macs,
        label_of=lambda m: type(m).__name__,  # LazyConvTranspose2d stays "LazyConvTranspose2d"
    )


CONV_TRANSPOSE = tuple(
    register_layer(_spec(nd, module, function))
    for nd, module, function in ((1, nn.ConvTranspose1d, F.conv_transpose1d),
                                 (2, nn.ConvTranspose2d, F.conv_transpose2d),
                                 (3, nn.ConvTranspose3d, F.conv_transpose3d))
)
