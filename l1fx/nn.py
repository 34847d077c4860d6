"""l1 layers that drop in for ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``.

Constructor signatures, parameter names and shapes are those of the
torch.nn classes, so a dense layer's ``state_dict`` loads with
``strict=True``. ``mgs_mix`` (float in [0, 1], default 1.0) is the Mixed
Gradient Strategy blend passed to the op; the training controller drives it.

Which ℓ1 class replaces which dense kind is the registry's (:mod:`l1fx.layers`):
``DENSE_TO_L1`` and ``L1FunctionalCall.FUNCTIONS`` are live views of it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.common_types import _size_1_t, _size_2_t, _size_3_t
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _pair, _single, _triple

from . import functional as L1F
from . import layers  # registers the kinds (and the FLOP formula of the l1 ops); names l1 classes as strings

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
    def from_dense(cls, module: nn.Module, *, share_parameters: bool = False):
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
    def from_dense(cls, module: nn.Linear, *, share_parameters: bool = False) -> "L1Linear":
        """The l1 layer with ``module``'s weights: copies, or with ``share_parameters`` the same Parameters."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"L1Linear.from_dense expects nn.Linear, got {type(module).__name__}")
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  device="meta", dtype=module.weight.dtype)
        _take_params(module, new, share_parameters)
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
        fn = self._conv_function(nd)
        return fn(input, weight, bias, self.stride, padding, self.dilation, self.groups, mix=self.mgs_mix, name=name)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def _conv_function(self, nd: int) -> Callable:
        """The functional op of this layer (the ℓp layers bind their ``p``)."""
        return (L1F.l1_conv1d, L1F.l1_conv2d, L1F.l1_conv3d)[nd - 1]

    @classmethod
    def from_dense(cls, module: nn.Module, *, share_parameters: bool = False):
        """The l1 layer with ``module``'s weights: copies, or with ``share_parameters`` the same Parameters."""
        if type(module) is not cls._dense and not isinstance(module, cls._dense):
            raise TypeError(f"{cls.__name__}.from_dense expects {cls._dense.__name__}, got {type(module).__name__}")
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode,
            device="meta", dtype=module.weight.dtype,
        )
        _take_params(module, new, share_parameters)
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


def _take_params(src: nn.Module, dst: nn.Module, share: bool) -> None:
    """Give ``dst`` (built on the meta device, so its init drew no random numbers) ``src``'s parameters."""
    if share:  # the same objects: ties to other layers and optimizer references stay valid
        dst.weight = src.weight
        if src.bias is not None:
            dst.bias = src.bias
        dst.train(src.training)
    else:
        dst.to_empty(device=src.weight.device)
        _copy_params(src, dst)


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.weight.requires_grad_(src.weight.requires_grad)
    if src.bias is not None:
        dst.bias.requires_grad_(src.bias.requires_grad)
    dst.train(src.training)


# ---------------------------------------------------------------- transposed convolutions
from torch.nn.modules.conv import _ConvTransposeNd  # noqa: E402

__all__ += ["L1ConvTranspose1d", "L1ConvTranspose2d", "L1ConvTranspose3d"]


class _L1ConvTransposeNd(L1Module, _ConvTransposeNd):
    """``y[o] = b - sum |x[i] - w[k]|`` over the pairs ``o = i*stride + k*dilation - padding`` (docs/l1_ops.md).

    Not a subclass of the dense ``nn.ConvTransposeNd`` (as ``L1ConvNd`` is not of ``nn.ConvNd``), so code
    that looks for dense layers does not count it; same parameters, state_dict keys and ``forward(input,
    output_size=None)``.
    """

    _dense: type = nn.ConvTranspose1d

    def forward(self, input: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        nd = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              nd, self.dilation)
        fn = (L1F.l1_conv_transpose1d, L1F.l1_conv_transpose2d, L1F.l1_conv_transpose3d)[nd - 1]
        return fn(input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                  self.dilation, mix=self.mgs_mix, name=self._error_name())

    @classmethod
    def from_dense(cls, module: nn.Module, *, share_parameters: bool = False):
        """The l1 layer with ``module``'s weights: copies, or with ``share_parameters`` the same Parameters."""
        if not isinstance(module, cls._dense):
            raise TypeError(f"{cls.__name__}.from_dense expects {cls._dense.__name__}, got {type(module).__name__}")
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, output_padding=module.output_padding, groups=module.groups,
            bias=module.bias is not None, dilation=module.dilation, padding_mode=module.padding_mode,
            device="meta", dtype=module.weight.dtype,
        )
        _take_params(module, new, share_parameters)
        return new


