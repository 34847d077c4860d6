"""l1 layers that drop in for ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

Constructor signatures, parameter names and shapes are those of the
torch.nn classes, so a dense layer's ``state_dict`` loads with
``strict=True``. ``mgs_mix`` (float in [0, 1], default 1.0) is the Mixed
Gradient Strategy blend passed to the op; the training controller drives it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.common_types import _size_1_t, _size_2_t, _size_3_t
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _pair, _single, _triple

from . import functional as L1F

__all__ = ["L1Linear", "L1Conv1d", "L1Conv2d", "L1Conv3d", "L1Module", "L1_MODULES", "DENSE_TO_L1"]


class L1Module:
    """Mixin marking l1 layers; ``mgs_mix`` and a layer name for error messages."""

    mgs_mix: float
    # Set by l1fx.convert to the qualified name, so errors name the layer.
    l1fx_name: Optional[str] = None

    def _error_name(self) -> str:
        return self.l1fx_name or self._get_name()

    def _init_l1(self) -> None:
        self.mgs_mix = 1.0

    @classmethod
    def from_dense(cls, module: nn.Module):
        raise NotImplementedError  # overridden below per class


class L1Linear(L1Module, nn.Module):
    """``y = -sum_k |x_k - W[m, k]| + b[m]`` with ``nn.Linear``'s interface."""

    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._init_l1()
        self.reset_parameters()

    # Same initialisation as nn.Linear (documented choice: the sources give none for l1 layers
    # beyond "as the baseline"); converted layers keep the dense weights anyway.
    reset_parameters = nn.Linear.reset_parameters

    def forward(self, input: Tensor) -> Tensor:
        return L1F.l1_linear(input, self.weight, self.bias, mix=self.mgs_mix, name=self._error_name())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @classmethod
    def from_dense(cls, module: nn.Linear) -> "L1Linear":
        if not isinstance(module, nn.Linear):
            raise TypeError(f"L1Linear.from_dense expects nn.Linear, got {type(module).__name__}")
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype)
        _copy_params(module, new)
        return new


class _L1ConvNd(L1Module, _ConvNd):
    _dense: type = nn.Conv1d

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        nd = len(self.kernel_size)
        name = self._error_name()
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        elif self.padding == "same":
            pairs = L1F.same_padding(self.kernel_size, self.dilation)
            if any(lo != hi for lo, hi in pairs):
                input = F.pad(input, self._reversed_padding_repeated_twice)
                padding = 0
            else:
                padding = [lo for lo, _ in pairs]
        else:
            padding = self.padding
        fn = (L1F.l1_conv1d, L1F.l1_conv2d, L1F.l1_conv3d)[nd - 1]
        return fn(input, weight, bias, self.stride, padding, self.dilation, self.groups, mix=self.mgs_mix, name=name)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    @classmethod
    def from_dense(cls, module: nn.Module):
        if type(module) is not cls._dense and not isinstance(module, cls._dense):
            raise TypeError(f"{cls.__name__}.from_dense expects {cls._dense.__name__}, got {type(module).__name__}")
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode,
            device=module.weight.device, dtype=module.weight.dtype,
        )
        _copy_params(module, new)
        return new


def _make_conv(nd: int, dense: type, to_tuple, size_t):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: size_t, stride: size_t = 1,
                 padding=0, dilation: size_t = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        padding_ = padding if isinstance(padding, str) else to_tuple(padding)
        _ConvNd.__init__(
            self, in_channels, out_channels, to_tuple(kernel_size), to_tuple(stride), padding_,
            to_tuple(dilation), False, to_tuple(0), groups, bias, padding_mode, **factory,
        )
        self._init_l1()

    name = f"L1Conv{nd}d"
    cls = type(name, (_L1ConvNd,), {
        "__init__": __init__, "_dense": dense, "__module__": __name__,
        "__doc__": f"l1 analogue of ``nn.Conv{nd}d`` (same constructor), ``y = -sum |patch - filter| + b``.",
    })
    return cls


