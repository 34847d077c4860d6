"""Functional l1 layers with the signatures of ``F.linear`` and ``F.conv*d``.

``y = -sum |x - w| (+ bias)`` over each input row (linear) or patch (conv).
``mix`` in [0, 1] selects the backward blend of the Mixed Gradient Strategy:
1 is AdderNet's full-precision gradient, 0 the exact l1 gradient.

Inputs are validated here, with errors (:class:`l1fx.errors.UsageError`, a
``ValueError``) that name the layer (``name=``), the argument and the shapes
involved; the tensor checks are skipped while torch.fx traces with proxies, so
the traced graph holds the custom op itself. Meta and fake tensors pass
through to the ops' fake kernels: they give shapes only.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .errors import UsageError

__all__ = ["l1_linear", "l1_conv1d", "l1_conv2d", "l1_conv3d", "l1_conv"]

_IntOrTuple = Union[int, Sequence[int]]


def _is_proxy(*ts) -> bool:
    return any(isinstance(t, torch.fx.Proxy) for t in ts)


def _label(name: Optional[str], default: str) -> str:
    return f"{default} ({name})" if name else default


def _check_mix(mix, label: str) -> float:
    if isinstance(mix, bool) or not isinstance(mix, numbers.Real):
        raise UsageError(f"{label}: mix must be a number in [0, 1], got {mix!r}")
    mix = float(mix)
    if not 0.0 <= mix <= 1.0:
        raise UsageError(f"{label}: mix must be in [0, 1], got {mix}")
    return mix


def _common_dtype(label: str, *ts: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Cast to the autocast dtype when autocast is on, else promote to a common float dtype."""
    present = [t for t in ts if t is not None]
    for t in present:
        if not t.is_floating_point():
            raise UsageError(f"{label}: expected floating-point tensors, got {t.dtype}")
    dev = present[0].device.type
    # Meta tensors have no autocast state (asking raises).
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = present[0].dtype
        for t in present[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return [None if t is None else (t if t.dtype == dtype else t.to(dtype)) for t in ts]


def l1_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, mix: float = 1.0,
              name: Optional[str] = None) -> Tensor:
    """``y[..., m] = -sum_k |x[..., k] - weight[m, k]| (+ bias[m])``."""
    return _linear(x, weight, bias, mix, name, 1.0, "l1_linear")


def _linear_op(x, weight, bias, mix, p: float) -> Tensor:
    # p = 1 is the l1 op itself (same kernels); any other p the lp op (l1fx/ops_lp.py)
    if p == 1.0:
        return ops.linear(x, weight, bias, mix)
    return _ops_lp().lp_linear(x, weight, bias, p, mix)


def _ops_lp():
    from . import ops_lp  # on first use: l1fx.ops_lp imports l1fx.kernels.lp

    return ops_lp


def _linear(x, weight, bias, mix, name, p: float, default_label: str) -> Tensor:
    if _is_proxy(x, weight, bias):
        return _linear_op(x, weight, bias, mix, p)
    label = _label(name, default_label)
    mix = _check_mix(mix, label)
    if weight.dim() != 2:
        raise UsageError(f"{label}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise UsageError(f"{label}: input must have at least 1 dimension, got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise UsageError(
            f"{label}: input has {x.shape[-1]} features in its last dimension (shape {tuple(x.shape)}) "
            f"but weight expects {weight.shape[1]} (weight shape {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise UsageError(f"{label}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    x, weight, bias = _common_dtype(label, x, weight, bias)
    return _linear_op(x, weight, bias, mix, p)


def _is_int(v) -> bool:
    # bool is an Integral, but stride=True is a mistake; floats are never truncated silently.
    return isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)


def _tuple(v: _IntOrTuple, nd: int, what: str, label: str) -> list[int]:
    """``v`` as ``nd`` ints; anything but an int or a tuple/list of 1 or ``nd`` ints is a UsageError."""
    items = list(v) if isinstance(v, (tuple, list, torch.Size)) else [v]
    if not all(_is_int(e) for e in items) or len(items) not in (1, nd):
        raise UsageError(f"{label}: {what} must be an int or a tuple of {nd} ints, got {v!r}")
    out = [e if isinstance(e, torch.SymInt) else int(e) for e in items]
    return out * nd if len(out) == 1 else out


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """(low, high) padding per dim that keeps the size at stride 1, as PyTorch's 'same'."""
    pads = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def l1_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntOrTuple = 1,
            padding: Union[str, _IntOrTuple] = 0, dilation: _IntOrTuple = 1, groups: int = 1, *,
            mix: float = 1.0, name: Optional[str] = None) -> Tensor:
    """N-d l1 convolution; ``weight.dim() - 2`` spatial dimensions (1, 2 or 3)."""
    return _l1_conv(weight.dim() - 2, x, weight, bias, stride, padding, dilation, groups, mix, name)


