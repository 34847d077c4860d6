"""Post-training int8 quantisation of converted ℓ1 models (docs/int8.md).

``l1fx.quantize(model, calibration_inputs, Int8L1Config())`` returns a new model
in which every ℓ1 layer (``L1Linear``, ``L1Conv1d/2d/3d`` and the
``L1FunctionalCall`` of them) is an int8 layer:

* one scale ``s`` and zero point ``z`` per layer, shared by input and weight
  (they are subtracted, so they must sit on one grid);
* uint8 codes ``q = clamp(round(v / s) + z, 0, 255)`` for the weight (stored)
  and the input (quantised on the fly, inside the C++ kernel);
* ``y = bias + -(s * sum_k |q_x - q_w|)``, the sum exact in integers (uint64
  lanes in the kernel; the zero point cancels in ``q_x - q_w``), one float32
  rounding for the dequantised output.

The grid (documented choice): ``[lo, hi]`` is the union of the weight's range,
the input range observed over the calibration inputs (``observer="minmax"``:
min and max; ``"percentile"``: the mean over batches of the ``percentile`` and
``100 - percentile`` percentiles, clipping outliers) and 0, so that 0 is exactly
a code (zero padding of convolutions is the code ``z``, and ReLU outputs lose
nothing at 0). ``s = (hi - lo) / 255`` (rounded to float32), ``z = round(-lo / s)``.
Every weight and every observed input (minmax) is then within ``s / 2`` of its
dequantised code.

Dense layers, norms and everything else stay float32 (quantise those with
PyTorch's own tools if wanted). The int8 layers are inference layers: no
gradients, CPU tensors. Kernels: :mod:`l1fx.kernels.int8_cpu` (VPSADBW),
falling back to :mod:`l1fx.kernels.int8_reference` as the fp32 kernels do
(``L1FX_BACKEND``: ``auto``, ``cpu``, ``reference``).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import layers
from .errors import BackendUnavailable, UsageError
from .kernels import int8_reference as ref
from .kernels import requested_backend

__all__ = ["Int8L1Config", "quantize", "energy_report", "Int8L1Linear", "Int8L1ConvNd", "Int8L1Conv1d", "Int8L1Conv2d",
           "Int8L1Conv3d", "Int8L1FunctionalCall", "INT8_MODULES", "choose_qparams", "int8_backend"]

OBSERVERS = ("minmax", "percentile")
_PERCENTILE_SAMPLE = 1 << 20  # values per batch the percentile observer looks at (a deterministic stride)


@dataclass(frozen=True)
class Int8L1Config:
    """How :func:`quantize` picks each layer's grid (torchao style: the config is a value).

    ``observer``: ``"minmax"`` (default) or ``"percentile"`` (input range clipped
    at the ``percentile`` / ``100 - percentile`` percentiles, averaged over
    batches). ``skip``: qualified names of ℓ1 layers to leave in float.
    """

    observer: str = "minmax"
    percentile: float = 99.99
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise UsageError(f"Int8L1Config: observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < float(self.percentile) <= 100.0:
            raise UsageError(f"Int8L1Config: percentile must be a number in (50, 100], got {self.percentile!r}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise UsageError(f"Int8L1Config: skip must be a tuple of layer names, got {self.skip!r}")


# ---------------------------------------------------------------- grid

def choose_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of the uint8 grid covering ``[min(lo, 0), max(hi, 0)]``; scale is a float32 value."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UsageError(f"cannot choose an int8 grid for the range [{lo}, {hi}]: it must be finite")
    span = hi - lo
    scale = float(torch.tensor(span / 255.0 if span > 0 else 1.0, dtype=torch.float32))
    if scale <= 0.0 or not math.isfinite(scale):  # a span below float32's smallest normal / 255
        scale = float(torch.finfo(torch.float32).tiny)
    zero_point = int(min(max(round(-lo / scale), 0), 255))
    return scale, zero_point


# ---------------------------------------------------------------- backend choice

_warned = False


def int8_backend() -> str:
    """``"cpu"`` or ``"reference"``: which int8 kernel runs now (``L1FX_BACKEND``; auto falls back with a warning)."""
    global _warned
    name = requested_backend()
    if name == "reference":
        return "reference"
    if name not in ("auto", "cpu"):
        raise BackendUnavailable(f"int8 l1 layers run on the 'cpu' and 'reference' backends, not "
                                 f"L1FX_BACKEND={name!r}; unset it or choose one of those")
    from .kernels import int8_cpu

    ok, why = int8_cpu.available()
    if ok:
        return "cpu"
    if name == "cpu":
        raise BackendUnavailable(f"l1fx int8 cpu kernels are unavailable: {why.splitlines()[0]}")
    if not _warned:
        _warned = True
        warnings.warn(f"l1fx: int8 cpu kernels unavailable ({why.splitlines()[0]}); using the slower reference "
                      "kernel", RuntimeWarning, stacklevel=3)
    return "reference"


def _check_input(x: Tensor, label: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise UsageError(f"{label}: int8 l1 layers take a floating-point tensor, got "
                         f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if x.device.type != "cpu":
        raise UsageError(f"{label}: int8 l1 layers run on the CPU; got an input on {x.device} "
                         "(move the model's inputs to the CPU)")


# ---------------------------------------------------------------- the linear core on float rows

class _Codes(nn.Module):
    """Shared state of the int8 layers: the grid, the weight codes (and their packing), the float bias."""

    weight_codes: Tensor
    weight_packed: Tensor

    def _init_codes(self, weight: Tensor, bias: Optional[Tensor], scale: float, zero_point: int,
                    groups: int = 1) -> None:
        w = weight.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise UsageError(f"{self._label()}: the weight holds NaN or inf; an int8 grid needs finite weights")
        self.groups = int(groups)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int64))
        # Python numbers of the buffers: the ops take them as constants (torch.export cannot read buffers' values)
        self._qparams = (float(self.scale), int(self.zero_point))
        self.register_buffer("weight_codes", ref.quantize_codes(w, float(self.scale), int(self.zero_point)))
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu", torch.float32).clone())
        self.register_buffer("weight_packed", self._pack(), persistent=False)

    def _pack(self) -> Tensor:
        rows = self.weight_codes.reshape(self.groups, self.weight_codes.shape[0] // self.groups, -1)
        return torch.stack([ref.pack_weight(r) for r in rows])

    def _load_from_state_dict(self, *args, **kwargs):  # the packing follows the loaded codes
        super()._load_from_state_dict(*args, **kwargs)
        self._qparams = (float(self.scale), int(self.zero_point))
        self.weight_packed = self._pack()

    def _label(self) -> str:
        return getattr(self, "l1fx_name", None) or type(self).__name__

    def qparams(self) -> tuple[float, int]:
        return self._qparams



def _rows(rows: Tensor, codes: Tensor, packed: Tensor, groups: int, s: float, z: int, group: int,
          bias: Optional[Tensor]) -> Tensor:
    """float32 ``[R, M/g]`` of float or uint8 rows ``[R, K/g]`` for one group."""
    mg = codes.shape[0] // groups
    b = None if bias is None else bias[group * mg:(group + 1) * mg]
    if int8_backend() == "cpu":
        from .kernels import int8_cpu

        return int8_cpu.linear(rows, packed[group], mg, s, z, b)
    qw = codes[group * mg:(group + 1) * mg].reshape(mg, -1)
    if rows.dtype == torch.uint8:
        return ref.dequantize(ref.linear_codes(rows, qw), s, b)
    return ref.linear(rows, qw, s, z, b)


# The int8 layers call these custom ops, so torch.export (and the ONNX exporter, l1fx.onnx_int8) sees one op per
# layer. Both return float32; the layers check their input first and cast the result to the input's dtype.
@torch.library.custom_op("l1fx::int8_linear", mutates_args=())
def int8_linear_op(x: Tensor, weight_codes: Tensor, weight_packed: Tensor, scale: float, zero_point: int,
                   bias: Optional[Tensor]) -> Tensor:
    k = weight_codes.shape[1]
    y = _rows(x.reshape(-1, k).to(torch.float32), weight_codes, weight_packed, 1, scale, zero_point, 0, bias)
    return y.reshape(*x.shape[:-1], weight_codes.shape[0])


@int8_linear_op.register_fake
def _(x, weight_codes, weight_packed, scale, zero_point, bias):
    return x.new_empty((*x.shape[:-1], weight_codes.shape[0]), dtype=torch.float32)


@torch.library.custom_op("l1fx::int8_conv", mutates_args=())
def int8_conv_op(x: Tensor, weight_codes: Tensor, weight_packed: Tensor, scale: float, zero_point: int,
                 bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                 groups: int) -> Tensor:
    return _conv_impl(x.to(torch.float32), weight_codes, weight_packed, scale, zero_point, bias, stride, padding,
                      dilation, groups)


@int8_conv_op.register_fake
def _(x, weight_codes, weight_packed, scale, zero_point, bias, stride, padding, dilation, groups):
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
           for s, p, d, k, st in zip(x.shape[2:], padding, dilation, weight_codes.shape[2:], stride)]
    return x.new_empty((x.shape[0], weight_codes.shape[0], *out), dtype=torch.float32)


class Int8L1Linear(_Codes):
    """int8 ``L1Linear``: ``y = bias + -(s * sum_k |q(x) - q_w|)``, float32 output (see the module doc)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], scale: float, zero_point: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._init_codes(weight, bias, scale, zero_point)

    def forward(self, input: Tensor) -> Tensor:
        return _linear(self, input, self.bias)

    def extra_repr(self) -> str:
        s, z = self.qparams()
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={s:.6g}, zero_point={z}"