L1Conv1d = _make_conv(1, nn.Conv1d, _single, _size_1_t)
L1Conv2d = _make_conv(2, nn.Conv2d, _pair, _size_2_t)
L1Conv3d = _make_conv(3, nn.Conv3d, _triple, _size_3_t)


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.weight.requires_grad_(src.weight.requires_grad)
    if src.bias is not None:
        dst.bias.requires_grad_(src.bias.requires_grad)
    dst.train(src.training)


L1_MODULES = (L1Linear, L1Conv1d, L1Conv2d, L1Conv3d)
DENSE_TO_L1 = {nn.Linear: L1Linear, nn.Conv1d: L1Conv1d, nn.Conv2d: L1Conv2d, nn.Conv3d: L1Conv3d}


# ---------------------------------------------------------------- added by l1fx.convert
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

__all__ += ["L1OutputNorm", "L1FunctionalCall", "l1_output_norm_hook"]


class L1OutputNorm(_BatchNorm):
    """Learnable output normalisation inserted after l1 layers by ``l1fx.convert(normalize="auto")``.

    l1 outputs are large negative numbers (``-sum |x - w|`` grows with the fan-in);
    AdderNet follows every adder layer with batch normalisation, so this is
    BatchNorm over every dimension except ``channel_dim`` (1 for convolutions,
    -1 for linear layers, whose features are last). Running statistics make
    evaluation deterministic, and it exports to ONNX as Transpose +
    BatchNormalization. See docs/convert.md.
    """

    def __init__(self, num_features: int, channel_dim: int = 1, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True, device=device, dtype=dtype)
        self.channel_dim = channel_dim

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"L1OutputNorm: expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: Tensor) -> Tensor:
        dim = self.channel_dim % input.dim()
        if dim == 1:
            return super().forward(input)
        return super().forward(input.movedim(dim, 1)).movedim(1, dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channel_dim={self.channel_dim}"


def l1_output_norm_hook(module: nn.Module, args, output: Tensor) -> Tensor:
    """Forward hook applying ``module.l1fx_norm``: used where convert could not edit a graph."""
    return module.l1fx_norm(output)


class L1FunctionalCall(L1Module, nn.Module):
    """An ``F.linear`` / ``F.conv1d/2d/3d`` call on a model parameter, made l1.

    ``l1fx.convert`` replaces such a call node with a call of this module,
    passing the same arguments (the weight stays where the model keeps it, so
    no state_dict key changes). It registers no parameters; ``weight`` is a
    plain reference to the model's parameter named ``weight_name`` (so code
    that walks :class:`L1Module` instances and reads ``m.weight`` works), kept
    up to date from the argument of each call. Being an :class:`L1Module`, it
    carries ``mgs_mix`` for the training controller like the l1 layers do.
    """

    FUNCTIONS = {"linear": L1F.l1_linear, "conv1d": L1F.l1_conv1d, "conv2d": L1F.l1_conv2d,
                 "conv3d": L1F.l1_conv3d}

    def __init__(self, op: str, weight_name: str, weight: Optional[Tensor] = None) -> None:
        nn.Module.__init__(self)
        if op not in self.FUNCTIONS:
            raise ValueError(f"L1FunctionalCall: op must be one of {sorted(self.FUNCTIONS)}, got {op!r}")
        self.op = op
        self.weight_name = weight_name
        self.l1fx_name = weight_name
        # Stored outside _parameters on purpose: registering it would add a state_dict key.
        self.__dict__["_l1fx_weight"] = weight
        self._init_l1()

    @property
    def weight(self) -> Optional[Tensor]:
        return self.__dict__.get("_l1fx_weight")

    def forward(self, *args, **kwargs) -> Tensor:
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if isinstance(weight, nn.Parameter):
            self.__dict__["_l1fx_weight"] = weight
        return self.FUNCTIONS[self.op](*args, **kwargs, mix=self.mgs_mix, name=self._error_name())

    def extra_repr(self) -> str:
        return f"op=l1_{self.op}, weight={self.weight_name}"
