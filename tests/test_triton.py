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
