"""The ``triton`` backend: the l1 core and an implicit-GEMM conv on the GPU.

This module imports without Triton or a GPU; :func:`available` then says
why the backend cannot run, and ``L1FX_BACKEND=triton`` turns that into a
:class:`~l1fx.kernels.BackendUnavailable` naming the cause.  The kernels
themselves live in :mod:`.triton_kernels`, imported on first use because
``triton.jit`` fixes at decoration time whether kernels are compiled for the
GPU or run by Triton's CPU interpreter (``TRITON_INTERPRET=1``).

* CUDA tensors: compiled kernels, block sizes autotuned per (shape, dtype).
* CPU tensors with ``TRITON_INTERPRET=1`` and ``L1FX_BACKEND=triton``: the
  same kernels through the interpreter, with one small fixed block config.
  This exists to test the kernels on machines without a GPU; ``auto`` never
  picks it (it is orders of magnitude slower than the CPU backends).

Conv forward is an implicit GEMM (see ``conv3d_fwd``); 1-D and 2-D
convolutions run as 3-D ones with unit dims.  Conv backward goes through the
chunked im2col lowering of :mod:`.conv` onto this backend's
``linear_backward``: see docs/triton.md for why.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from . import BACKEND_ENV, Backend
from . import conv as _conv
from .memory import chunk_bytes
from .reference import acc_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_GRID_YZ = 65535  # CUDA limit on grid axes 1 and 2


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is set (same truthy spellings as Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> tuple[bool, str]:
    if not _triton_installed():
        return False, "triton is not installed (pip install 'l1fx[triton]', or pip install triton)"
    if interpreting():
        return True, ""
    if not torch.cuda.is_available():
        return False, (
            "no CUDA device visible to torch (torch.cuda.is_available() is False); the Triton kernels need "
            "a GPU, or TRITON_INTERPRET=1 to run them on CPU tensors through Triton's interpreter (slow, for tests)"
        )
    return True, ""


def supports(x: Tensor) -> bool:
    if x.dtype not in FLOAT_DTYPES:
        return False
    if x.is_cuda:
        return True
    # The interpreter only when asked for by name: never auto-selected.
    forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() == "triton"
    return x.device.type == "cpu" and interpreting() and forced


# ------------------------------------------------------------------ kernels & launch configs

@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernel module, imported on first use.

    Triton fixes interpretation when it is imported and when a kernel is
    decorated, so ``TRITON_INTERPRET`` must keep one value per process.
    """
    triton_was_imported = "triton" in sys.modules
    kern = importlib.import_module(f"{__package__}.triton_kernels")
    if not _triton_mode_is(kern.INTERPRETED) and triton_was_imported:
        raise RuntimeError(_MODE_CHANGED)
    return kern


def _triton_mode_is(interpreted: bool) -> bool:
    """Whether Triton's own library kernels were built in the given mode (best effort)."""
    import triton.language.standard as std

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of other Triton versions
        return True
    return isinstance(std.cdiv, InterpretedFunction) == interpreted


_MODE_CHANGED = (
    "TRITON_INTERPRET changed after triton was imported in this process; set TRITON_INTERPRET=1 before "
    "anything imports triton (e.g. at the very start of the process) to run the l1fx kernels on CPU"
)


def _check_mode() -> None:
    if _kernels().INTERPRETED != interpreting():
        raise RuntimeError(_MODE_CHANGED)


