"""Triton kernels for the l1 ops (imported lazily by :mod:`.triton_backend`).

Every kernel is tiled like a SIMT GEMM: a program owns one output tile held
in registers and walks the reduction dimension one index at a time, loading
one column (or row) of each operand per step, so no N x M x K tensor ever
exists.  Accumulation is in ``ACC`` (float32 for float16/bfloat16/float32
inputs, float64 for float64).

* ``linear_fwd``    ``y[n, m] = -sum_k |x[n, k] - w[m, k]| + b[m]``.  One
  step is a subtract and an add of an absolute value per element: the two
  FP32 instructions of an l1 multiply-accumulate (the abs folds into the
  FADD's operand modifier).
* ``conv3d_fwd``    the same reduction as an implicit GEMM: rows are output
  positions, the reduction runs over (channel, kd, kh, kw), and the input
  address of each patch element is computed in the kernel from
  stride/padding/dilation/groups.  Padding reads as zero (``|0 - w|``), like
  the zero-padded im2col lowering.
* ``linear_grad_x`` ``gx[n, k] = sum_m g[n, m] * phi(w[m, k] - x[n, k])``,
  ``phi = mix * clamp(., -1, 1) + (1 - mix) * sign(.)``.
* ``linear_grad_w`` ``gw[m, k] = sum_n g[n, m] * psi(x[n, k] - w[m, k])``,
  ``psi = mix * (.) + (1 - mix) * sign(.)``.  The long reduction over ``n`` is
  split across programs (partial sums ``part[split, m, k]`` that the caller
  adds up) so that small weights still fill the GPU; no atomics, so the
  result is deterministic.

Register tiling (which Triton exposes only through tensor shapes).
``linear_fwd`` holds its ``BR x BC`` tile as the 4-D tensor
``[TR, TC, BR // TR, BC // TC]`` (:func:`_rows`, :func:`_cols`): Triton's
default layout spreads threads over the last two dims, so each thread owns a
``TR x TC`` sub-tile and one step costs ``TR + TC`` loads for ``TR * TC``
elements.  The other kernels hold ``[TR, BC, BR // TR]``
(:func:`_rows_across_threads`, :func:`_cols_in_thread`): rows across
threads, all columns in every thread; that keeps one layout through their
long row-index arithmetic (conv) and their coalesced row loads (gradients).
A plain 2-D tile compiled (sm_90) to one load and one address IMAD per
element.  ``python bench/bench_gpu.py --sass`` prints the instruction mix of
each hot loop without a GPU; docs/triton.md has the numbers.

``MIX_MODE`` specialises the MGS blend at compile time: 0 is ``mix == 0``
(sign only), 1 is ``mix == 1`` (AdderNet's full-precision gradient), 2 a true
blend.  Row strides of operands a thread reads ``TR`` rows of are
``tl.constexpr`` so that those addresses are one register plus immediates.
``ROWS_CLASS`` is unused by the kernels: it is a coarse size class of the
row count that the autotuner keys on.

Triton decides when it is imported, and when a kernel is decorated, whether
kernels are compiled or interpreted: ``TRITON_INTERPRET`` must have its final
value before triton is first imported in the process.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

try:
    from triton import knobs

    #: True when these kernels were built for Triton's CPU interpreter.
    INTERPRETED: bool = bool(knobs.runtime.interpret)
except ImportError:  # Triton < 3.4 reads the variable directly
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")

SIGN_ONLY, FULL_PRECISION, BLEND = 0, 1, 2


@triton.jit
def _rows(start, BLOCK: tl.constexpr, T: tl.constexpr):
    """Row indices of a register-tiled block, shape ``[T, 1, BLOCK // T, 1]``."""
    return start + tl.arange(0, BLOCK // T)[None, None, :, None] * T + tl.arange(0, T)[:, None, None, None]


@triton.jit
def _cols(start, BLOCK: tl.constexpr, T: tl.constexpr):
    """Column indices of a register-tiled block, shape ``[1, T, 1, BLOCK // T]``."""
    return start + tl.arange(0, BLOCK // T)[None, None, None, :] * T + tl.arange(0, T)[None, :, None, None]


@triton.jit
def _rows_across_threads(start, BLOCK: tl.constexpr, T: tl.constexpr):
    """Row indices ``[T, 1, BLOCK // T]``: consecutive rows on consecutive threads."""
    return start + tl.arange(0, T)[:, None, None] * (BLOCK // T) + tl.arange(0, BLOCK // T)[None, None, :]


@triton.jit
def _cols_in_thread(start, BLOCK: tl.constexpr):
    """Column indices ``[1, BLOCK, 1]``: every thread holds all columns of the tile."""
    return start + tl.arange(0, BLOCK)[None, :, None]


@triton.jit
def _sign(d):
    # torch.sign semantics: 0 at 0 (so exact ties give no gradient), and 0 at NaN.
    return tl.where(d > 0, 1.0, 0.0).to(d.dtype) - tl.where(d < 0, 1.0, 0.0).to(d.dtype)


@triton.jit
def _mgs(d, mix, MIX_MODE: tl.constexpr, CLIP: tl.constexpr):
    """``mix * d' + (1 - mix) * sign(d)`` with ``d' = clamp(d, -1, 1)`` if CLIP else ``d``.

    ``d`` is a difference ``x - w`` (or ``w - x``) formed in ``ACC``: exact
    up to one rounding whatever the magnitude of x and w, so no term cancels
    (the weight gradient at mix = 1 is never ``g^T x - w * sum(g)``).  NaN
    and +-inf follow torch (the reference kernel): ``clamp`` keeps a NaN
    (``propagate_nan``; the default min/max would turn it into -1 or 1 on the
    GPU), ``sign(NaN) = 0``, ``clamp(+-inf) = +-1``.
    """
    if MIX_MODE == 0:
        out = _sign(d)
    else:
        if CLIP:
            full = tl.clamp(d, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
        else:
            full = d
        if MIX_MODE == 1:
            out = full
        else:
            out = mix * full + (1.0 - mix) * _sign(d)
    return out


@triton.jit
def linear_fwd(
    x_ptr, wt_ptr, b_ptr, y_ptr,
    N, M, K, ROWS_CLASS,
    stride_xn: tl.constexpr, stride_xk, stride_wk, stride_wm, stride_yn, stride_ym,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, TN: tl.constexpr, TM: tl.constexpr, UNROLL: tl.constexpr,
):
    """``wt`` is the weight transposed, ``[K, M]``: a step loads ``TM`` consecutive filters."""
    rn = _rows(tl.program_id(0) * BLOCK_N, BLOCK_N, TN)
    rm = _cols(tl.program_id(1) * BLOCK_M, BLOCK_M, TM)
    # Out-of-range rows/filters wrap onto valid ones, so the loads in the hot
    # loop need no mask; their results are never stored.
    x_ptrs = x_ptr + (rn % N).to(tl.int64) * stride_xn
    w_ptrs = wt_ptr + (rm % M) * stride_wm
    acc = tl.zeros((TN, TM, BLOCK_N // TN, BLOCK_M // TM), dtype=ACC)
    for _ in tl.range(0, K, loop_unroll_factor=UNROLL):
        xk = tl.load(x_ptrs).to(ACC)
        wk = tl.load(w_ptrs).to(ACC)
        acc += tl.abs(xk - wk)
        x_ptrs += stride_xk
        w_ptrs += stride_wk
    y = -acc
    if HAS_BIAS:
        y += tl.load(b_ptr + (rm % M)).to(ACC)
    y_ptrs = y_ptr + rn.to(tl.int64) * stride_yn + rm * stride_ym
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rn < N) & (rm < M))


@triton.jit
def conv3d_fwd(
    x_ptr, w_ptr, b_ptr, y_ptr,
    P, Mg, Cg, ROWS_CLASS,
    D, H, W, OD, OH, OW,
    KD, KH, KW,
    sd, sh, sw, pd, ph, pw, dd, dh, dw,
    stride_xb, stride_xc, stride_xd, stride_xh, stride_xw,
    stride_yb, stride_ym,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, TP: tl.constexpr,
):
    """Implicit-GEMM l1 conv3d.

    ``w`` is packed as ``[G, Cg*KD*KH*KW, Mg]`` (contiguous) so that a step
    loads ``TM`` consecutive filters; ``y`` is N M OD OH OW with contiguous
    spatial dims.  Grid axis 1 enumerates (group, filter tile).

    Layout: output positions go across threads (``TP`` per thread) and every
    thread holds all ``BLOCK_M`` filters, so the long row-index arithmetic
    (position -> input address) keeps the layout of the accumulator and the
    input loads are coalesced (consecutive positions, consecutive lanes),
    while each step's filter values are one broadcast vector load.  The 4-D
    tiling of ``linear_fwd`` compiled here to one load per element.
    """
    M_TILES = tl.cdiv(Mg, BLOCK_M)
    grp = tl.program_id(1) // M_TILES
    rp = _rows_across_threads(tl.program_id(0) * BLOCK_P, BLOCK_P, TP)
    rm = _cols_in_thread((tl.program_id(1) % M_TILES) * BLOCK_M, BLOCK_M)
    rm_safe = rm % Mg
    # Output position -> (batch, od, oh, ow), once per program.
    p = rp % P
    ow = p % OW
    t = p // OW
    oh = t % OH
    t = t // OH
    od = t % OD
    b = t // OD
    id0 = od * sd - pd
    ih0 = oh * sh - ph
    iw0 = ow * sw - pw
    x_img = x_ptr + b.to(tl.int64) * stride_xb + (grp * Cg).to(tl.int64) * stride_xc
    w_grp = w_ptr + grp.to(tl.int64) * Cg * KD * KH * KW * Mg + rm_safe
    acc = tl.zeros((TP, BLOCK_M, BLOCK_P // TP), dtype=ACC)
    for c in range(Cg):
        x_chan = x_img + c * stride_xc
        for kd in range(KD):
            i_d = id0 + kd * dd
            ok_d = (i_d >= 0) & (i_d < D)
            for kh in range(KH):
                i_h = ih0 + kh * dh
                ok_h = ok_d & (i_h >= 0) & (i_h < H)
                x_line = x_chan + i_d * stride_xd + i_h * stride_xh
                # Reduction index of (c, kd, kh, 0) in the packed weight.
                w_line = w_grp + ((c * KD + kd) * KH + kh) * KW * Mg
                for kw in range(KW):
                    i_w = iw0 + kw * dw
                    ok = ok_h & (i_w >= 0) & (i_w < W)
                    # Zero padding: a padded tap contributes |0 - w|.
                    xv = tl.load(x_line + i_w * stride_xw, mask=ok, other=0.0).to(ACC)
                    wv = tl.load(w_line + kw * Mg).to(ACC)
                    acc += tl.abs(xv - wv)
    y = -acc
    if HAS_BIAS:
        y += tl.load(b_ptr + grp * Mg + rm_safe).to(ACC)
    o = p - b * (OD * OH * OW)
    y_ptrs = y_ptr + b.to(tl.int64) * stride_yb + (grp * Mg + rm).to(tl.int64) * stride_ym + o
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rp < P) & (rm < Mg))


# The loop-invariant operand tile (x for grad_x, w for grad_w) is read with a
# stride the compiler may not specialise: if it knows the stride is 1 it gives
# that load a vectorised layout of its own and converts the product through
# shared memory on every reduction step (seen in the sm_90 SASS: STSM/LDS/BAR
# in the loop); unknown, the load takes the accumulator's layout.
@triton.jit(do_not_specialize=["stride_xk"])
def linear_grad_x(
    g_ptr, x_ptr, w_ptr, gx_ptr,
    N, M, K, ROWS_CLASS, mix,
    stride_gn: tl.constexpr, stride_gm, stride_xn, stride_xk, stride_wm, stride_wk, stride_gxn, stride_gxk,
    MIX_MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TN: tl.constexpr, UNROLL: tl.constexpr,
):
    """Rows of ``x`` across threads (``TN`` each), the ``BLOCK_K`` columns in every thread."""
    rn = _rows_across_threads(tl.program_id(0) * BLOCK_N, BLOCK_N, TN)
    rk = _cols_in_thread(tl.program_id(1) * BLOCK_K, BLOCK_K)
    rn_safe = (rn % N).to(tl.int64)
    rk_safe = rk % K
    x = tl.load(x_ptr + rn_safe * stride_xn + rk_safe * stride_xk).to(ACC)
    g_ptrs = g_ptr + rn_safe * stride_gn
    w_ptrs = w_ptr + rk_safe * stride_wk
    acc = tl.zeros((TN, BLOCK_K, BLOCK_N // TN), dtype=ACC)
    for _ in tl.range(0, M, loop_unroll_factor=UNROLL):
        gm = tl.load(g_ptrs).to(ACC)
        wm = tl.load(w_ptrs).to(ACC)
        acc += gm * _mgs(wm - x, mix, MIX_MODE, True)
        g_ptrs += stride_gm
        w_ptrs += stride_wm
    gx_ptrs = gx_ptr + rn.to(tl.int64) * stride_gxn + rk * stride_gxk
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=(rn < N) & (rk < K))


@triton.jit(do_not_specialize=["stride_wk"])
def linear_grad_w(
    g_ptr, x_ptr, w_ptr, part_ptr,
    N, M, K, ROWS_PER_SPLIT, ROWS_CLASS, mix,
    stride_gn, stride_gm, stride_xn, stride_xk, stride_wm, stride_wk,
    MIX_MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TM: tl.constexpr, UNROLL: tl.constexpr,
):
    """One partial sum ``part[split, m, k]`` over rows ``[split * R, (split + 1) * R)``.

    Filters across threads (``TM`` each; a step's gradient row is one
    coalesced load), the ``BLOCK_K`` columns in every thread (a step's input
    row is one broadcast load).
    """
    K_TILES = tl.cdiv(K, BLOCK_K)
    split = tl.program_id(1)
    rm = _rows_across_threads((tl.program_id(0) // K_TILES) * BLOCK_M, BLOCK_M, TM)
    rk = _cols_in_thread((tl.program_id(0) % K_TILES) * BLOCK_K, BLOCK_K)
    rm_safe = rm % M
    rk_safe = rk % K
    w = tl.load(w_ptr + rm_safe * stride_wm + rk_safe * stride_wk).to(ACC)
    n0 = split * ROWS_PER_SPLIT
    n1 = tl.minimum(n0 + ROWS_PER_SPLIT, N)
    g_ptrs = g_ptr + n0.to(tl.int64) * stride_gn + rm_safe * stride_gm
    x_ptrs = x_ptr + n0.to(tl.int64) * stride_xn + rk_safe * stride_xk
    acc = tl.zeros((TM, BLOCK_K, BLOCK_M // TM), dtype=ACC)
    for _ in tl.range(n0, n1, loop_unroll_factor=UNROLL):
        gn = tl.load(g_ptrs).to(ACC)
        xn = tl.load(x_ptrs).to(ACC)
        acc += gn * _mgs(xn - w, mix, MIX_MODE, False)
        g_ptrs += stride_gn
        x_ptrs += stride_xn
    part = part_ptr + split.to(tl.int64) * M * K + rm * K + rk
    tl.store(part, acc, mask=(rm < M) & (rk < K))
