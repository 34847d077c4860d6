"""The Triton backend against the reference oracle.

Without a GPU the kernels run on CPU tensors through Triton's interpreter.
``TRITON_INTERPRET=1`` must be set before triton is first imported in a
process (Triton builds its own library kernels at import), and other tests in
the same xdist worker may import triton earlier or must not see the variable.
So the ``interp_*`` functions below run in a child pytest started by
``test_interpreter_*`` with ``TRITON_INTERPRET=1``; the parent only collects
``test_*``.  The interpreter is slow: shapes stay tiny.  ``test_gpu_*`` need
CUDA and skip without it (they cannot run anywhere else): `make test-gpu`.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from l1fx import functional as L1F
from l1fx.kernels import BackendUnavailable, conv as conv_lowering, get_backend, reference
from l1fx.kernels import triton_backend as tb

HAS_TRITON = tb._triton_installed()
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'l1fx[triton]')")
gpu = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs triton and a CUDA GPU; run `make test-gpu` on one")

# Tolerances against the reference (both accumulate in float32 and round once,
# so 16-bit outputs may differ by an ulp or two of the output).
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2 ** -6, atol=2 ** -6),
    torch.float16: dict(rtol=2 ** -9, atol=2 ** -9),
}


def close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


@pytest.fixture
def interpret(monkeypatch):
    assert tb.interpreting(), "interp_* tests run in the child started by test_interpreter_*"
    monkeypatch.setenv("L1FX_BACKEND", "triton")


def run_interpreter_tests(selection: str) -> None:
    """Run the ``interp_*`` tests matching ``selection`` in a fresh interpreter process."""
    env = {k: v for k, v in os.environ.items() if k not in ("L1FX_BACKEND", "PYTEST_XDIST_WORKER")}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "python_functions=interp_*", "-k", selection, __file__]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


@needs_triton
def test_interpreter_linear():
    run_interpreter_tests("linear")


@needs_triton
def test_interpreter_conv():
    run_interpreter_tests("conv")


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)


# ------------------------------------------------------------------ availability and dispatch

def test_imports_and_explains_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import os; os.environ['L1FX_BACKEND'] = 'triton'\n"
        "import torch\n"
        "from l1fx.kernels import registered_backends, get_backend, BackendUnavailable\n"
        "from l1fx.kernels import triton_backend as tb\n"
        "tb._triton_installed = lambda: False\n"
        "b = registered_backends()['triton']\n"
        "ok, why = b.available(); assert not ok and 'triton is not installed' in why, why\n"
        "try:\n"
        "    get_backend(torch.zeros(1))\n"
        "except BackendUnavailable as e:\n"
        "    assert 'triton' in str(e) and 'not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no BackendUnavailable')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given on machines without a GPU")
def test_forced_without_gpu_raises_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("L1FX_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="triton") as info:
        L1F.l1_linear(rand(3, 4), rand(2, 4))
    if HAS_TRITON:
        assert "no CUDA device" in str(info.value) and "TRITON_INTERPRET=1" in str(info.value)


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("L1FX_BACKEND", raising=False)
    assert get_backend(rand(2, 3)).name != "triton"
    assert not tb.BACKEND.supports(rand(2, 3))
    assert not tb.BACKEND.supports(torch.zeros(2, dtype=torch.int64))


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        tb.linear_forward(rand(2, 3), rand(4, 3), None)


# ------------------------------------------------------------------ interpreter: linear core

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,m,k,bias", [(37, 20, 9, True), (5, 3, 1, False), (16, 16, 16, True)])
def interp_linear_forward_matches_reference(interpret, dtype, n, m, k, bias):
    x, w = rand(n, k, dtype=dtype), rand(m, k, dtype=dtype)
    b = rand(m, dtype=dtype) if bias else None
    close(tb.linear_forward(x, w, b), reference.linear_forward(x, w, b), dtype)


def interp_linear_forward_strided_input_and_empty(interpret):
    x = rand(9, 21)[:, ::3]  # non-contiguous columns
    w = rand(5, 7)
    close(tb.linear_forward(x, w, None), reference.linear_forward(x, w, None), torch.float32)
    assert tb.linear_forward(rand(0, 7), w, None).shape == (0, 5)
    zero_k = tb.linear_forward(rand(3, 0), rand(4, 0), torch.arange(4.0))
    assert torch.equal(zero_k, torch.arange(4.0).expand(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def interp_linear_backward_matches_reference(interpret, dtype, mix):
    n, m, k = 37, 20, 9  # odd sizes: partial tiles in every dim; n splits the weight gradient
    g, x, w = rand(n, m, dtype=dtype), rand(n, k, dtype=dtype), rand(m, k, dtype=dtype)
    gx, gw = tb.linear_backward(g, x, w, mix, True, True)
    rx, rw = reference.linear_backward(g, x, w, mix, True, True)
    close(gx, rx, dtype)
    close(gw, rw, dtype)


def interp_linear_backward_partial_requests_k1_and_ties(interpret):
    g, x, w = rand(6, 4), rand(6, 1), rand(4, 1)
    x[0, 0] = w[1, 0]  # an exact tie: sign(0) = 0, HardTanh(0) = 0
    for mix in (0.0, 0.5):
        gx, gw = tb.linear_backward(g, x, w, mix, True, False)
        assert gw is None
        close(gx, reference.linear_backward(g, x, w, mix, True, False)[0], torch.float32)
        gx, gw = tb.linear_backward(g, x, w, mix, False, True)
        assert gx is None
        close(gw, reference.linear_backward(g, x, w, mix, False, True)[1], torch.float32)
    assert tb.linear_backward(g, x, w, 1.0, False, False) == (None, None)


def interp_linear_weight_gradient_split_is_exercised(interpret):
    # 37 rows with the interpreter's 8-row minimum give several partial sums.
    assert tb._grad_w_splits(37, 20, 9, rand(1)) > 1


# ------------------------------------------------------------------ interpreter: precision, non-finite, zero sizes

# The bound every backend is held to (docs/triton.md): each output within about
# K * eps of the float64 brute force, relative to the sum of the magnitudes of
# its terms (|y| itself for the forward), plus the output's own rounding;
# whatever the offset and spread of the data.
# bfloat16 results: one ulp (2^-7), not half, because Triton's interpreter
# truncates float32 -> bfloat16 where the GPU's cvt.rn rounds to nearest.
UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -24, torch.float64: 2.0 ** -53}  # accumulation
OUT_UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -7, torch.float64: 2.0 ** -53}  # result rounding


def assert_within_bound(actual, exact, scale, terms, dtype, what):
    """``|actual - exact| <= (2 * terms * u + u_out) * scale`` per element (``scale``: sum of |terms|)."""
    bound = (2 * max(terms, 1) * UNIT[dtype] + OUT_UNIT[dtype]) * scale
    err = (actual.double() - exact).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} outputs outside the bound; worst err/bound "
        f"{float((err / bound.clamp_min(1e-300)).max()):.3g}, e.g. got {actual.double()[bad][:3].tolist()} "
        f"expected {exact[bad][:3].tolist()}"
    )


def offset_data(n, m, k, offset, spread, dtype, seed=0):
    """x, w around ``offset`` with ``spread``; filter 0 near input 0 (small outputs), filter 1 equal to input 1."""
    gen = torch.Generator().manual_seed(seed)
    x = offset + spread * torch.randn(n, k, generator=gen, dtype=torch.float64)
    w = offset + spread * torch.randn(m, k, generator=gen, dtype=torch.float64)
    w[0] = x[0] + 1e-3 * spread * torch.randn(k, generator=gen, dtype=torch.float64)
    w[1] = x[1]
    g = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), g.to(dtype)


def brute_grads(g, x, w, mix):
    """float64 MGS gradients and the sums of |terms| they are bounded by."""
    G, d = g.double(), x.double()[:, None, :] - w.double()[None]
    s = d.sign()
    tw, tx = mix * d + (1 - mix) * s, -(mix * d.clamp(-1, 1) + (1 - mix) * s)
    aw, ax = mix * d.abs() + (1 - mix) * s.abs(), mix * d.clamp(-1, 1).abs() + (1 - mix) * s.abs()
    return (torch.einsum("nm,nmk->nk", G, tx), torch.einsum("nm,nmk->nk", G.abs(), ax),
            torch.einsum("nm,nmk->mk", G, tw), torch.einsum("nm,nmk->mk", G.abs(), aw))


def check_linear_precision(dtype, offset, spread):
    n, m, k = 17, 9, 11  # two row blocks and a split weight gradient, one filter block
    x, w, g = offset_data(n, m, k, offset, spread, dtype)
    exact = -(x.double()[:, None, :] - w.double()[None]).abs().sum(-1)
    y = tb.linear_forward(x, w, None)
    assert_within_bound(y, exact, exact.abs(), k, dtype, "forward")
    assert torch.equal(y[1, 1], torch.zeros((), dtype=dtype)), "an exact match must give exactly 0"
    for mix in (0.0, 0.5, 1.0):
        gx, gw = tb.linear_backward(g, x, w, mix, True, True)
        ex, sx, ew, sw = brute_grads(g, x, w, mix)
        assert_within_bound(gx, ex, sx, m, dtype, f"input gradient, mix={mix}")
        assert_within_bound(gw, ew, sw, n, dtype, f"weight gradient, mix={mix}")


# A few random placements (the interpreter is slow) on top of the extremes.
@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.floats(-1e6, 1e6), log_spread=st.floats(-2.0, 6.0))
@example(offset=0.0, log_spread=0.0)
@example(offset=-1e6, log_spread=0.0)
@example(offset=1e6, log_spread=3.0)
@example(offset=0.0, log_spread=6.0)
def interp_linear_precision_far_from_zero(interpret, offset, log_spread):
    check_linear_precision(torch.float32, offset, 10.0 ** log_spread)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset,spread", [(-1e6, 1.0), (1e6, 1e6)])
def interp_linear_precision_far_from_zero_other_dtypes(interpret, dtype, offset, spread):
    check_linear_precision(dtype, offset, spread)


@pytest.mark.parametrize("offset,spread", [(1e6, 1.0), (-1e4, 1e4)])
def interp_conv_precision_far_from_zero(interpret, offset, spread):
    gen = torch.Generator().manual_seed(1)
    x = (offset + spread * torch.randn(2, 4, 4, 5, 6, generator=gen, dtype=torch.float64)).float()
    w = (offset + spread * torch.randn(4, 2, 3, 2, 3, generator=gen, dtype=torch.float64)).float()
    args = ([2, 1, 1], [1, 0, 2], [1, 2, 1], 2)
    y = tb.conv_forward(x, w, None, *args)
    exact = conv_lowering.conv_forward(reference.BACKEND, x.double(), w.double(), None, *args)
    assert_within_bound(y, exact, exact.abs(), 2 * 3 * 2 * 3, torch.float32, "conv forward")


def _nonfinite(t, gen, frac=0.15):
    """``t`` with a fraction of entries replaced by NaN, +inf or -inf."""
    t = t.clone()
    pick = torch.rand(t.shape, generator=gen) < frac
    kinds = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, t.shape, generator=gen)]
    t[pick] = kinds[pick].to(t.dtype)
    return t


def assert_same_nonfinite(actual, expected, what):
    """NaN and +-inf exactly where the reference has them; finite values close."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN placement differs"
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{what}: +inf placement differs"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{what}: -inf placement differs"
    fin = expected.isfinite()
    torch.testing.assert_close(actual[fin], expected[fin], rtol=1e-5, atol=1e-5, msg=what)


