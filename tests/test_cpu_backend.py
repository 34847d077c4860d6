"""The C++ ``cpu`` backend against the reference kernel (the oracle)."""
from __future__ import annotations

import math


import pytest
import torch

from l1fx import functional as L
from l1fx.kernels import BackendUnavailable, cpu, cpu_build, get_backend, reference

if not cpu.available()[0]:  # pragma: no cover - only on machines without a C++ compiler
    pytest.skip(f"cpu backend unavailable here: {cpu.available()[1].splitlines()[0]}", allow_module_level=True)

# Shapes: odd sizes around the register tiles (8 rows, 32 filters, 16/32 k),
# K = 1, M = 1, N = 0 and one multi-block case.
SHAPES = [(1, 1, 1), (7, 3, 5), (37, 9, 64), (65, 33, 70), (300, 1, 17), (0, 4, 3), (19, 64, 1), (1030, 20, 33)]
MIXES = [0.0, 0.5, 1.0]


def _tol(dtype, k):
    # float32: a few ulps of a K-term sum; bfloat16: its own rounding of the result.
    return dict(atol=1e-5 * max(k, 1), rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2 * max(k, 1), rtol=1e-2)


def _data(n, k, m, dtype):
    return torch.randn(n, k).to(dtype), torch.randn(m, k).to(dtype), torch.randn(m).to(dtype), torch.randn(n, m).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", SHAPES)