def _conv_op(x, weight, bias, stride, padding, dilation, groups, mix, p: float) -> Tensor:
    if p == 1.0:
        return ops.conv(x, weight, bias, stride, padding, dilation, groups, mix)
    return _ops_lp().lp_conv(x, weight, bias, stride, padding, dilation, groups, p, mix)


def _l1_conv(nd, x, weight, bias, stride, padding, dilation, groups, mix, name, p: float = 1.0) -> Tensor:
    prefix = "l1" if p == 1.0 else "lp"
    label = _label(name, f"{prefix}_conv{nd}d" if nd in (1, 2, 3) else f"{prefix}_conv")
    if nd not in (1, 2, 3) or (not _is_proxy(weight) and weight.dim() != nd + 2):
        raise UsageError(f"{label}: weight must be 3-, 4- or 5-D [out, in/groups, *kernel], got shape {tuple(weight.shape)}")
    if not _is_int(groups):
        raise UsageError(f"{label}: groups must be a positive int, got {groups!r}")
    stride_ = _tuple(stride, nd, "stride", label)
    dilation_ = _tuple(dilation, nd, "dilation", label)
    kernel = list(weight.shape[2:]) if not _is_proxy(weight) else None
    pre_pad = None
    if isinstance(padding, str):
        if padding == "valid":
            padding_ = [0] * nd
        elif padding == "same":
            if any(s != 1 for s in stride_):
                raise UsageError(f"{label}: padding='same' is not supported for strided convolutions (stride={stride_})")
            if kernel is None:
                raise UsageError(f"{label}: padding='same' needs a concrete weight to size the padding; "
                                 "while tracing pass explicit padding (l1fx.nn modules do this)")
            pairs = same_padding(kernel, dilation_)
            padding_ = [lo for lo, hi in pairs]
            if any(lo != hi for lo, hi in pairs):
                # Asymmetric: pad the extra element on the high side first, like PyTorch.
                pre_pad = []
                for lo, hi in reversed(pairs):
                    pre_pad += [0, hi - lo]
        else:
            raise UsageError(f"{label}: padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    else:
        padding_ = _tuple(padding, nd, "padding", label)
    if _is_proxy(x, weight, bias):
        if pre_pad is not None:
            x = F.pad(x, pre_pad)
        return _conv_op(x, weight, bias, stride_, padding_, dilation_, groups, mix, p)
    mix = _check_mix(mix, label)
    if any(s < 1 for s in stride_) or any(d < 1 for d in dilation_) or any(p < 0 for p in padding_):
        raise UsageError(f"{label}: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride_}, padding={padding_}, dilation={dilation_}")
    if groups < 1:
        raise UsageError(f"{label}: groups must be a positive int, got {groups!r}")
    if x.dim() != nd + 2:
        raise UsageError(
            f"{label}: expected a {nd + 2}-D input [batch, channels, {', '.join('DHW'[3 - nd:])}], "
            f"got shape {tuple(x.shape)}"
        )
    out_c, in_per_group = weight.shape[0], weight.shape[1]
    if out_c % groups:
        raise UsageError(f"{label}: groups={groups} does not divide out_channels={out_c} (weight shape {tuple(weight.shape)})")
    if x.shape[1] != in_per_group * groups:
        raise UsageError(
            f"{label}: input has {x.shape[1]} channels (shape {tuple(x.shape)}) but weight {tuple(weight.shape)} "
            f"with groups={groups} expects {in_per_group * groups}"
        )
    if bias is not None and tuple(bias.shape) != (out_c,):
        raise UsageError(f"{label}: bias must have shape ({out_c},), got {tuple(bias.shape)}")
    x, weight, bias = _common_dtype(label, x, weight, bias)
    if pre_pad is not None:
        x = F.pad(x, pre_pad)
    if any(k < 1 for k in kernel):
        raise UsageError(f"{label}: kernel size must be >= 1 in every dimension, got weight shape {tuple(weight.shape)}")
    if any(s == 0 for s in x.shape[2:]):
        # As F.conv*d: an empty spatial input is refused (an empty batch or channel dim is fine).
        raise UsageError(f"{label}: input spatial size must be >= 1 in every dimension, got shape {tuple(x.shape)}")
    padded = [s + 2 * p for s, p in zip(x.shape[2:], padding_)]
    if any(ps < d * (k - 1) + 1 for ps, k, d in zip(padded, kernel, dilation_)):
        raise UsageError(
            f"{label}: input spatial size {tuple(x.shape[2:])} (padded {tuple(padded)}) is smaller than the "
            f"dilated kernel {tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation_))}"
        )
    return _conv_op(x, weight, bias, stride_, padding_, dilation_, int(groups), mix, p)


def _conv_nd(nd: int):
    def fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntOrTuple = 1,
           padding: Union[str, _IntOrTuple] = 0, dilation: _IntOrTuple = 1, groups: int = 1, *,
           mix: float = 1.0, name: Optional[str] = None) -> Tensor:
        return _l1_conv(nd, x, weight, bias, stride, padding, dilation, groups, mix, name)

    fn.__name__ = fn.__qualname__ = f"l1_conv{nd}d"
    fn.__doc__ = f"l1 analogue of ``F.conv{nd}d`` (same arguments), ``y = -sum |patch - filter| (+ bias)``."
    return fn