def interp_linear_nonfinite_as_reference(interpret):
    gen = torch.Generator().manual_seed(2)
    n, m, k = 17, 12, 5
    x, w = _nonfinite(torch.randn(n, k, generator=gen), gen), _nonfinite(torch.randn(m, k, generator=gen), gen)
    x[0] = 0.5  # a finite row and a finite filter: their output stays finite
    w[0] = -0.25
    g = torch.randn(n, m, generator=gen)
    b = _nonfinite(torch.randn(m, generator=gen), gen, frac=0.3)
    y = tb.linear_forward(x, w, b)
    assert_same_nonfinite(y, reference.linear_forward(x, w, b), "forward")
    assert y[0, 0].isfinite() and not y.isfinite().all() and y.isfinite().any()
    for mix in (0.0, 0.5, 1.0):
        for name, a, e in zip(("input gradient", "weight gradient"), tb.linear_backward(g, x, w, mix, True, True),
                              reference.linear_backward(g, x, w, mix, True, True)):
            assert_same_nonfinite(a, e, f"{name}, mix={mix}")


def interp_conv_nonfinite_as_reference(interpret):
    gen = torch.Generator().manual_seed(3)
    x = _nonfinite(torch.randn(1, 2, 3, 4, 5, generator=gen), gen, frac=0.05)
    w = _nonfinite(torch.randn(3, 2, 2, 2, 2, generator=gen), gen, frac=0.05)
    w[0] = 0.5  # one finite filter: finite wherever its patch is
    args = ([1, 1, 1], [1, 0, 1], [1, 1, 1], 1)
    y = tb.conv_forward(x, w, None, *args)
    assert_same_nonfinite(y, conv_lowering.conv_forward(reference.BACKEND, x, w, None, *args), "conv forward")
    assert y[:, 0].isfinite().any() and not y.isfinite().all()