def test_forward_matches_reference(n, k, m, dtype):
    x, w, b, _ = _data(n, k, m, dtype)
    for bias in (b, None):
        y = cpu.linear_forward(x, w, bias)
        assert y.dtype == dtype and y.shape == (n, m)
        torch.testing.assert_close(y.float(), reference.linear_forward(x, w, bias).float(), **_tol(dtype, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("n,k,m", SHAPES)
def test_backward_matches_reference(n, k, m, mix, dtype):
    x, w, _, g = _data(n, k, m, dtype)
    gx, gw = cpu.linear_backward(g, x, w, mix, True, True)
    rgx, rgw = reference.linear_backward(g, x, w, mix, True, True)
    assert gx.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gx.float(), rgx.float(), **_tol(dtype, m))
    torch.testing.assert_close(gw.float(), rgw.float(), **_tol(dtype, n))
    only_x = cpu.linear_backward(g, x, w, mix, True, False)
    only_w = cpu.linear_backward(g, x, w, mix, False, True)
    assert only_x[1] is None and only_w[0] is None
    torch.testing.assert_close(only_x[0], gx)
    torch.testing.assert_close(only_w[1], gw)


@pytest.mark.parametrize("mix", MIXES)
def test_ties_follow_torch_sign(mix):
    # Small integers: x == w happens often, so the sign(0) == 0 convention
    # must match the reference; sign sums of integers are exact.
    x = torch.randint(-3, 4, (50, 7)).float()
    w = torch.randint(-3, 4, (40, 7)).float()
    g = torch.randint(-2, 3, (50, 40)).float()
    assert (x[:, None] == w[None]).any()
    torch.testing.assert_close(cpu.linear_forward(x, w, None), reference.linear_forward(x, w, None))
    got = cpu.linear_backward(g, x, w, mix, True, True)
    want = reference.linear_backward(g, x, w, mix, True, True)
    for a, b in zip(got, want):
        if mix == 0.0:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


def test_data_far_from_zero_stays_accurate():
    # Data far from zero keeps float32 accuracy (the kernels form x - w itself;
    # tests/test_exactness.py checks the per-element bound at offsets up to 1e6).
    x, w = 1000 + torch.randn(200, 48), 1000 + torch.randn(24, 48)
    g = torch.randn(200, 24)
    exact = reference.linear_forward(x.double(), w.double(), None)
    torch.testing.assert_close(cpu.linear_forward(x, w, None).double(), exact, atol=2e-3, rtol=1e-5)
    gx = cpu.linear_backward(g, x, w, 1.0, True, False)[0]
    torch.testing.assert_close(gx.double(), reference.linear_backward(g.double(), x.double(), w.double(), 1.0, True, False)[0],
                               atol=1e-3, rtol=1e-5)


# K <= 16 takes the direct small-K forward (rows read straight from x, output
# tiles stored straight to y); K = 17 the packed one. Odd N leaves a partial
# row tile, M not a multiple of the vector width a partial filter panel, and
# M > 32 picks the wide tile.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", [(1, 9, 64), (1001, 9, 64), (333, 16, 70), (97, 1, 33), (45, 5, 13), (101, 17, 64)])
def test_small_k_forward_matches_reference(n, k, m, dtype):
    x, w, b, _ = _data(n, k, m, dtype)
    for bias in (b, None):
        y = cpu.linear_forward(x, w, bias)
        torch.testing.assert_close(y.float(), reference.linear_forward(x, w, bias).float(), **_tol(dtype, k))
    # Far from zero (world-frame xyz): the per-column centring must still apply.
    xf, wf = 1000 + x.double(), 1000 + w.double()
    exact = reference.linear_forward(xf, wf, None)
    got = cpu.linear_forward(xf.to(dtype), wf.to(dtype), None).double()
    want = exact if dtype == torch.float32 else reference.linear_forward(xf.to(dtype).double(), wf.to(dtype).double(), None)
    torch.testing.assert_close(got, want, atol=1e-3 if dtype == torch.float32 else 0.5, rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_thread_count_does_not_change_results():
    x, w, b, g = _data(777, 21, 45, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (cpu.linear_forward(x, w, b), *cpu.linear_backward(g, x, w, 0.5, True, True))
        torch.set_num_threads(2)
        two = (cpu.linear_forward(x, w, b), *cpu.linear_backward(g, x, w, 0.5, True, True))
    finally:
        torch.set_num_threads(before)
    for a, b_ in zip(one, two):
        torch.testing.assert_close(a, b_)


# ------------------------------------------------------------ the registry
def test_backend_env_selects(monkeypatch):
    x32, x64 = torch.randn(3, 2), torch.randn(3, 2, dtype=torch.float64)
    monkeypatch.setenv("L1FX_BACKEND", "auto")
    assert get_backend(x32).name == "cpu"
    assert get_backend(x32.bfloat16()).name == "cpu"
    assert get_backend(x64).name == "reference"  # float64 stays on the oracle
    monkeypatch.setenv("L1FX_BACKEND", "reference")
    assert get_backend(x32).name == "reference"
    monkeypatch.setenv("L1FX_BACKEND", "cpu")
    assert get_backend(x32).name == "cpu"
    with pytest.raises(BackendUnavailable, match="cpu"):
        get_backend(x64)


@pytest.mark.parametrize("mix", [0.0, 1.0])
def test_ops_and_conv_through_cpu_backend(monkeypatch, mix):
    def run(backend, fn, *tensors):
        monkeypatch.setenv("L1FX_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.backward(torch.ones_like(y) * 0.1 + torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        return [y.detach()] + [t.grad for t in leaves]

    lin = lambda x, w, b: L.l1_linear(x, w, b, mix=mix)  # noqa: E731
    lin_args = (torch.randn(2, 5, 11), torch.randn(13, 11), torch.randn(13))
    conv = lambda x, w, b: L.l1_conv3d(x, w, b, stride=(1, 2, 1), padding=1, groups=2, mix=mix)  # noqa: E731
    conv_args = (torch.randn(2, 4, 5, 6, 4), torch.randn(6, 2, 3, 2, 3), torch.randn(6))
    for fn, args in ((lin, lin_args), (conv, conv_args)):
        for got, want in zip(run("cpu", fn, *args), run("reference", fn, *args)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------ build, cache, fallback
@pytest.fixture
def fresh_cpu_state():
    cpu.reset()
    yield
    cpu.reset()  # the next test reloads the real (cached) library


def test_missing_compiler_falls_back_with_one_warning(monkeypatch, tmp_path, fresh_cpu_state):
    monkeypatch.setenv("L1FX_CACHE_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CXX", "no-such-compiler-l1fx")
    monkeypatch.setenv("L1FX_BACKEND", "auto")
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning) as record:
        assert get_backend(x).name == "reference"
        assert get_backend(x).name == "reference"  # warned once, not per call
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and "no C++ compiler" in message and "reference" in message
    # The op still works (on the reference kernel).
    w = torch.randn(2, 3)
    torch.testing.assert_close(L.l1_linear(x, w), reference.linear_forward(x, w, None))
    # Asked for by name, it raises instead of falling back.
    monkeypatch.setenv("L1FX_BACKEND", "cpu")
    with pytest.raises(BackendUnavailable, match="no C\\+\\+ compiler"):
        get_backend(x)
    with pytest.raises(BackendUnavailable):
        cpu.linear_forward(x, w, None)


def test_build_is_cached_by_source_hash(monkeypatch, tmp_path):
    # A tiny source keeps this fast; the real kernels use the same path.
    monkeypatch.setenv("L1FX_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "answer.cpp"
    src.write_text('extern "C" int answer() { return 42; }\n')
    first = cpu_build.build(src, "answer")
    mtime = first.stat().st_mtime_ns
    assert cpu_build.build(src, "answer") == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert cpu_build.load(src, "answer").answer() == 42
    src.write_text('extern "C" int answer() { return 43; }\n')
    second = cpu_build.build(src, "answer")
    assert second != first and cpu_build.load(src, "answer").answer() == 43
    # A source that does not compile reports the compiler's error on the first line.
    src.write_text("this is not C++\n")
    with pytest.raises(cpu_build.BuildError, match="could not build answer.cpp") as err:
        cpu_build.build(src, "answer")
    assert "error" in str(err.value).splitlines()[0]


# ------------------------------------------------------------ direct conv kernels
# (x shape, w shape, stride, padding, dilation, groups): 1-D/2-D/3-D, lines
# shorter and longer than a vector, padding wider than the kernel reach,
# dilation, groups, stride > 1 (forward direct, input gradient via im2col).
CONV_CASES = [
    ((2, 4, 5, 6, 21), (6, 2, 3, 2, 3), [1, 1, 1], [1, 0, 2], [1, 2, 2], 2),
    ((2, 4, 5, 6, 4), (6, 2, 3, 2, 3), [1, 2, 1], [1, 1, 1], [1, 1, 1], 2),
    ((1, 3, 9, 7), (5, 3, 3, 2), [2, 1], [0, 1], [2, 1], 1),
    ((1, 3, 6, 19), (9, 3, 3, 3), [1, 1], [3, 3], [1, 1], 1),
    ((2, 4, 11), (8, 2, 3), [1], [2], [2], 2),
    ((1, 11, 7, 19), (9, 11, 1, 1), [1, 1], [0, 0], [1, 1], 1),
    ((1, 9, 4, 5, 18), (10, 9, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES)
def test_direct_conv_matches_reference(case, dtype):
    from l1fx.kernels import conv

    xs, ws, stride, padding, dilation, groups = case
    torch.manual_seed(1)
    x, w, b = torch.randn(xs).to(dtype), torch.randn(ws).to(dtype), torch.randn(ws[0]).to(dtype)
    args = (stride, padding, dilation, groups)
    ref = reference.BACKEND
    want = conv.conv_forward(ref, x, w, b, *args)
    tol = _tol(dtype, w[0].numel())
    torch.testing.assert_close(cpu.conv_forward(x, w, b, *args).float(), want.float(), **tol)
    g = torch.randn(want.shape).to(dtype)
    for mix in MIXES:
        got = cpu.conv_backward(g, x, w, *args, mix, True, True)
        exp = conv.conv_backward(ref, g, x, w, *args, mix, True, True)
        for a, e, n in zip(got, exp, (ws[0] // groups * w[0, 0].numel(), g[:, 0].numel())):
            assert a.dtype == dtype and a.shape == e.shape
            torch.testing.assert_close(a.float(), e.float(), **_tol(dtype, n))
        only_x, none_w = cpu.conv_backward(g, x, w, *args, mix, True, False)
        assert none_w is None
        torch.testing.assert_close(only_x, got[0])


# The row-tile forward kernel (line buffers; stride 1 along the last axis, a
# large enough output) next to the packed one: 3-D with stride/dilation/groups
# on the other axes, a row-tiled plane (rows tile with a short last tile), 2-D,
# 1-D, a partly used last vector. Run with 2 threads so the choice of kernel
# (which depends on the thread count) is the one asserted.
ROW_CASES = [
    ((2, 3, 5, 6, 16), (24, 3, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], 1),
    ((2, 4, 7, 9, 30), (32, 2, 3, 2, 3), [2, 2, 1], [1, 0, 1], [1, 2, 1], 2),
    ((1, 16, 3, 37, 16), (16, 16, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], 1),
    ((1, 5, 12, 16), (40, 5, 3, 3), [1, 1], [1, 1], [1, 1], 1),
    ((2, 6, 64), (48, 6, 5), [1], [2], [1], 1),
    ((1, 3, 4, 26), (40, 3, 1, 3), [1, 1], [0, 2], [1, 2], 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ROW_CASES)
def test_row_tile_conv_forward_matches_reference(case, dtype):
    from l1fx.kernels import conv

    xs, ws, stride, padding, dilation, groups = case
    torch.manual_seed(2)
    x, w, b = torch.randn(xs).to(dtype), torch.randn(ws).to(dtype), torch.randn(ws[0]).to(dtype)
    args = (stride, padding, dilation, groups)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu.conv_forward_kernel(x, w, *args) == "rows"
        got = cpu.conv_forward(x, w, b, *args)
    finally:
        torch.set_num_threads(before)
    want = conv.conv_forward(reference.BACKEND, x, w, b, *args)
    torch.testing.assert_close(got.float(), want.float(), **_tol(dtype, w[0].numel()))


# The packed forward kernel (patches packed a slice of channels at a time by
# the vector packer, sums carried between slices): stride 2 along the line
# (the permute path) with short lines (a vector spans several output lines),
# stride 3 (the scalar path), dilation and padding at the borders, groups,
# more channels than one slice (9 and 40 channels at kvol 27 / 3: several
# slices), a filter count that leaves a partial filter block, 2-D and 1-D.
PACKED_CASES = [
    ((2, 32, 16, 16, 16), (32, 32, 3, 3, 3), [2, 2, 2], [1, 1, 1], [1, 1, 1], 1),
    ((1, 9, 7, 9, 11), (7, 9, 3, 3, 3), [1, 2, 2], [1, 0, 2], [1, 1, 2], 1),
    ((2, 6, 5, 8, 13), (10, 3, 2, 3, 3), [2, 1, 3], [0, 1, 1], [1, 1, 1], 2),
    ((1, 4, 6, 6, 16), (8, 4, 3, 3, 3), [1, 1, 2], [1, 1, 1], [1, 1, 1], 1),
    ((3, 40, 9, 7), (5, 40, 1, 3), [1, 2], [0, 1], [1, 1], 1),
    ((2, 3, 41), (6, 3, 4), [2], [3], [2], 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_conv_forward_matches_reference(case, dtype):
    from l1fx.kernels import conv

    xs, ws, stride, padding, dilation, groups = case
    torch.manual_seed(3)
    x, w, b = torch.randn(xs).to(dtype), torch.randn(ws).to(dtype), torch.randn(ws[0]).to(dtype)
    x.view(-1)[::7] += 1000.0  # offset data: every summand must come from fl(x - w)
    args = (stride, padding, dilation, groups)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu.conv_forward_kernel(x, w, *args) == "packed"
        got = cpu.conv_forward(x, w, b, *args)
    finally:
        torch.set_num_threads(before)
    want = conv.conv_forward(reference.BACKEND, x.double(), w.double(), b.double(), *args)
    torch.testing.assert_close(got.double(), want, **_tol(dtype, w[0].numel()))


# The pointwise forward kernel (kernel 1, stride 1, no padding: PointNet's
# shared MLPs, 1x1x1 layers): point counts that leave a short last panel (1000,
# 37: vectors past the positions), fewer filters than one register block (5)
# and counts that leave a partial block (50, 7), K = 3 (the first layer) and
# K = 368 (PointNet's head), groups, a dilation that does not matter, 2-D and
# 3-D. Data at an offset of 1e4 and a far outlier: every summand must come from
# fl(x - w) itself.
POINTWISE_CASES = [
    ((2, 3, 1000), (50, 3, 1), [1], [0], [1], 1),
    ((1, 368, 37), (7, 368, 1), [1], [0], [1], 1),
    ((3, 12, 70), (9, 4, 1), [1], [0], [3], 3),
    ((2, 6, 5, 9), (5, 6, 1, 1), [1, 1], [0, 0], [1, 1], 1),
    ((2, 48, 4, 5, 6), (16, 48, 1, 1, 1), [1, 1, 1], [0, 0, 0], [1, 1, 1], 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", POINTWISE_CASES)
def test_pointwise_conv_forward_matches_reference(case, dtype):
    from l1fx.kernels import conv

    xs, ws, stride, padding, dilation, groups = case
    torch.manual_seed(4)
    x, w, b = torch.randn(xs) + 1e4, torch.randn(ws) + 1e4, torch.randn(ws[0])
    x.view(-1)[::11] -= 3e5
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    args = (stride, padding, dilation, groups)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert cpu.conv_forward_kernel(x, w, *args) == "pointwise"
            got = cpu.conv_forward(x, w, b, *args)
            want = conv.conv_forward(reference.BACKEND, x.double(), w.double(), b.double(), *args)
            # float32: (K + 2) eps of the sum of |terms| (~1e4 K at this offset) plus the bias.
            k = w[0].numel()
            bound = (k + 2) * 2.0 ** -24 * (want.abs() + 2.0 * 3e5 * k) + 1e-6
            if dtype == torch.float32:
                assert ((got.double() - want).abs() <= bound).all(), f"{case} with {threads} threads"
            else:
                torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0.0)
    finally:
        torch.set_num_threads(before)


def test_pointwise_conv_forward_nonfinite_like_reference():
    from l1fx.kernels import conv

    torch.manual_seed(5)
    x, w = torch.randn(2, 20, 70) + 50, torch.randn(13, 20, 1) + 50
    x[1, 3, 65] = -math.inf  # in the short last panel
    x[0, 7, 2] = math.inf
    w[4, 9, 0] = math.nan
    w[11, 7, 0] = math.inf  # inf - inf = NaN at x[0, 7, 2] for filter 11
    args = ([1], [0], [1], 1)
    assert cpu.conv_forward_kernel(x, w, *args) == "pointwise"
    got = cpu.conv_forward(x, w, None, *args)
    want = conv.conv_forward(reference.BACKEND, x, w, None, *args)
    # A NaN filter poisons its outputs, inf - inf is NaN, an infinite input gives -inf (y = -sum |x - w|).
    assert got[:, 4].isnan().all() and got[0, 11, 2].isnan()
    assert (got[1, [m for m in range(13) if m != 4], 65] == -math.inf).all() and got[0, 0, 2] == -math.inf
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got == math.inf, want == math.inf) and torch.equal(got == -math.inf, want == -math.inf)
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-3)


def test_conv_forward_kernel_choice():
    # Stride 2 along the line, or few outputs next to the line buffers: packed.
    x, w = torch.randn(1, 4, 6, 6, 16), torch.randn(8, 4, 3, 3, 3)
    assert cpu.conv_forward_kernel(x, w, [1, 1, 2], [1, 1, 1], [1, 1, 1], 1) == "packed"
    assert cpu.conv_forward_kernel(x[:, :, :1, :1], w[:1], [1, 1, 1], [1, 1, 1], [1, 1, 1], 1) == "packed"
    assert cpu.conv_forward_kernel(x, torch.randn(64, 4, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], 1) == "rows"
    # Kernel 1 with stride 1 and no padding: pointwise; with padding or stride 2 it is not.
    w1 = torch.randn(8, 4, 1, 1, 1)
    assert cpu.conv_forward_kernel(x, w1, [1, 1, 1], [0, 0, 0], [1, 1, 1], 1) == "pointwise"
    assert cpu.conv_forward_kernel(x, w1, [1, 1, 1], [0, 0, 1], [1, 1, 1], 1) != "pointwise"
    assert cpu.conv_forward_kernel(x, w1, [1, 2, 1], [0, 0, 0], [1, 1, 1], 1) != "pointwise"


def test_kernel_return_codes_raise_real_exceptions():
    # Not an assert (python -O removes those): a failing C call raises KernelError.
    from l1fx.errors import KernelError

    cpu._check_rc(0, "l1fx_forward")
    with pytest.raises(KernelError, match="l1fx_forward failed with code 1"):
        cpu._check_rc(1, "l1fx_forward")
    # And a real call into the library with an unknown dtype code returns non-zero.
    lib = cpu._lib()
    x = torch.zeros(2, 3)
    rc = lib.l1fx_forward(7, cpu._ptr(x), cpu._ptr(x), None, cpu._ptr(torch.empty(2, 2)), 2, 3, 2, 1)
    assert rc != 0


@pytest.mark.parametrize("mix", MIXES)
def test_conv_backward_takes_expanded_grad(mix):
    # autograd hands an expanded (stride-0) gradient for y.sum(): the direct kernels must not read it raw.
    torch.manual_seed(3)
    x, w = torch.randn(2, 4, 5, 6, 5), torch.randn(3, 4, 3, 3, 3)
    args = ((1, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    y = cpu.conv_forward(x, w, None, *args)
    g = torch.ones(()).expand(y.shape)
    got = cpu.conv_backward(g, x, w, *args, mix, True, True)
    want = cpu.conv_backward(g.contiguous(), x, w, *args, mix, True, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape,kernel,stride", [((4, 35, 64, 16), (1, 1), (1, 1)), ((2, 6, 9, 8, 7), (3, 3, 3), (2, 2, 2))])
def test_conv_weight_grad_is_the_same_on_every_run(shape, kernel, stride):
    """Same inputs and thread count, the same bits: the weight gradient's sums do not depend on which
    thread took which part (they did: per-thread sums over dynamically handed-out tiles)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(7, shape[1], *kernel, generator=g)
    nd = len(kernel)
    out = [(s - k) // st + 1 for s, k, st in zip(shape[2:], kernel, stride)]
    grad = torch.randn(shape[0], 7, *out, generator=g)
    args = (stride, (0,) * nd, (1,) * nd, 1)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [cpu.conv_backward(grad, x, w, *args, 0.5, False, True)[1] for _ in range(8)]
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