l1_conv1d = _conv_nd(1)
l1_conv2d = _conv_nd(2)
l1_conv3d = _conv_nd(3)


# ---------------------------------------------------------------- transposed convolution
from . import ops_transpose  # noqa: E402  (defines torch.ops.l1fx.conv_transpose)

__all__ += ["l1_conv_transpose1d", "l1_conv_transpose2d", "l1_conv_transpose3d"]


def _l1_conv_transpose(nd, x, weight, bias, stride, padding, output_padding, groups, dilation, mix, name) -> Tensor:
    """Checks as :func:`_l1_conv`, for ``F.conv_transpose*d``'s arguments and weight ``[in, out/groups, *k]``."""
    label = _label(name, f"l1_conv_transpose{nd}d")
    if not _is_proxy(weight) and weight.dim() != nd + 2:
        raise UsageError(f"{label}: weight must be {nd + 2}-D [in_channels, out_channels/groups, *kernel], "
                         f"got shape {tuple(weight.shape)}")
    if not _is_int(groups):
        raise UsageError(f"{label}: groups must be a positive int, got {groups!r}")
    if isinstance(padding, str):
        raise UsageError(f"{label}: padding must be an int or a tuple of {nd} ints (transposed convolutions "
                         f"have no 'same'/'valid'), got {padding!r}")
    stride_ = _tuple(stride, nd, "stride", label)
    padding_ = _tuple(padding, nd, "padding", label)
    output_padding_ = _tuple(output_padding, nd, "output_padding", label)
    dilation_ = _tuple(dilation, nd, "dilation", label)
    if _is_proxy(x, weight, bias):
        return ops_transpose.conv_transpose(x, weight, bias, stride_, padding_, output_padding_, groups, dilation_,
                                            mix)
    mix = _check_mix(mix, label)
    if any(s < 1 for s in stride_) or any(d < 1 for d in dilation_) or any(p < 0 for p in padding_):
        raise UsageError(f"{label}: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride_}, padding={padding_}, dilation={dilation_}")
    if any(op < 0 or (op >= s and op >= d) for op, s, d in zip(output_padding_, stride_, dilation_)):
        raise UsageError(f"{label}: output_padding must be >= 0 and smaller than stride or dilation (as in "
                         f"F.conv_transpose{nd}d), got output_padding={output_padding_}, stride={stride_}, "
                         f"dilation={dilation_}")
    if groups < 1:
        raise UsageError(f"{label}: groups must be a positive int, got {groups!r}")
    if x.dim() != nd + 2:
        raise UsageError(f"{label}: expected a {nd + 2}-D input [batch, channels, {', '.join('DHW'[3 - nd:])}], "
                         f"got shape {tuple(x.shape)}")
    in_c, out_per_group = weight.shape[0], weight.shape[1]
    if in_c % groups:
        raise UsageError(f"{label}: groups={groups} does not divide in_channels={in_c} (weight shape "
                         f"{tuple(weight.shape)})")
    if x.shape[1] != in_c:
        raise UsageError(f"{label}: input has {x.shape[1]} channels (shape {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects {in_c} (weight layout [in, out/groups, *kernel])")
    if bias is not None and tuple(bias.shape) != (out_per_group * groups,):
        raise UsageError(f"{label}: bias must have shape ({out_per_group * groups},), got {tuple(bias.shape)}")
    kernel = list(weight.shape[2:])
    if any(k < 1 for k in kernel):
        raise UsageError(f"{label}: kernel size must be >= 1 in every dimension, got weight shape "
                         f"{tuple(weight.shape)}")
    if any(s == 0 for s in x.shape[2:]):
        raise UsageError(f"{label}: input spatial size must be >= 1 in every dimension, got shape {tuple(x.shape)}")
    from l1fx.kernels.conv_transpose import out_shape

    out = out_shape(x.shape[2:], kernel, stride_, padding_, output_padding_, dilation_)
    if any(o < 1 for o in out):
        raise UsageError(f"{label}: the output size {tuple(out)} is not positive (input {tuple(x.shape[2:])}, "
                         f"padding {padding_} too large for the kernel {tuple(kernel)} and stride {stride_})")
    x, weight, bias = _common_dtype(label, x, weight, bias)
    return ops_transpose.conv_transpose(x, weight, bias, stride_, padding_, output_padding_, int(groups), dilation_,
                                        mix)


