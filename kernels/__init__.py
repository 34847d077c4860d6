"""Kernels for the l1 ops and the backend registry that picks one.

Every backend implements the same two-function core on 2-D operands:

* ``linear_forward(x[N, K], w[M, K], bias[M] | None) -> y[N, M]``
  with ``y = -sum_k |x - w| (+ bias)``;
* ``linear_backward(g[N, M], x, w, mix, need_x, need_w) -> (gx | None, gw | None)``
  with the Mixed Gradient Strategy blend (see docs/l1_ops.md).

Convolutions are lowered onto that core by :mod:`l1fx.kernels.conv`
(chunked im2col), unless a backend supplies its own ``conv_forward``.

The backend is chosen by ``L1FX_BACKEND``: ``auto`` (default), a built-in
name (``reference``, ``cpu``, ``triton``) or the name of any backend
registered with :func:`register_backend`. A backend asked for by name that
cannot run raises; only ``auto`` falls back.

Support is per op (``"linear"``, ``"conv"``): a backend lists the ops it runs
in ``ops`` (default both; ``conv`` through the im2col lowering onto its linear
core unless it has ``conv_forward``), and ``supports`` may take ``(x)`` (same
answer for every op) or ``(op, x)``. ``get_backend(x, op="conv")`` under
``auto`` skips backends that do not run conv; a forced backend that does not
raises :class:`BackendUnavailable` naming the op.

A third-party backend::

    from l1fx.kernels import Backend, register_backend
    register_backend(Backend("mine", my_linear_forward, my_linear_backward, ops=("linear",), priority=30))
    # L1FX_BACKEND=mine now forces it; under auto it runs linear, conv goes to the next backend
"""
from __future__ import annotations

import functools
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional

import torch

from .memory import chunk_bytes, set_chunk_bytes  # noqa: F401

BACKEND_ENV = "L1FX_BACKEND"
BUILTIN_BACKENDS = ("reference", "cpu", "triton")
BACKEND_NAMES = ("auto",) + BUILTIN_BACKENDS  # the built-in names; backend_names() adds registered ones
OPS = ("linear", "conv")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")


from ..errors import BackendUnavailable, UsageError  # noqa: E402,F401  (one hierarchy: l1fx.errors)


@functools.lru_cache(maxsize=256)  # get_backend runs on every op call: inspect each function once
def _takes_op_cached(fn: Callable) -> bool:
    return _inspect_takes_op(fn)