def _make_conv_transpose(nd: int, dense: type, to_tuple, size_t):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: size_t, stride: size_t = 1,
                 padding: size_t = 0, output_padding: size_t = 0, groups: int = 1, bias: bool = True,
                 dilation: size_t = 1, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        factory = {"device": device, "dtype": dtype}
        _ConvTransposeNd.__init__(
            self, in_channels, out_channels, to_tuple(kernel_size), to_tuple(stride), to_tuple(padding),
            to_tuple(dilation), True, to_tuple(output_padding), groups, bias, padding_mode, **factory,
        )
        self._init_l1()

    return type(f"L1ConvTranspose{nd}d", (_L1ConvTransposeNd,), {
        "__init__": __init__, "_dense": dense, "__module__": __name__,
        "__doc__": f"l1 analogue of ``nn.ConvTranspose{nd}d`` (same constructor and forward): "
                   f"``y[o] = b - sum |x[i] - w[k]|`` over the real (input, tap) pairs of ``o``.",
    })


L1ConvTranspose1d = _make_conv_transpose(1, nn.ConvTranspose1d, _single, _size_1_t)
L1ConvTranspose2d = _make_conv_transpose(2, nn.ConvTranspose2d, _pair, _size_2_t)
L1ConvTranspose3d = _make_conv_transpose(3, nn.ConvTranspose3d, _triple, _size_3_t)


class _RegistryView(Mapping):
    """A read-only dict computed from :mod:`l1fx.layers` on each use, so kinds registered later show up."""

    def __init__(self, build: Callable[[], dict], what: str) -> None:
        self._build, self._what = build, what

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self) -> Iterator:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return f"{self._what}({self._build()!r})"


# {dense module type: l1 class} for every registered kind that has an l1 module (nn.Linear -> L1Linear, ...).
DENSE_TO_L1 = _RegistryView(
    lambda: {s.module: s.l1_class for s in layers.specs() if s.l1_module is not None}, "DENSE_TO_L1")
# The built-in l1 layer classes (a tuple for isinstance; plug-in kinds: layers.spec_for_module).
L1_MODULES = tuple(s.l1_class for s in layers.specs()
                   if s.l1_module is not None and s.l1_module.startswith(__name__ + "."))


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
        # movedim back gives a non-contiguous view (a later .view would fail): return it in the input's layout
        y = super().forward(input.movedim(dim, 1)).movedim(1, dim)
        return y.contiguous(memory_format=_memory_format(input))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channel_dim={self.channel_dim}"