def _linear(layer: _Codes, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    label = layer._label()
    _check_input(x, label)
    k = layer.weight_codes.shape[1]
    if x.dim() < 1 or x.shape[-1] != k:
        raise UsageError(f"{label}: expected input [..., {k}], got shape {tuple(x.shape)}")
    s, z = layer.qparams()
    y = int8_linear_op(x, layer.weight_codes, layer.weight_packed, s, z, bias)
    return y.to(x.dtype)


# ---------------------------------------------------------------- convolutions

def _geometry(nd: int, kernel: Sequence[int], stride, padding, dilation, label: str):
    """(stride, padding, dilation, pre_pad or None) as lists, 'same'/'valid' resolved as l1fx.functional does."""
    def tup(v, what):
        t = [int(v)] * nd if isinstance(v, int) else [int(e) for e in v]
        if len(t) != nd:
            raise UsageError(f"{label}: {what} must be an int or a {nd}-tuple, got {v!r}")
        return t

    stride_, dilation_ = tup(stride, "stride"), tup(dilation, "dilation")
    pre_pad = None
    if isinstance(padding, str):
        if padding == "valid":
            padding_ = [0] * nd
        elif padding == "same":
            from .functional import same_padding

            pairs = same_padding(kernel, dilation_)
            padding_ = [lo for lo, _ in pairs]
            if any(lo != hi for lo, hi in pairs):
                pre_pad = [p for lo, hi in reversed(pairs) for p in (0, hi - lo)]
        else:
            raise UsageError(f"{label}: padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    else:
        padding_ = tup(padding, "padding")
    return stride_, padding_, dilation_, pre_pad


def _conv(layer: _Codes, x: Tensor, bias: Optional[Tensor], stride, padding, dilation, pre_pad) -> Tensor:
    label = layer._label()
    _check_input(x, label)
    w = layer.weight_codes
    nd, groups = w.dim() - 2, layer.groups
    if x.dim() != nd + 2 or x.shape[1] != w.shape[1] * groups:
        raise UsageError(f"{label}: expected input [batch, {w.shape[1] * groups}, *{nd} spatial dims], "
                         f"got shape {tuple(x.shape)}")
    if pre_pad is not None:
        x = F.pad(x, pre_pad)
    padded = [n + 2 * p for n, p in zip(x.shape[2:], padding)]
    if any(n < d * (k - 1) + 1 for n, k, d in zip(padded, w.shape[2:], dilation)):
        raise UsageError(f"{label}: input spatial size {tuple(x.shape[2:])} (padded {tuple(padded)}) is smaller "
                         f"than the dilated kernel")
    s, z = layer.qparams()
    y = int8_conv_op(x, w, layer.weight_packed, s, z, bias, list(stride), list(padding), list(dilation), groups)
    return y.to(x.dtype)


def _conv_impl(x: Tensor, w: Tensor, packed: Tensor, s: float, z: int, bias: Optional[Tensor], stride, padding,
               dilation, groups: int) -> Tensor:
    m = w.shape[0]
    kernel = list(w.shape[2:])
    pointwise = (all(k == 1 for k in kernel) and all(v == 1 for v in stride) and not any(padding)
                 and groups == 1)
    if pointwise and int8_backend() == "cpu" and x.is_contiguous() and x.shape[0] > 0:
        from .kernels import int8_cpu

        # channels-first: [N, C, L] in, [N, M, L] out, no transposed copies (the weight rows: M x K8 bytes)
        codes = w.reshape(m, -1)
        rows_w = F.pad(codes, (0, -codes.shape[1] % 8)) if codes.shape[1] % 8 else codes.contiguous()
        y = int8_cpu.pointwise_channels_first(x.reshape(x.shape[0], x.shape[1], -1), rows_w, s, z, bias)
        if y is not None:
            return y.view(x.shape[0], m, *x.shape[2:])
    if pointwise:  # a per-position channel mix: float rows straight into the fused quantising kernel
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        y = _rows(rows, w, packed, 1, s, z, 0, bias)
        return y.view(x.shape[0], *x.shape[2:], m).movedim(-1, 1)
    gather = None
    if int8_backend() == "cpu":
        from .kernels import int8_cpu

        q, nans = int8_cpu.quantize(x, s, z)
        gather = int8_cpu.patches
    else:
        q = ref.quantize_codes(x, s, z)
        nans = int(torch.isnan(x).sum())
    y = ref.conv_rows(q, kernel, stride, padding, dilation, groups, z, m,
                      lambda rows, g: _rows(rows, w, packed, groups, s, z, g, bias), gather)
    if nans:
        bad = ref.nan_positions(x, kernel, stride, padding, dilation, groups, m)
        y = y.masked_fill(bad, float("nan"))
    return y


class Int8L1ConvNd(_Codes):
    """int8 ``L1Conv1d/2d/3d`` (same geometry as the ℓ1 layer it replaces)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], scale: float, zero_point: int, *, stride, padding,
                 dilation, groups: int, padding_mode: str = "zeros", reversed_padding=None) -> None:
        super().__init__()
        nd = weight.dim() - 2
        self.out_channels, self.in_channels = weight.shape[0], weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.padding_mode = padding_mode
        self._reversed_padding = None if reversed_padding is None else list(reversed_padding)
        if padding_mode != "zeros":  # padded in float by F.pad(mode=...), then no padding in the conv
            padding = 0
        self.stride, self.padding, self.dilation, self._pre_pad = _geometry(
            nd, self.kernel_size, stride, padding, dilation, type(self).__name__)
        self._init_codes(weight, bias, scale, zero_point, groups)

    def forward(self, input: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            _check_input(input, self._label())
            input = F.pad(input, self._reversed_padding, mode=self.padding_mode)
        return _conv(self, input, self.bias, self.stride, self.padding, self.dilation, self._pre_pad)

    def extra_repr(self) -> str:
        s, z = self.qparams()
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, scale={s:.6g}, "
                f"zero_point={z}")


Int8L1Conv1d = type("Int8L1Conv1d", (Int8L1ConvNd,), {"__module__": __name__, "__doc__": "int8 ``L1Conv1d``."})
Int8L1Conv2d = type("Int8L1Conv2d", (Int8L1ConvNd,), {"__module__": __name__, "__doc__": "int8 ``L1Conv2d``."})
Int8L1Conv3d = type("Int8L1Conv3d", (Int8L1ConvNd,), {"__module__": __name__, "__doc__": "int8 ``L1Conv3d``."})
_CONV_CLASSES = {1: Int8L1Conv1d, 2: Int8L1Conv2d, 3: Int8L1Conv3d}


class Int8L1FunctionalCall(_Codes):
    """int8 ``L1FunctionalCall``: takes the call's arguments; the weight codes are those of calibration time.

    The model's float weight parameter stays where it is (no state_dict key of
    the model changes) and is ignored by the call: the codes were made from it.
    """

    def __init__(self, op: str, weight: Tensor, scale: float, zero_point: int,
                 groups: int = 1, name: Optional[str] = None) -> None:
        super().__init__()
        self.op = op
        self.l1fx_name = name
        self._init_codes(weight, None, scale, zero_point, groups)

    def forward(self, *args, **kwargs) -> Tensor:
        label = self._label()
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        if len(args) > len(names) or set(kwargs) - set(names):
            raise UsageError(f"{label}: unexpected arguments for {self.op}")
        call = dict(zip(names, args)) | kwargs
        x, bias = call.get("input"), call.get("bias")
        if isinstance(bias, Tensor):
            bias = bias.detach().to("cpu", torch.float32)
        if self.op == "linear":
            return _linear(self, x, bias)
        groups = int(call.get("groups", 1))
        if groups != self.groups:
            raise UsageError(f"{label}: called with groups={groups}, quantised with groups={self.groups}")
        nd = self.weight_codes.dim() - 2
        stride, padding, dilation, pre_pad = _geometry(nd, self.weight_codes.shape[2:], call.get("stride", 1),
                                                       call.get("padding", 0), call.get("dilation", 1), label)
        return _conv(self, x, bias, stride, padding, dilation, pre_pad)

    def extra_repr(self) -> str:
        s, z = self.qparams()
        return f"op=int8_l1_{self.op}, scale={s:.6g}, zero_point={z}"


INT8_MODULES = (Int8L1Linear, Int8L1ConvNd, Int8L1FunctionalCall)


# ---------------------------------------------------------------- registry: the "int8" variant of each kind

@layers.register_replacement("int8", "linear")
def _int8_linear(module: nn.Module, *, scale: float, zero_point: int) -> Int8L1Linear:
    new = Int8L1Linear(module.weight, module.bias, scale, zero_point)
    new.l1fx_name = getattr(module, "l1fx_name", None)
    return new


@layers.register_replacement("int8", "conv1d", "conv2d", "conv3d")
def _int8_conv(module: nn.Module, *, scale: float, zero_point: int) -> Int8L1ConvNd:
    cls = _CONV_CLASSES[module.weight.dim() - 2]
    new = cls(module.weight, module.bias, scale, zero_point, stride=module.stride, padding=module.padding,
              dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
              reversed_padding=getattr(module, "_reversed_padding_repeated_twice", None))
    new.l1fx_name = getattr(module, "l1fx_name", None)
    return new


# ---------------------------------------------------------------- calibration

class _Observer:
    """Input range of one layer over the calibration batches (and the weight seen by a functional call)."""

    def __init__(self, config: Int8L1Config) -> None:
        self.config = config
        self.lo, self.hi = math.inf, -math.inf
        self.lows: list[float] = []
        self.highs: list[float] = []
        self.calls = 0
        self.weight: Optional[Tensor] = None
        self.groups = 1

    def observe(self, x: Any) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return
        v = x.detach().reshape(-1).to(torch.float32)
        v = v[torch.isfinite(v)]
        self.calls += 1
        if v.numel() == 0:
            return
        if self.config.observer == "minmax":
            self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        else:
            step = max(1, v.numel() // _PERCENTILE_SAMPLE)
            sample = v[::step]
            p = float(self.config.percentile) / 100.0
            q = torch.quantile(sample, torch.tensor([1.0 - p, p]))
            self.lows.append(float(q[0]))
            self.highs.append(float(q[1]))

    def input_range(self) -> tuple[float, float]:
        if self.config.observer == "minmax":
            return self.lo, self.hi
        if not self.lows:
            return math.inf, -math.inf
        return sum(self.lows) / len(self.lows), sum(self.highs) / len(self.highs)


def _targets(model: nn.Module, config: Int8L1Config) -> dict[str, nn.Module]:
    from .nn import L1FunctionalCall, L1Module

    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, L1Module) or name in config.skip:
            continue
        if isinstance(m, L1FunctionalCall):
            if m.op in ("linear", "conv1d", "conv2d", "conv3d"):
                found[name] = m
        elif layers.spec_for_module(m) is not None and layers.spec_for_module(m).name in (
                "linear", "conv1d", "conv2d", "conv3d"):
            found[name] = m
    return found


def _run_calibration(model: nn.Module, targets: dict[str, nn.Module], inputs: Iterable,
                     config: Int8L1Config) -> dict[str, _Observer]:
    from .nn import L1FunctionalCall

    observers = {name: _Observer(config) for name in targets}
    handles = []

    def hook_for(name: str, functional: bool):
        obs = observers[name]

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            obs.observe(x)
            if functional:
                spec = layers.get(module.op)
                w = spec.weight_of(args, kwargs)
                if isinstance(w, Tensor):
                    obs.weight = w.detach()
                g = (args[6] if len(args) > 6 else kwargs.get("groups", 1)) if module.op != "linear" else 1
                obs.groups = int(g)

        return hook

    for name, m in targets.items():
        handles.append(m.register_forward_pre_hook(hook_for(name, isinstance(m, L1FunctionalCall)),
                                                   with_kwargs=True))
    batches = 0
    try:
        with torch.no_grad():
            for item in inputs:
                # a tuple or list (what a DataLoader yields) is the forward's arguments, anything else one argument
                args = tuple(item) if isinstance(item, (tuple, list)) else (item,)
                try:
                    model(*args)
                except Exception as e:  # noqa: BLE001 - the user's model on the user's batch
                    raise UsageError(
                        f"quantize: the model failed on calibration batch {batches} ({len(args)} argument(s): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); each item of "
                        f"calibration_inputs must be the forward's arguments, a tuple (x,) or (x, y), without "
                        f"labels") from e
                batches += 1
    finally:
        for h in handles:
            h.remove()
    if batches == 0:
        raise UsageError("quantize: calibration_inputs is empty; pass an iterable of forward-argument tuples "
                         "(e.g. a few batches of real inputs)")
    return observers


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")


def _carry_over(old: nn.Module, new: nn.Module) -> None:
    """What convert hung on the ℓ1 layer goes with it: children (``l1fx_norm``) and forward hooks."""
    for child_name, child in old.named_children():
        new.add_module(child_name, child)
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            getattr(new, attr).update(getattr(old, attr))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, calibration_inputs: Iterable, config: Optional[Int8L1Config] = None) -> nn.Module:
    """A new model whose ℓ1 layers are int8 (one shared grid per layer, from calibration); ``model`` is untouched.

    ``calibration_inputs``: an iterable of forward-argument tuples (a lone
    tensor counts as a 1-tuple), run through a copy of the model in eval
    mode. Layers the calibration never reaches stay in float (with a warning).
    Returns the quantised copy in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"quantize: model must be an nn.Module, got {type(model).__name__}")
    config = Int8L1Config() if config is None else config
    if not isinstance(config, Int8L1Config):
        raise UsageError(f"quantize: config must be an Int8L1Config, got {type(config).__name__}")
    if calibration_inputs is None or isinstance(calibration_inputs, (Tensor, str, bytes)):
        raise UsageError("quantize: calibration_inputs must be an iterable of forward-argument tuples, e.g. "
                         "[(x1,), (x2,)]")
    new = copy.deepcopy(model)
    new.eval()
    targets = _targets(new, config)
    unknown = [s for s in config.skip if s not in dict(new.named_modules())]
    if unknown:
        raise UsageError(f"quantize: Int8L1Config.skip names no layer of the model: {', '.join(unknown)}")
    if not targets:
        raise UsageError("quantize: the model has no l1 layers to quantise; convert it with l1fx.convert first")
    observers = _run_calibration(new, targets, calibration_inputs, config)
    from .nn import L1FunctionalCall

    for name, m in targets.items():
        obs = observers[name]
        lo_x, hi_x = obs.input_range()
        if obs.calls == 0:
            warnings.warn(f"l1fx.quantize: layer {name} was not run by the calibration inputs; left in floating point",
                          RuntimeWarning, stacklevel=2)
            continue
        weight = obs.weight if isinstance(m, L1FunctionalCall) else m.weight
        if weight is None:
            warnings.warn(f"l1fx.quantize: layer {name}: no weight seen; left in floating point", RuntimeWarning,
                          stacklevel=2)
            continue
        w = weight.detach().to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise UsageError(f"quantize: layer {name}: the weight holds NaN or inf; an int8 grid needs finite weights")
        lo = min(float(w.min()) if w.numel() else 0.0, lo_x)
        hi = max(float(w.max()) if w.numel() else 0.0, hi_x)
        scale, zp = choose_qparams(lo, hi)
        if isinstance(m, L1FunctionalCall):
            q = Int8L1FunctionalCall(m.op, w, scale, zp, groups=obs.groups, name=name)
        else:
            q = layers.build_replacement(m, "int8", scale=scale, zero_point=zp)
            q.l1fx_name = q.l1fx_name or name
        _carry_over(m, q)
        _set_submodule(new, name, q)
    return new.eval()