def _inspect_takes_op(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def _takes_op(fn: Callable) -> bool:
    """Whether ``supports`` is the per-op form ``(op, x)`` rather than ``(x)``."""
    try:
        return _takes_op_cached(fn)
    except TypeError:  # an unhashable callable (an object with __eq__ but no __hash__): inspect it each time
        return _inspect_takes_op(fn)


@dataclass
class Backend:
    """One implementation of the l1 core.

    ``available()`` returns ``(ok, reason)``; ``supports(x)`` or ``supports(op, x)``
    says whether the backend handles tensors like ``x`` (device, dtype);
    ``priority`` orders the candidates of ``auto`` (higher first); ``ops`` are
    the ops it runs (``None``: all of :data:`OPS`).
    """

    name: str
    linear_forward: Callable
    linear_backward: Callable
    available: Callable[[], tuple[bool, str]] = lambda: (True, "")
    supports: Callable[..., bool] = lambda x: True
    priority: int = 0
    conv_forward: Optional[Callable] = None
    conv_backward: Optional[Callable] = None
    extra: dict = field(default_factory=dict)
    ops: Optional[Collection[str]] = None

    def runs(self, op: str) -> bool:
        """Whether this backend implements ``op`` at all."""
        return op in (OPS if self.ops is None else self.ops)

    def handles(self, op: str, x: torch.Tensor) -> bool:
        """``op`` on tensors like ``x``: implemented and supported (cheap; no availability probe)."""
        if not self.runs(op):
            return False
        return bool(self.supports(op, x) if _takes_op(self.supports) else self.supports(x))


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` selectable: by ``L1FX_BACKEND=<name>``, and under ``auto`` by priority.

    Registering a name again replaces that backend (so a plug-in can replace
    a built-in one). Names are lower case (the variable is read lower-cased);
    ``auto`` is reserved.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects an l1fx.kernels.Backend, got {type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str) or not _NAME.match(name) or name == "auto":
        raise UsageError(f"l1fx backend name {name!r} is not usable: use lower-case letters, digits, '_', '-' "
                         f"or '.', starting with a letter or digit, and not 'auto'")
    unknown = [op for op in (backend.ops or ()) if not isinstance(op, str)]
    if unknown:
        raise TypeError(f"l1fx backend {name!r}: ops must be op names such as {OPS}, got {unknown!r}")
    _REGISTRY[name] = backend
    return backend


def unregister_backend(name: str) -> Backend:
    """Remove a registered backend (returns it)."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise KeyError(f"no l1fx backend {name!r} is registered (registered: {', '.join(_REGISTRY)})") from None


def registered_backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


def available_backends() -> list[str]:
    return [n for n, b in _REGISTRY.items() if b.available()[0]]


def backend_names() -> tuple[str, ...]:
    """Every name ``L1FX_BACKEND`` accepts: ``auto``, the built-in names, then registered ones."""
    return BACKEND_NAMES + tuple(n for n in _REGISTRY if n not in BACKEND_NAMES)


def _check_name(name: str, what: str) -> None:
    if name not in backend_names():
        raise UsageError(f"{what} is not a backend; set it to one of {', '.join(backend_names())}")


def requested_backend() -> str:
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    _check_name(name, f"{BACKEND_ENV}={name!r}")
    return name


def get_backend(x: torch.Tensor, name: Optional[str] = None, *, op: str = "linear") -> Backend:
    """The backend that runs ``op`` (``"linear"`` core, or ``"conv"``) on tensors like ``x``.

    ``name`` (default: ``$L1FX_BACKEND``) may force one; a forced backend that
    is missing, unavailable, without ``op`` or unable to handle ``x`` raises
    :class:`BackendUnavailable` instead of silently running something else.
    """
    name = requested_backend() if name is None else name
    if name != "auto":
        _check_name(name, f"l1fx backend {name!r}")
        backend = _REGISTRY.get(name)
        if backend is None:
            raise BackendUnavailable(f"l1fx backend {name!r} is not built into this installation")
        ok, why = backend.available()
        if not ok:
            raise BackendUnavailable(f"l1fx backend {name!r} is unavailable: {why}")
        if not backend.runs(op):
            others = [b.name for b in _by_priority() if b.name != name and b.runs(op)]
            raise BackendUnavailable(
                f"l1fx backend {name!r} does not implement the l1 {op} op (it runs: "
                f"{', '.join(backend.ops or OPS)}); unset {BACKEND_ENV} or use {BACKEND_ENV}=auto"
                + (f" to run {op} on {', '.join(others)}" if others else ""))
        if not backend.handles(op, x):
            raise BackendUnavailable(
                f"l1fx backend {name!r} cannot run {x.dtype} tensors on {x.device}"
                + (f" for the l1 {op} op" if _takes_op(backend.supports) else "")
                + f"; unset {BACKEND_ENV} or use {BACKEND_ENV}=auto"
            )
        return backend
    for backend in _by_priority():
        # handles() first: it is a cheap op/device/dtype check, available() may probe the system.
        if backend.handles(op, x) and backend.available()[0]:
            return backend
    raise BackendUnavailable(f"no l1fx backend handles the l1 {op} op on {x.dtype} tensors on {x.device}"
                             f" (registered: {', '.join(_REGISTRY) or 'none'})")


def _by_priority() -> list[Backend]:
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def conv_kernels(x: torch.Tensor, name: Optional[str] = None) -> tuple[Backend, Callable, Callable]:
    """(backend, forward, backward) for an l1 convolution on tensors like ``x``.

    The backend's own ``conv_forward``/``conv_backward`` where it has them,
    else the chunked im2col lowering onto its linear core (:mod:`.conv`).
    """
    from . import conv as _conv

    backend = get_backend(x, name, op="conv")
    forward = backend.conv_forward or (lambda *a: _conv.conv_forward(backend, *a))
    backward = backend.conv_backward or (lambda *a: _conv.conv_backward(backend, *a))
    return backend, forward, backward


def _register_builtin() -> None:
    import importlib

    from . import reference

    register_backend(reference.BACKEND)
    # Optional backends: each module exposes BACKEND and must import without
    # its compiler/GPU (availability is reported by BACKEND.available()).
    for mod in ("cpu", "triton_backend"):
        try:
            module = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        register_backend(module.BACKEND)


_register_builtin()


# ---------------------------------------------------------------- transposed convolution (l1fx::conv_transpose)
# Backend name -> loader of its (forward, backward) kernels of the l1 transposed convolution
# (kernels/conv_transpose.py has the reference and the signatures); a loader raises BackendUnavailable
# when its kernels cannot run (a failed C++ build). "triton" runs the reference kernel: plain torch ops
# on the tensors' device. A backend without an entry does not run the op.
CONV_TRANSPOSE = "conv_transpose"
CONV_TRANSPOSE_KERNELS: dict[str, Callable[[], tuple[Callable, Callable]]] = {}
_transpose_warned: set = set()


def _reference_transpose():
    from . import conv_transpose as _ct

    return _ct.conv_transpose_forward, _ct.conv_transpose_backward


def _cpu_transpose():
    from . import cpu_transpose

    return cpu_transpose.kernels()


CONV_TRANSPOSE_KERNELS.update(reference=_reference_transpose, triton=_reference_transpose, cpu=_cpu_transpose)


def conv_transpose_kernels(x: torch.Tensor, name: Optional[str] = None) -> tuple[str, Callable, Callable]:
    """(backend name, forward, backward) of the l1 transposed convolution on tensors like ``x``.

    Chosen as for conv (device, dtype, availability: ``get_backend(x, op="conv")``) among the backends
    with an entry in :data:`CONV_TRANSPOSE_KERNELS`; under ``auto`` a backend whose transposed kernels
    cannot load is passed over with a one-line warning, forced it raises ``BackendUnavailable``.
    """
    name = requested_backend() if name is None else name
    if name != "auto":
        get_backend(x, name, op="conv")  # raises for a missing/unavailable backend or unsupported tensors
        loader = CONV_TRANSPOSE_KERNELS.get(name)
        if loader is None:
            raise BackendUnavailable(f"l1fx backend {name!r} does not implement the l1 {CONV_TRANSPOSE} op (it "
                                     f"runs on: {', '.join(CONV_TRANSPOSE_KERNELS)}); unset {BACKEND_ENV} or use "
                                     f"{BACKEND_ENV}=auto")
        return (name, *loader())
    for backend in _by_priority():
        loader = CONV_TRANSPOSE_KERNELS.get(backend.name)
        if loader is None or not (backend.handles("conv", x) and backend.available()[0]):
            continue
        try:
            return (backend.name, *loader())
        except BackendUnavailable as e:
            if backend.name not in _transpose_warned:
                _transpose_warned.add(backend.name)
                import warnings

                warnings.warn(f"l1fx: {e}; the l1 {CONV_TRANSPOSE} op uses the next backend", RuntimeWarning,
                              stacklevel=2)
    raise BackendUnavailable(f"no l1fx backend runs the l1 {CONV_TRANSPOSE} op on {x.dtype} tensors on {x.device}")