def interp_linear_zero_sizes_through_ops(interpret):
    """K = 0, M = 0, N = 0 with L1FX_BACKEND=triton: answered by l1fx/ops.py as F.linear does."""
    import torch.nn.functional as F

    for xs, ws in [((3, 0), (4, 0)), ((3, 5), (0, 5)), ((0, 5), (4, 5)), ((2, 3, 0), (4, 0))]:
        x, w = rand(*xs).requires_grad_(), rand(*ws).requires_grad_()
        b = rand(ws[0]).requires_grad_()
        y = L1F.l1_linear(x, w, b, mix=0.5)
        assert torch.equal(y, F.linear(x, w, b) if xs[-1] == 0 else y) and y.shape == (*xs[:-1], ws[0])
        g = rand(*y.shape)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
        assert torch.equal(gx, torch.zeros(xs)) and torch.equal(gw, torch.zeros(ws))
        assert torch.equal(gb, g.reshape(g.shape[:-1].numel(), ws[0]).sum(0))


def interp_conv_zero_sizes_through_ops(interpret):
    x, w, b = rand(2, 0, 5, 5).requires_grad_(), rand(3, 0, 3, 3).requires_grad_(), rand(3).requires_grad_()
    y = L1F.l1_conv2d(x, w, b, padding=1)
    assert torch.equal(y, b.detach().view(1, 3, 1, 1).expand(2, 3, 5, 5))
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.full((3,), 50.0))
    x = rand(2, 4, 5).requires_grad_()
    y = L1F.l1_conv1d(x, rand(0, 2, 3), None, groups=2)
    assert y.shape == (2, 0, 3)
    assert torch.equal(torch.autograd.grad(y.sum(), x)[0], torch.zeros_like(x))