def _conv_transpose_nd(nd: int):
    def fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntOrTuple = 1,
           padding: _IntOrTuple = 0, output_padding: _IntOrTuple = 0, groups: int = 1, dilation: _IntOrTuple = 1,
           *, mix: float = 1.0, name: Optional[str] = None) -> Tensor:
        return _l1_conv_transpose(nd, x, weight, bias, stride, padding, output_padding, groups, dilation, mix, name)

    fn.__name__ = fn.__qualname__ = f"l1_conv_transpose{nd}d"
    fn.__doc__ = (f"l1 analogue of ``F.conv_transpose{nd}d`` (same arguments, weight ``[in, out/groups, *k]``): "
                  f"``y[o] = b - sum |x[i] - w[k]|`` over the pairs ``o = i*stride + k*dilation - padding``.")
    return fn


l1_conv_transpose1d = _conv_transpose_nd(1)
l1_conv_transpose2d = _conv_transpose_nd(2)
l1_conv_transpose3d = _conv_transpose_nd(3)
# ---------------------------------------------------------------- lp layers (any p >= 1, and inf)
__all__ += ["lp_linear", "lp_conv1d", "lp_conv2d", "lp_conv3d", "lp_conv", "check_p"]


def check_p(p, label: str = "p") -> float:
    """``p`` as a float >= 1 (or inf); a :class:`UsageError` naming ``label`` otherwise (p < 1, NaN, not a number)."""
    from l1fx.kernels.lp import check_p as _check

    return _check(p, label)


def lp_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, p: float = 1.0, mix: float = 1.0,
              name: Optional[str] = None) -> Tensor:
    """``y[..., m] = -||x[..., :] - weight[m, :]||_p (+ bias[m])``; ``p = 1`` is :func:`l1_linear` exactly.

    ``p`` is a real >= 1 or ``float("inf")`` (``-max_k |x_k - w_k|``); see docs/l1_ops.md, "ℓp layers".
    """
    label = _label(name, "lp_linear")
    if not _is_proxy(x, weight, bias):
        p = check_p(p, label)
    return _linear(x, weight, bias, mix, name, float(p), "lp_linear")


def lp_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntOrTuple = 1,
            padding: Union[str, _IntOrTuple] = 0, dilation: _IntOrTuple = 1, groups: int = 1, *,
            p: float = 1.0, mix: float = 1.0, name: Optional[str] = None) -> Tensor:
    """N-d ℓp convolution; ``weight.dim() - 2`` spatial dimensions (1, 2 or 3)."""
    return _lp_conv(weight.dim() - 2, x, weight, bias, stride, padding, dilation, groups, p, mix, name)


def _lp_conv(nd, x, weight, bias, stride, padding, dilation, groups, p, mix, name) -> Tensor:
    label = _label(name, f"lp_conv{nd}d" if nd in (1, 2, 3) else "lp_conv")
    if not _is_proxy(x, weight, bias):
        p = check_p(p, label)
    return _l1_conv(nd, x, weight, bias, stride, padding, dilation, groups, mix, name, float(p))


def _lp_conv_nd(nd: int):
    def fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntOrTuple = 1,
           padding: Union[str, _IntOrTuple] = 0, dilation: _IntOrTuple = 1, groups: int = 1, *,
           p: float = 1.0, mix: float = 1.0, name: Optional[str] = None) -> Tensor:
        return _lp_conv(nd, x, weight, bias, stride, padding, dilation, groups, p, mix, name)

    fn.__name__ = fn.__qualname__ = f"lp_conv{nd}d"
    fn.__doc__ = (f"ℓp analogue of ``F.conv{nd}d`` (same arguments, plus ``p`` and ``mix``), "
                  f"``y = -||patch - filter||_p (+ bias)``; ``p = 1`` is :func:`l1_conv{nd}d` exactly.")
    return fn


lp_conv1d = _lp_conv_nd(1)
lp_conv2d = _lp_conv_nd(2)
lp_conv3d = _lp_conv_nd(3)