def _rows_class(n: int) -> int:
    """Coarse row-count class the autotuner keys on (re-tune only across classes)."""
    return min(max(n - 1, 0).bit_length() // 2, 12)


def _prune(limits: dict):
    """An ``early_config_prune`` dropping tiles much larger than the problem.

    ``limits`` maps a block name to the argument bounding it; a config survives
    if each block is at most the next power of two of its dimension (min 16).
    If every config is pruned, the smallest one stays.
    """
    def prune(configs, named_args, **kwargs):
        def fits(cfg):
            return all(
                cfg.kwargs[blk] <= max(16, 1 << max(int(named_args[dim]) - 1, 0).bit_length())
                for blk, dim in limits.items()
            )
        kept = [c for c in configs if fits(c)]
        return kept or [min(configs, key=lambda c: math.prod(c.kwargs[b] for b in limits))]
    return prune


def _configs(triton, names: tuple[str, ...], shapes, unrolls=(None,)):
    """``triton.Config`` per (block_r, block_c, tile_r, tile_c, warps) and unroll factor."""
    return [
        triton.Config({**{n: v for n, v in zip(names, shape[:4]) if n != "_"}, **({} if u is None else {"UNROLL": u})},
                      num_warps=shape[4])
        for shape in shapes
        for u in unrolls
    ]


# Interpreter: one small config (autotuning would only add minutes of emulation).
_INTERPRET_META = {
    "linear_fwd": dict(BLOCK_N=16, BLOCK_M=16, TN=4, TM=4, UNROLL=1),
    "conv3d_fwd": dict(BLOCK_P=32, BLOCK_M=16, TP=2),
    "linear_grad_x": dict(BLOCK_N=16, BLOCK_K=16, TN=2, UNROLL=1),
    "linear_grad_w": dict(BLOCK_M=16, BLOCK_K=16, TM=2, UNROLL=1),
}

# GPU tiles (block_r, block_c, tile_r, tile_c, warps).  Each keeps
# (block_r / tile_r) * (block_c / tile_c) == 32 * warps, so every thread
# owns exactly one tile_r x tile_c register sub-tile.
_FWD_TILES = [
    (128, 128, 8, 8, 8), (128, 64, 8, 8, 4), (64, 128, 8, 8, 4), (256, 64, 8, 8, 8),
    (64, 64, 4, 8, 4), (128, 32, 8, 4, 4), (64, 32, 4, 4, 4), (256, 128, 8, 8, 16),
]
# Conv (block_p, block_m, tile_p, -, warps): block_p == tile_p * 32 * warps.
_CONV_TILES = [
    (256, 64, 2, None, 4), (256, 32, 2, None, 4), (512, 32, 4, None, 4), (128, 64, 1, None, 4),
    (256, 16, 2, None, 4), (512, 64, 2, None, 8), (128, 128, 1, None, 4), (256, 128, 1, None, 8),
]
# Gradients (block_r, block_k, tile_r, -, warps): block_r == tile_r * 32 * warps.
_GRAD_X_TILES = [
    (128, 32, 1, None, 4), (256, 32, 2, None, 4), (128, 64, 1, None, 4), (256, 16, 2, None, 4),
    (128, 16, 1, None, 4), (512, 16, 4, None, 4), (64, 32, 1, None, 2), (64, 64, 1, None, 2),
]
_GRAD_W_TILES = [
    (128, 32, 1, None, 4), (64, 32, 1, None, 2), (128, 64, 1, None, 4), (64, 64, 1, None, 2),
    (256, 32, 2, None, 4), (32, 32, 1, None, 1), (128, 16, 1, None, 4), (64, 16, 1, None, 2),
]


def _launchers() -> dict:
    _check_mode()
    return _launchers_for(_kernels())


@functools.lru_cache(maxsize=None)
def _launchers_for(kern) -> dict:
    """name -> (kernel, fixed meta or None).  On the GPU the kernels are autotuned."""
    if kern.INTERPRETED:
        return {name: (getattr(kern, name), meta) for name, meta in _INTERPRET_META.items()}
    import triton

    def tuned(fn, names, tiles, unrolls, key, limits):
        return triton.autotune(
            _configs(triton, names, tiles, unrolls), key=key,
            prune_configs_by={"early_config_prune": _prune(limits)},
        )(fn), None

    return {
        "linear_fwd": tuned(kern.linear_fwd, ("BLOCK_N", "BLOCK_M", "TN", "TM"), _FWD_TILES, (1, 4),
                            ["M", "K", "ROWS_CLASS"], {"BLOCK_N": "N", "BLOCK_M": "M"}),
        "conv3d_fwd": tuned(kern.conv3d_fwd, ("BLOCK_P", "BLOCK_M", "TP", "_"), _CONV_TILES, (None,),
                            ["Mg", "Cg", "KD", "KH", "KW", "ROWS_CLASS"], {"BLOCK_P": "P", "BLOCK_M": "Mg"}),
        "linear_grad_x": tuned(kern.linear_grad_x, ("BLOCK_N", "BLOCK_K", "TN", "_"), _GRAD_X_TILES, (1, 4),
                               ["M", "K", "ROWS_CLASS"], {"BLOCK_N": "N", "BLOCK_K": "K"}),
        "linear_grad_w": tuned(kern.linear_grad_w, ("BLOCK_M", "BLOCK_K", "TM", "_"), _GRAD_W_TILES, (1, 4),
                               ["M", "K", "ROWS_CLASS"], {"BLOCK_M": "M", "BLOCK_K": "K"}),
    }


def _launch(name: str, grid, *args, **constexprs) -> None:
    """Run kernel ``name``; ``grid(meta)`` maps the block sizes to the launch grid."""
    fn, meta = _launchers()[name]
    if meta is None:
        fn[grid](*args, **constexprs)
    else:
        fn[grid(meta)](*args, **constexprs, **meta)


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_guard(x: Tensor):
    import contextlib

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            f"the l1fx Triton kernels need CUDA tensors, got {x.device}; move the tensors to the GPU, "
            "or set TRITON_INTERPRET=1 to run them through Triton's CPU interpreter (slow, for tests)"
        )


