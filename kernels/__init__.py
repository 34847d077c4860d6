"""Kernels for the l1 ops and the backend registry that picks one.

Every backend implements the same two-function core on 2-D operands:

* ``linear_forward(x[N, K], w[M, K], bias[M] | None) -> y[N, M]``
  with ``y = -sum_k |x - w| (+ bias)``;
* ``linear_backward(g[N, M], x, w, mix, need_x, need_w) -> (gx | None, gw | None)``
  with the Mixed Gradient Strategy blend (see docs/l1_ops.md).

Convolutions are lowered onto that core by :mod:`l1fx.kernels.conv`
(chunked im2col), unless a backend supplies its own ``conv_forward``.

The backend is chosen by ``L1FX_BACKEND`` in {auto, reference, cpu, triton}.
A backend asked for by name that cannot run raises; only ``auto`` falls back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .memory import chunk_bytes, set_chunk_bytes  # noqa: F401

BACKEND_ENV = "L1FX_BACKEND"
BACKEND_NAMES = ("auto", "reference", "cpu", "triton")


from ..errors import BackendUnavailable  # noqa: E402,F401  (one hierarchy: l1fx.errors)


@dataclass
class Backend:
    """One implementation of the l1 core.

    ``available()`` returns ``(ok, reason)``; ``supports(x)`` says whether the
    backend handles tensors like ``x`` (device, dtype); ``priority`` orders the
    candidates of ``auto`` (higher first).
    """

    name: str
    linear_forward: Callable
    linear_backward: Callable
    available: Callable[[], tuple[bool, str]] = lambda: (True, "")
    supports: Callable[[torch.Tensor], bool] = lambda x: True
    priority: int = 0
    conv_forward: Optional[Callable] = None
    conv_backward: Optional[Callable] = None
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES[1:]}")
    _REGISTRY[backend.name] = backend
    return backend


def registered_backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


def available_backends() -> list[str]:
    return [n for n, b in _REGISTRY.items() if b.available()[0]]


def requested_backend() -> str:
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"{BACKEND_ENV}={name!r} is not a backend; set it to one of {', '.join(BACKEND_NAMES)}"
        )
    return name


def get_backend(x: torch.Tensor, name: Optional[str] = None) -> Backend:
    """The backend that runs the l1 core on tensors like ``x``.

    ``name`` (default: ``$L1FX_BACKEND``) may force one; a forced backend that
    is missing, unavailable or unable to handle ``x`` raises
    :class:`BackendUnavailable` instead of silently running something else.
    """
    name = requested_backend() if name is None else name
    if name != "auto":
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown l1fx backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
        backend = _REGISTRY.get(name)
        if backend is None:
            raise BackendUnavailable(f"l1fx backend {name!r} is not built into this installation")
        ok, why = backend.available()
        if not ok:
            raise BackendUnavailable(f"l1fx backend {name!r} is unavailable: {why}")
        if not backend.supports(x):
            raise BackendUnavailable(
                f"l1fx backend {name!r} cannot run {x.dtype} tensors on {x.device}; "
                f"unset {BACKEND_ENV} or use {BACKEND_ENV}=auto"
            )
        return backend
    for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        # supports() first: it is a cheap device/dtype check, available() may probe the system.
        if backend.supports(x) and backend.available()[0]:
            return backend
    raise BackendUnavailable(f"no l1fx backend handles {x.dtype} tensors on {x.device}")


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
