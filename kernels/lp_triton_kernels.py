"""Triton kernel of the ℓp forward (imported lazily by :mod:`.lp_triton`; triton must be installed).

``lp_norm_fwd`` writes ``r[n, m] = ||x[n] - w[m]||_p`` for one ``BLOCK_N x BLOCK_M``
tile per program, walking ``k`` one index at a time (no N x M x K tensor), the
difference ``d = x - w`` formed in ``ACC``. ``MODE`` (constexpr) picks the path:

* 0, p = 2: ``acc += d * d`` (one FMA; never ``||x||^2 + ||w||^2 - 2 x.w``);
* 1, p = inf: ``acc = max(acc, |d|)`` (NaN-propagating);
* 2, p = NPOW (+ 1/2 with HALF): ``acc += |d|^NPOW [* sqrt|d|]``, multiplies only;
* 3, any other p: two passes, ``m = max |d|`` then ``acc += exp2(p * log2(|d| / m))``
  (ratios in [0, 1]: nothing overflows), ``r = m * acc^(1/p)``; ``r = m`` where m is 0 or inf.

The one-pass modes (0, 2) write ``-1`` where the sum overflowed, is NaN, or fell
below 2^-100 (underflowed terms could matter); the wrapper recomputes those rows
with the reference kernel, as mode 3 does where ``m`` is below the smallest
normal float (its reciprocal would overflow).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

try:
    from triton import knobs

    INTERPRETED: bool = bool(knobs.runtime.interpret)
except ImportError:  # Triton < 3.4
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

SMALL = 7.888609052210118e-31  # 2^-100
TINY = 1.1754943508222875e-38  # smallest normal float32


@triton.jit
def _powi(a, NPOW: tl.constexpr):
    out = a
    for _ in tl.static_range(NPOW - 1):
        out = out * a
    return out


@triton.jit
def lp_norm_fwd(
    x_ptr, w_ptr, r_ptr, N, M, K, p, inv_p,
    stride_xn, stride_xk, stride_wm, stride_wk,
    MODE: tl.constexpr, NPOW: tl.constexpr, HALF: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Out-of-range rows/filters wrap onto valid ones (loads need no mask); never stored.
    x_ptrs = x_ptr + (rn % N).to(tl.int64) * stride_xn
    w_ptrs = w_ptr + (rm % M).to(tl.int64) * stride_wm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    for k in range(0, K):
        xk = tl.load(x_ptrs + k * stride_xk).to(ACC)
        wk = tl.load(w_ptrs + k * stride_wk).to(ACC)
        d = xk[:, None] - wk[None, :]
        if MODE == 0:
            acc += d * d
        elif MODE == 2:
            a = tl.abs(d)
            if HALF:
                acc += _powi(a, NPOW) * tl.sqrt(a)
            else:
                acc += _powi(a, NPOW)
        else:
            acc = tl.maximum(acc, tl.abs(d), propagate_nan=tl.PropagateNan.ALL)
    if MODE == 3:
        m = acc
        inv = 1.0 / m
        s = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
        for k in range(0, K):
            xk = tl.load(x_ptrs + k * stride_xk).to(ACC)
            wk = tl.load(w_ptrs + k * stride_wk).to(ACC)
            t = tl.abs(xk[:, None] - wk[None, :]) * inv
            s += tl.where(t > 0, tl.exp2(p * tl.log2(t)), 0.0)
        # the root in float64: log2 of a sum up to K, times 1/p, must not lose digits
        r = (m.to(tl.float64) * tl.exp2(inv_p * tl.log2(s.to(tl.float64)))).to(ACC)
        r = tl.where((m == 0) | (m == float("inf")), m, r)
        r = tl.where((m > 0) & (m < TINY), -1.0, r)
    elif MODE == 1:
        r = acc
    else:
        ok = (acc >= SMALL) & (acc < float("inf"))
        if MODE == 0:
            root = tl.sqrt(acc)
        else:
            # in float64: log2 of an unscaled sum is up to ~100, exp2 would amplify its rounding
            root = tl.exp2(inv_p * tl.log2(acc.to(tl.float64))).to(ACC)
        r = tl.where(ok, root, -1.0)
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    tl.store(r_ptr + rn[:, None].to(tl.int64) * M + rm[None, :], r.to(r_ptr.dtype.element_ty), mask=mask)