def _mix_mode(mix: float) -> int:
    kern = _kernels()
    if mix == 0.0:
        return kern.SIGN_ONLY
    if mix == 1.0:
        return kern.FULL_PRECISION
    return kern.BLEND


# ------------------------------------------------------------------ the core

def linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y[n, m] = -sum_k |x[n, k] - w[m, k]| + bias[m]`` for 2-D ``x``, ``w``."""
    n, k = x.shape
    m = w.shape[0]
    y = torch.empty(n, m, dtype=x.dtype, device=x.device)
    if n == 0 or m == 0:
        return y
    _check_device(x)
    wt = w.t().contiguous()  # [K, M]: a reduction step reads consecutive filters (tiny copy)
    with _device_guard(x):
        _launch(
            "linear_fwd",
            lambda meta: (_cdiv(n, meta["BLOCK_N"]), _cdiv(m, meta["BLOCK_M"])),
            x, wt, y if bias is None else bias, y,
            n, m, k, _rows_class(n),
            x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, ACC=_tl_acc(x.dtype),
        )
    return y


def _grad_w_splits(n: int, m: int, k: int, x: Tensor) -> int:
    """How many row ranges the weight gradient is split into.

    Enough programs to fill the GPU (~4 per SM for 64x64 tiles), at least
    256 rows each, and partial sums within the chunk budget.
    """
    if x.is_cuda:
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
        min_rows = 256
    else:  # interpreter: a few splits so the tests cover the partial-sum path
        programs, min_rows = 2, 8
    tiles = _cdiv(m, 64) * _cdiv(k, 64)
    split = max(1, min(_cdiv(programs, tiles), _cdiv(n, min_rows), _MAX_GRID_YZ))
    itemsize = torch.finfo(acc_dtype(x.dtype)).bits // 8
    return max(1, min(split, chunk_bytes() // max(m * k * itemsize, 1)))


def linear_backward(
    g: Tensor, x: Tensor, w: Tensor, mix: float, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """MGS gradients, blend computed in the kernels (formulas in reference.py)."""
    n, k = x.shape
    m = w.shape[0]
    gx = gw = None
    if not (need_x or need_w):
        return None, None
    _check_device(x)
    acc = _tl_acc(x.dtype)
    mode = _mix_mode(mix)
    rows = _rows_class(n)
    with _device_guard(x):
        if need_x:
            gx = torch.zeros(n, k, dtype=x.dtype, device=x.device)
            if n and k and m:
                _launch(
                    "linear_grad_x",
                    lambda meta: (_cdiv(n, meta["BLOCK_N"]), _cdiv(k, meta["BLOCK_K"])),
                    g, x, w, gx,
                    n, m, k, rows, float(mix),
                    g.stride(0), g.stride(1), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                    gx.stride(0), gx.stride(1),
                    MIX_MODE=mode, ACC=acc,
                )
        if need_w:
            if n and k and m:
                split = _grad_w_splits(n, m, k, x)
                rows_per_split = _cdiv(n, split)
                split = _cdiv(n, rows_per_split)
                part = torch.empty(split, m, k, dtype=acc_dtype(x.dtype), device=x.device)
                _launch(
                    "linear_grad_w",
                    lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(k, meta["BLOCK_K"]), split),
                    g, x, w, part,
                    n, m, k, rows_per_split, rows, float(mix),
                    g.stride(0), g.stride(1), x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                    MIX_MODE=mode, ACC=acc,
                )
                gw = (part[0] if split == 1 else part.sum(0)).to(w.dtype)
            else:
                gw = torch.zeros(m, k, dtype=w.dtype, device=w.device)
    return gx, gw


# ------------------------------------------------------------------ conv

def _lift_3d(x: Tensor, w: Tensor, stride, padding, dilation):
    """View a 1-D/2-D conv as a 3-D one with unit leading spatial dims."""
    extra = 5 - x.dim()
    if extra == 0:
        return x, w, list(stride), list(padding), list(dilation)
    unit = [1] * extra
    x5 = x.reshape(*x.shape[:2], *unit, *x.shape[2:])
    w5 = w.reshape(*w.shape[:2], *unit, *w.shape[2:])
    return x5, w5, unit + list(stride), [0] * extra + list(padding), unit + list(dilation)


def conv_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """l1 conv1d/2d/3d forward as an implicit GEMM (no im2col tensor).

    ``x`` is contiguous N C *spatial, padding symmetric and explicit.
    """
    out = _conv.out_shape(x.shape[2:], w.shape[2:], stride, padding, dilation)
    batch, m = x.shape[0], w.shape[0]
    x5, w5, st, pad, dil = _lift_3d(x, w, stride, padding, dilation)
    out5 = _conv.out_shape(x5.shape[2:], w5.shape[2:], st, pad, dil)
    y = torch.empty((batch, m, *out5), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y.reshape(batch, m, *out)
    mg, cg = m // groups, x.shape[1] // groups
    if groups * _cdiv(mg, 16) > _MAX_GRID_YZ:  # too many (group, filter-tile) programs for grid axis 1
        return _conv.conv_forward(BACKEND, x, w, bias, stride, padding, dilation, groups)
    _check_device(x)
    kd, kh, kw = w5.shape[2:]
    # [G, Cg*kd*kh*kw, Mg]: one reduction step loads consecutive filters.
    w_packed = w5.reshape(groups, mg, -1).transpose(1, 2).contiguous()
    p = batch * math.prod(out5)
    with _device_guard(x):
        _launch(
            "conv3d_fwd",
            lambda meta: (_cdiv(p, meta["BLOCK_P"]), groups * _cdiv(mg, meta["BLOCK_M"])),
            x5, w_packed, y if bias is None else bias, y,
            p, mg, cg, _rows_class(p),
            *x5.shape[2:], *out5,
            kd, kh, kw, *st, *pad, *dil,
            *x5.stride(),
            y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, ACC=_tl_acc(x.dtype),
        )
    return y.reshape(batch, m, *out)


BACKEND = Backend(
    name="triton",
    linear_forward=linear_forward,
    linear_backward=linear_backward,
    available=available,
    supports=supports,
    priority=20,
    conv_forward=conv_forward,
    conv_backward=None,  # chunked im2col onto linear_backward (docs/triton.md)
)
