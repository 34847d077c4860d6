"""The AVX-512BW hot path of the int8 linear kernel: full 12-row x 16-filter float tiles and streamed
(non-temporal) output lines. Every way through it gives the reference's bits: edges (rows not a multiple of
12 or of the 48-row panel, filters not a multiple of 16), NaN rows in the first and later tiles and panels,
streamed or plain stores, one or two threads, float or code input.
"""
import ctypes

import pytest
import torch

from l1fx.kernels import int8_cpu as C
from l1fx.kernels import int8_reference as R

S, Z = 0.041, 97


def _rows(n, k, g):
    x = torch.randn(n, k, generator=g) * 3 + 0.5
    x[0, 0] = 1e30  # saturates at 255
    x[-1, k - 1] = -float("inf")  # saturates at 0
    for r in (1, 13, 50, n - 2):  # NaN in the first tile, the second, the next panel, the last row tile
        if 0 <= r < n:
            x[r, r % k] = float("nan")
    return x


def _same(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5))


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield lambda t: torch.set_num_threads(t)
    torch.set_num_threads(old)


@pytest.mark.parametrize("n,k,m", [(101, 64, 128), (12, 8, 16), (49, 13, 48), (150, 256, 40), (7, 300, 24),
                                   (97, 1, 32), (61, 70, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_bit_identical_to_reference(n, k, m, bias, threads):
    g = torch.Generator().manual_seed(n * 1000 + k)
    x = _rows(n, k, g)
    qw = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    b = torch.randn(m, generator=g) if bias else None
    want = R.linear(x, qw, S, Z, b)
    assert bool(torch.isnan(want[1]).all())
    packed = R.pack_weight(qw)
    codes = R.quantize_codes(x.nan_to_num(0.0), S, Z)  # the uint8 input mode (no NaN there)
    want_codes = R.dequantize(R.linear_codes(codes, qw), S, b)
    for t in (1, 2):
        threads(t)
        for stream in (None, False, True):
            _same(C.linear(x, packed, m, S, Z, b, stream=stream), want)
            _same(C.linear(codes, packed, m, S, Z, b, stream=stream), want_codes)


def test_large_output_is_streamed_and_exact(threads):
    # 24576 x 128 float32 = 12 MiB: the size from which stream=None streams (STREAM_BYTES)
    g = torch.Generator().manual_seed(3)
    x = _rows(24576, 8, g)
    qw = torch.randint(0, 256, (128, 8), dtype=torch.uint8, generator=g)
    b = torch.randn(128, generator=g)
    want = R.linear(x, qw, S, Z, b)
    packed = R.pack_weight(qw)
    for t in (1, 2):
        threads(t)
        _same(C.linear(x, packed, 128, S, Z, b), want)


def test_misaligned_output_falls_back_to_plain_stores():
    # Streaming stores need 64-byte aligned lines: a y that is not aligned (a view 4 bytes in) must still get
    # the right values (with stream=1 asked for), not a fault.
    g = torch.Generator().manual_seed(4)
    n, k, m = 60, 64, 32
    x = _rows(n, k, g)
    qw = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    want = R.linear(x, qw, S, Z, None)
    packed = R.pack_weight(qw)
    buf = torch.full((n * m + 1,), 7.0)
    y = buf[1:]
    assert y.data_ptr() % 64 != 0
    rc = C._lib().l1fx_i8_linear(0, ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(packed.data_ptr()), n, k, m, S, Z,
                                 0, S, None, ctypes.c_void_p(y.data_ptr()), 2, 1, 1)
    assert rc == 0 and buf[0] == 7.0
    _same(y.view(n, m), want)


@pytest.mark.parametrize("m", [4, 16, 20, 70, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_channels_first_tiles_bit_identical_to_reference(m, bias, threads):
    # l1fx_i8_pointwise_cf: 12-, 8- and 4-filter float tiles over 16 real positions, the generic tiles for the
    # rest (filters left over, the positions of a chunk's last partial tile), vectorised position packing.
    if C.build_info()["isa"] != "avx512bw":  # (a failed build is an error here, not a skip)
        pytest.skip("the channels-first mode needs an AVX-512BW build")
    g = torch.Generator().manual_seed(m)
    n, k, l = 2, 37, 300  # K not a multiple of 8, L: a full 256-position chunk and a partial one
    x = torch.randn(n, k, l, generator=g) * 3 + 0.5
    x[0, 3, 17] = float("nan")  # inside a full tile
    x[1, 36, 299] = float("nan")  # the last position (generic edge), the last channel
    x[1, 0, 40] = 1e30
    x[0, 5, 260] = -float("inf")
    qw = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    rows_w = torch.nn.functional.pad(qw, (0, -k % 8))
    b = torch.randn(m, generator=g) if bias else None
    want = R.linear(x.transpose(1, 2).reshape(-1, k), qw, S, Z, b).reshape(n, l, m).transpose(1, 2)
    assert bool(torch.isnan(want[0, :, 17]).all()) and bool(torch.isnan(want[1, :, 299]).all())
    for t in (1, 2):
        threads(t)
        _same(C.pointwise_channels_first(x, rows_w, S, Z, b), want)