# ---------------------------------------------------------------- energy: int8 ℓ1 layers are int8 additions

def _register_flop_formulas() -> None:
    """FlopCounterMode formulas of the int8 ops: 2 per subtract-accumulate (its convention), as the ℓ1 ops."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    for op in (torch.ops.l1fx.int8_linear, torch.ops.l1fx.int8_conv):
        if op not in flop_registry:
            register_flop_formula(op)(layers.l1_flops)


_register_flop_formulas()


def energy_report(model: nn.Module, example_inputs, *, precision: str = "fp32", table=None, latency=None):
    """:func:`l1fx.energy.energy_report` with the int8 ℓ1 layers priced as int8 additions.

    The report prices every op at one ``precision``; an int8 ℓ1 layer's K
    subtractions and K accumulations per output are int8 additions (45 nm:
    0.03 pJ, against 0.2 pJ for an int8 multiply and 0.9 pJ for an fp32 add),
    whatever the rest of the model runs in. Their energy uses ``table["int8"]``
    when ``table`` is per precision and has it, else Horowitz's 45 nm int8 add;
    their cycles (when a latency table is used) the integer add's.
    """
    from . import energy

    report = energy.energy_report(model, example_inputs, precision=precision, table=table, latency=latency)
    if isinstance(table, dict) and isinstance(table.get("int8"), dict) and "add" in table["int8"]:
        add_pj = float(table["int8"]["add"])
    else:
        add_pj = energy.HOROWITZ_45NM_PJ["int8"]["add"]
    add_cycles = energy.SKYLAKE_LATENCY_CYCLES["int32"]["add"]
    int8_names = {name or "(top level)" for name, m in model.named_modules() if isinstance(m, INT8_MODULES)}
    for row in report.layers:
        if row.name in int8_names:
            ops = row.multiplies + row.additions  # the formula's FLOPs: all additions
            row.multiplies, row.additions, row.energy = 0, ops, ops * add_pj
            row.type = f"{row.type} (int8 adds)"
            if row.cycles is not None:
                row.cycles = ops * add_cycles
    total = report.total
    total["mul"] = sum(r.multiplies for r in report.layers)
    total["add"] = sum(r.additions for r in report.layers)
    total["energy_pJ"] = sum(r.energy for r in report.layers)
    if "cycles" in total:
        total["cycles"] = sum(r.cycles for r in report.layers)
    return report
