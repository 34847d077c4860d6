"""Triton int8 ℓ1 linear kernel: packed absolute differences (PTX ``vabsdiff4``) on CUDA.

``y[n, m] = bias[m] + -(scale * sum_k |qx[n, k] - qw[m, k]|)`` on uint8 codes,
the int8 layers' formula (docs/int8.md). The codes travel as int32 words of 4
bytes (K zero padded to a multiple of 4: ``|0 - 0| = 0``); one output tile per
program, int32 accumulators (exact: 255 K < 2^31 for K <= 8,421,504, checked).

* ``USE_PTX=True`` (CUDA): one ``vabsdiff4.u32.u32.u32.add`` per word pair —
  four byte |differences| summed into the accumulator in one instruction,
  through ``tl.inline_asm_elementwise``.
* ``USE_PTX=False``: the same sum unpacked byte by byte in portable Triton —
  what the interpreter (``TRITON_INTERPRET=1``) can run, and what the PTX path
  is checked against on a GPU.

Status: the portable path is tested under the interpreter against the torch
reference (tests/test_int8_triton.py). The PTX path and any speed comparison
with the fp32 Triton ℓ1 kernel were **not run**: no CUDA machine was lent to
the session that wrote this, and the interpreter cannot execute inline PTX.
Not wired into the int8 layers (they run on CPU tensors).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

from .int8_reference import INT32_MAX_K


def pack_words(codes: Tensor) -> Tensor:
    """uint8 ``[R, K]`` -> int32 ``[R, ceil(K/4)]`` (little-endian words of 4 codes, zero padded)."""
    r, k = codes.shape
    k4 = -(-k // 4) * 4
    padded = torch.zeros(r, k4, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    return padded.view(torch.int32)


if triton is not None:
    @triton.jit
    def _int8_l1_fwd(X, W, B, Y, N, M, KW, scale, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
                     BN: tl.constexpr, BM: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        acc = tl.zeros((BN, BM), dtype=tl.int32)
        for k in range(0, KW):
            xw = tl.load(X + rn * KW + k, mask=rn < N, other=0)
            ww = tl.load(W + rm * KW + k, mask=rm < M, other=0)
            xb = tl.broadcast_to(xw[:, None], (BN, BM))
            wb = tl.broadcast_to(ww[None, :], (BN, BM))
            if USE_PTX:
                acc = tl.inline_asm_elementwise("vabsdiff4.u32.u32.u32.add $0, $1, $2, $3;", "=r,r,r,r",
                                                [xb, wb, acc], dtype=tl.int32, is_pure=True, pack=1)
            else:
                for byte in tl.static_range(4):
                    a = (xb >> (8 * byte)) & 255
                    b = (wb >> (8 * byte)) & 255
                    d = a - b
                    acc += tl.where(d < 0, -d, d)
        y = -(acc.to(tl.float32) * scale)
        if HAS_BIAS:
            y = tl.load(B + rm, mask=rm < M, other=0.0)[None, :] + y
        tl.store(Y + rn[:, None] * M + rm[None, :], y, mask=(rn[:, None] < N) & (rm[None, :] < M))


def linear(qx: Tensor, qw: Tensor, scale: float, bias: Optional[Tensor], *, use_ptx: Optional[bool] = None,
           block: tuple[int, int] = (32, 32)) -> Tensor:
    """float32 ``[N, M]`` of uint8 codes ``qx [N, K]``, ``qw [M, K]`` (same grid ``scale``)."""
    if triton is None:
        from ..errors import BackendUnavailable

        raise BackendUnavailable("the Triton int8 kernel needs triton (pip install 'l1fx[triton]')")
    n, k = qx.shape
    m = qw.shape[0]
    if k > INT32_MAX_K:
        raise ValueError(f"triton int8 kernel: K = {k} could overflow its int32 accumulators (max {INT32_MAX_K})")
    if use_ptx is None:
        use_ptx = qx.is_cuda
    xw, ww = pack_words(qx), pack_words(qw)
    y = torch.empty(n, m, dtype=torch.float32, device=qx.device)
    b = bias.to(torch.float32).contiguous() if bias is not None else y
    grid = (triton.cdiv(n, block[0]), triton.cdiv(m, block[1]))
    _int8_l1_fwd[grid](xw, ww, b, y, n, m, xw.shape[1], float(scale), HAS_BIAS=bias is not None,
                       USE_PTX=bool(use_ptx), BN=block[0], BM=block[1])
    return y
