"""Layer kinds ``conv1d/2d/3d``: ``nn.ConvNd`` / ``F.convNd`` -> ``l1fx.nn.L1ConvNd`` / ``l1fx.functional.l1_convNd``.

All three share the ℓ1 custom op ``torch.ops.l1fx.conv`` and the ONNX op ``l1fx.L1Conv``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import LayerSpec, OnnxSchema, register_layer

ONNX = OnnxSchema("L1Conv", attributes=("strides", "pads", "dilations", "group"))


def pointwise_module(m: nn.Module) -> bool:
    """Kernel 1 in every dim, stride 1, no padding, one group: a per-position channel mix."""
    if not isinstance(m, _ConvNd) or isinstance(m, _ConvTransposeNd):
        return False  # e.g. an L1FunctionalCall: its call node decides (pointwise_call)
    return (all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and m.groups == 1
            and (m.padding == "valid" or m.padding == "same" or all(p == 0 for p in m.padding)))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _all_eq(v, want) -> bool:
    return v == want if isinstance(v, int) else isinstance(v, (tuple, list)) and all(e == want for e in v)


def pointwise_call(args: tuple, kwargs: dict, weight) -> bool:
    """The same test for an ``F.conv*d(x, weight, bias, stride, padding, dilation, groups)`` call."""
    stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
    groups = _arg(args, kwargs, 6, "groups", 1)
    return (all(k == 1 for k in weight.shape[2:]) and _all_eq(stride, 1) and groups == 1
            and (padding in ("valid", "same") or _all_eq(padding, 0)))


def _spec(nd: int, module: type, function) -> LayerSpec:
    cls, fn = f"Conv{nd}d", f"conv{nd}d"
    return LayerSpec(
        name=fn,
        module=module,
        functions=(function,),
        source_modules=(f"torch.nn.{cls}", f"torch.nn.modules.{cls}", f"torch.nn.modules.conv.{cls}"),
        # F.conv*d *is* torch.conv*d: both spellings are rewritten
        source_functions=(f"torch.nn.functional.{fn}", f"torch.{fn}"),
        l1_module=f"l1fx.nn.L1{cls}",
        l1_function=f"l1fx.functional.l1_{fn}",
        l1_aliases=(f"l1fx.L1{cls}",),
        l1_op="l1fx::conv",
        onnx=ONNX,
        channel_dim=1,
        features_attr="out_channels",
        pointwise_module=pointwise_module,
        pointwise_call=pointwise_call,
    )


CONV1D = register_layer(_spec(1, nn.Conv1d, F.conv1d))
CONV2D = register_layer(_spec(2, nn.Conv2d, F.conv2d))
CONV3D = register_layer(_spec(3, nn.Conv3d, F.conv3d))
