"""The ℓp core (``p > 1`` or ``p = inf``) and which kernel runs it.

Same two-function shape as the ℓ1 core of every backend, with ``p``:

* ``lp_linear_forward(x[N, K], w[M, K], bias | None, p) -> y[N, M]``,
  ``y = -||x - w||_p (+ bias)``;
* ``lp_linear_backward(g, x, w, p, mix, need_x, need_w) -> (gx | None, gw | None)``.

``p = 1`` is not an ℓp op here: callers route it to the ℓ1 op (same kernels,
same speed). The backend is the one :func:`l1fx.kernels.get_backend` picks
for the ℓ1 linear op (so ``L1FX_BACKEND`` forces it); a backend with ℓp
kernels (:data:`LP_KERNELS`: ``cpu`` and ``triton``) runs them, any other
backend (a plug-in without ℓp kernels) runs the reference ℓp kernel.
Convolutions are lowered onto the linear core by the chunked im2col of
:mod:`l1fx.kernels.conv`.
"""
from __future__ import annotations

import functools
import importlib
import math
import numbers
import types
import warnings
from typing import Callable, Optional

from torch import Tensor

from ..errors import BackendUnavailable, UsageError
from . import conv as _conv
from . import BACKEND_ENV, get_backend, lp_reference, requested_backend

# backend name -> module with lp_linear_forward / lp_linear_backward (imported on first use)
# (the reference backend, and any backend not listed, runs kernels/lp_reference.py)
LP_KERNELS = {"cpu": "l1fx.kernels.lp_cpu", "triton": "l1fx.kernels.lp_triton"}


def check_p(p, label: str, error: type = UsageError) -> float:
    """``p`` as a float ``>= 1`` (``inf`` allowed); anything else raises ``error`` naming ``label``'s ``p``."""
    if isinstance(p, str):
        try:
            p = float(p)
        except ValueError:
            raise error(f"{label}: p must be a number >= 1 or 'inf', got {p!r}") from None
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise error(f"{label}: p must be a number >= 1 or inf, got {p!r}")
    p = float(p)
    if math.isnan(p) or p < 1.0:
        raise error(f"{label}: p must be >= 1 (an ℓp norm; p < 1 is not a norm) or inf, got {p}")
    return p


def p_name(p: float) -> str:
    """``"2"``, ``"1.5"``, ``"inf"``: p as people write it."""
    return "inf" if math.isinf(p) else f"{p:g}"


@functools.lru_cache(maxsize=None)
def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional kernel module left out of this installation
        if e.name != name:
            raise
        return lp_reference_core


def _kernels(x: Tensor) -> tuple[Callable, Callable]:
    backend = get_backend(x, op="linear")
    module = LP_KERNELS.get(backend.name)
    if module is not None:
        mod = _module(module)
        if mod.supports(x):
            ok, why = mod.available()
            if ok:
                return mod.lp_linear_forward, mod.lp_linear_backward
            # as for the l1 ops: a forced backend fails loudly, auto falls back with one warning
            if requested_backend() == backend.name:
                raise BackendUnavailable(f"{BACKEND_ENV}={backend.name}: its lp kernels are unavailable ({why}); "
                                         f"unset {BACKEND_ENV} to run the reference lp kernel")
            _warn_fallback(backend.name, why)
    return lp_reference_core.lp_linear_forward, lp_reference_core.lp_linear_backward


@functools.lru_cache(maxsize=None)
def _warn_fallback(backend: str, why: str) -> None:
    warnings.warn(f"l1fx: the {backend} lp kernels are unavailable ({why}); running the reference lp kernel",
                  RuntimeWarning, stacklevel=4)


def lp_linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], p: float) -> Tensor:
    return _kernels(x)[0](x, w, bias, p)


def lp_linear_backward(g: Tensor, x: Tensor, w: Tensor, p: float, mix: float, need_x: bool, need_w: bool):
    return _kernels(x)[1](g, x, w, p, mix, need_x, need_w)


def _core(x: Tensor, p: float):
    """The ℓp linear core at this ``p`` as the (linear_forward, linear_backward) pair conv lowering calls."""
    fwd, bwd = _kernels(x)
    return types.SimpleNamespace(
        linear_forward=lambda xs, ws, b: fwd(xs, ws, b, p),
        linear_backward=lambda g, xs, ws, mix, nx, nw: bwd(g, xs, ws, p, mix, nx, nw))


def lp_conv_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                    p: float) -> Tensor:
    return _conv.conv_forward(_core(x, p), x, w, bias, stride, padding, dilation, groups)


def lp_conv_backward(grad: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int, p: float,
                     mix: float, need_x: bool, need_w: bool):
    return _conv.conv_backward(_core(x, p), grad, x, w, stride, padding, dilation, groups, mix, need_x, need_w)


# The reference as an ℓp kernel module (always available), the fallback of _kernels.
lp_reference_core = types.SimpleNamespace(
    available=lambda: (True, ""), supports=lambda x: True,
    lp_linear_forward=lp_reference.linear_forward, lp_linear_backward=lp_reference.linear_backward)