def _memory_format(t: Tensor) -> torch.memory_format:
    """The layout of ``t``: channels-last (4-D/5-D) when it is stored so, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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

    # {kind name: l1 function} of every registered kind with one ("linear" -> l1_linear, ...)
    FUNCTIONS = _RegistryView(
        lambda: {s.name: s.l1_callable for s in layers.specs() if s.l1_function is not None}, "FUNCTIONS")

    def __init__(self, op: str, weight_name: str, weight: Optional[Tensor] = None) -> None:
        nn.Module.__init__(self)
        try:
            spec = layers.get(op)
        except KeyError:
            spec = None
        if spec is None or spec.l1_function is None:
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
        spec = layers.get(self.op)
        weight = spec.weight_of(args, kwargs)
        if isinstance(weight, nn.Parameter):
            self.__dict__["_l1fx_weight"] = weight
        return spec.l1_callable(*args, **kwargs, mix=self.mgs_mix, name=self._error_name())

    def extra_repr(self) -> str:
        return f"op=l1_{self.op}, weight={self.weight_name}"


# ---------------------------------------------------------------- ℓp layers (any p >= 1, and inf)
__all__ += ["LpLinear", "LpConv1d", "LpConv2d", "LpConv3d", "LpModule", "LpFunctionalCall"]


class LpModule:
    """Mixin of the ℓp layers: ``p`` (float >= 1 or inf), kept in the state_dict as extra state.

    The state_dict carries ``p`` (key ``<layer>._extra_state``: ``{"p": p}``), so a saved ℓp model
    reloads with its p. A dense (or ℓ1) state_dict, which has no such key, still loads with
    ``strict=True`` and leaves ``p`` as constructed.
    """

    p: float = 1.0

    def _set_p(self, p) -> None:
        self.p = L1F.check_p(p, f"{type(self).__name__}")

    def get_extra_state(self) -> dict:
        return {"p": self.p}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "p" not in state:
            raise ValueError(f"{type(self).__name__}: extra state must be {{'p': p}}, got {state!r}")
        self._set_p(state["p"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        if key in missing_keys:  # a dense/ℓ1 checkpoint: p stays as constructed
            missing_keys.remove(key)

    def _p_repr(self) -> str:
        from .kernels.lp import p_name

        return f"p={p_name(self.p)}"


class LpLinear(LpModule, L1Linear):
    """``y = -||x - W[m]||_p + b[m]`` with ``nn.Linear``'s interface plus ``p``; ``p = 1`` is :class:`L1Linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 p: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_p(p)

    def forward(self, input: Tensor) -> Tensor:
        return L1F.lp_linear(input, self.weight, self.bias, p=self.p, mix=self.mgs_mix, name=self._error_name())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._p_repr()}"

    @classmethod
    def from_dense(cls, module: nn.Linear, *, share_parameters: bool = False, p: float = 1.0) -> "LpLinear":
        new = super().from_dense(module, share_parameters=share_parameters)
        new._set_p(p)
        return new


def _make_lp_conv(base: type):
    nd = int(base.__name__[-2])  # L1Conv2d -> 2

    def __init__(self, *args, p: float = 1.0, **kwargs) -> None:
        base.__init__(self, *args, **kwargs)
        self._set_p(p)

    def _conv_function(self, nd_: int) -> Callable:
        fn = (L1F.lp_conv1d, L1F.lp_conv2d, L1F.lp_conv3d)[nd_ - 1]
        return lambda *a, **k: fn(*a, p=self.p, **k)

    def extra_repr(self) -> str:
        return f"{base.extra_repr(self)}, {self._p_repr()}"

    @classmethod
    def from_dense(cls, module: nn.Module, *, share_parameters: bool = False, p: float = 1.0):
        new = base.from_dense.__func__(cls, module, share_parameters=share_parameters)
        new._set_p(p)
        return new

    name = f"LpConv{nd}d"
    return type(name, (LpModule, base), {
        "__init__": __init__, "_conv_function": _conv_function, "extra_repr": extra_repr, "from_dense": from_dense,
        "__module__": __name__,
        "__doc__": f"ℓp analogue of ``nn.Conv{nd}d`` (same constructor, plus keyword ``p``), "
                   f"``y = -||patch - filter||_p + b``; ``p = 1`` is :class:`L1Conv{nd}d`.",
    })


LpConv1d = _make_lp_conv(L1Conv1d)
LpConv2d = _make_lp_conv(L1Conv2d)
LpConv3d = _make_lp_conv(L1Conv3d)


class LpFunctionalCall(LpModule, L1FunctionalCall):
    """An ``F.linear`` / ``F.conv*d`` call made ℓp by ``l1fx.convert(p=...)`` (see :class:`L1FunctionalCall`)."""

    def __init__(self, op: str, weight_name: str, weight: Optional[Tensor] = None, *, p: float = 1.0) -> None:
        L1FunctionalCall.__init__(self, op, weight_name, weight)
        self._set_p(p)

    def forward(self, *args, **kwargs) -> Tensor:
        spec = layers.get(self.op)
        weight = spec.weight_of(args, kwargs)
        if isinstance(weight, nn.Parameter):
            self.__dict__["_l1fx_weight"] = weight
        fn = layers.resolve(layers.lp.LP_FUNCTIONS[self.op])
        return fn(*args, **kwargs, p=self.p, mix=self.mgs_mix, name=self._error_name())

    def extra_repr(self) -> str:
        return f"op=lp_{self.op}, weight={self.weight_name}, {self._p_repr()}"