# ------------------------------------------------------------------ interpreter: implicit-GEMM conv

CONV_CASES = [
    # x shape, w shape, stride, padding, dilation, groups, bias
    ((2, 4, 4, 5, 6), (4, 2, 3, 2, 3), [2, 1, 1], [1, 0, 2], [1, 2, 1], 2, True),
    ((1, 3, 3, 3, 3), (5, 3, 1, 1, 1), [1, 1, 1], [0, 0, 0], [1, 1, 1], 1, False),
    ((1, 2, 4, 5), (3, 2, 3, 3), [1, 2], [1, 1], [1, 1], 1, True),  # 2-D
    ((2, 4, 9), (4, 1, 3), [2], [1], [2], 4, True),  # 1-D depthwise
]


@pytest.mark.parametrize("case", CONV_CASES, ids=["3d-s-p-d-g", "3d-pointwise", "2d", "1d-depthwise"])
def interp_conv_implicit_gemm(interpret, case):
    xs, ws, stride, padding, dilation, groups, bias = case
    x, w = rand(*xs), rand(*ws)
    b = rand(ws[0]) if bias else None
    y = tb.conv_forward(x, w, b, stride, padding, dilation, groups)
    expected = conv_lowering.conv_forward(reference.BACKEND, x, w, b, stride, padding, dilation, groups)
    close(y, expected, torch.float32)


def interp_conv_bf16(interpret):
    x, w, b = rand(1, 2, 3, 3, 4, dtype=torch.bfloat16), rand(3, 2, 2, 2, 2, dtype=torch.bfloat16), None
    y = tb.conv_forward(x, w, b, [1, 1, 1], [1, 0, 1], [1, 1, 1], 1)
    close(y, conv_lowering.conv_forward(reference.BACKEND, x, w, b, [1, 1, 1], [1, 0, 1], [1, 1, 1], 1), torch.bfloat16)


def interp_conv_ops_end_to_end(interpret, monkeypatch):
    """Custom ops with L1FX_BACKEND=triton: forward and MGS grads (conv backward via im2col)."""
    x = rand(1, 2, 3, 4, 3).requires_grad_()
    w = rand(3, 2, 2, 2, 2).requires_grad_()
    b = rand(3).requires_grad_()
    y = L1F.l1_conv3d(x, w, b, stride=1, padding=1, dilation=1, mix=0.5)
    g = rand(*y.shape)
    grads = torch.autograd.grad(y, (x, w, b), g)
    monkeypatch.setenv("L1FX_BACKEND", "reference")
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = L1F.l1_conv3d(x2, w2, b2, stride=1, padding=1, dilation=1, mix=0.5)
    grads2 = torch.autograd.grad(y2, (x2, w2, b2), g)
    close(y.detach(), y2.detach(), torch.float32)
    for a, e in zip(grads, grads2):
        close(a, e, torch.float32)


# ------------------------------------------------------------------ GPU (compiled, autotuned)

@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m,k", [(1000, 64, 9), (4099, 130, 67)])
def test_gpu_linear_matches_reference(dtype, n, m, k):
    x, w, b = (rand(*s, dtype=dtype, device="cuda") for s in ((n, k), (m, k), (m,)))
    close(tb.linear_forward(x, w, b), reference.linear_forward(x, w, b), dtype)
    g = rand(n, m, dtype=dtype, device="cuda")
    for mix in (0.0, 0.5, 1.0):
        got = tb.linear_backward(g, x, w, mix, True, True)
        ref = reference.linear_backward(g, x, w, mix, True, True)
        # Long reductions in a different order: compare at the accumulation precision.
        for a, e in zip(got, ref):
            torch.testing.assert_close(a.float(), e.float(), rtol=2e-3 if dtype != torch.float32 else 1e-4,
                                       atol=(2e-2 if dtype != torch.float32 else 1e-3) * (n ** 0.5))


@gpu
@pytest.mark.parametrize("case", CONV_CASES + [((2, 16, 12, 12, 12), (32, 16, 3, 3, 3), [1, 1, 1], [1, 1, 1],
                                                [1, 1, 1], 1, True)])
def test_gpu_conv_forward(case):
    xs, ws, stride, padding, dilation, groups, bias = case
    x, w = rand(*xs, device="cuda"), rand(*ws, device="cuda")
    b = rand(ws[0], device="cuda") if bias else None
    y = tb.conv_forward(x, w, b, stride, padding, dilation, groups)
    expected = conv_lowering.conv_forward(reference.BACKEND, x, w, b, stride, padding, dilation, groups)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-3)


@gpu
def test_gpu_auto_selects_triton_and_module_backward():
    from l1fx.nn import L1Conv3d

    assert get_backend(rand(2, 2, device="cuda")).name == "triton"
    layer = L1Conv3d(4, 8, 3, padding=1).cuda()
    x = rand(2, 4, 6, 6, 6, device="cuda").requires_grad_()
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
