"""ℓp layers: functional ops, nn layers, convert / rewrite / export at p = 2 and inf, errors, Triton."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import l1fx
from brute import patches_loop
from l1fx import functional as L
from l1fx import nn as l1nn
from l1fx.errors import UsageError
from l1fx.kernels import lp_cpu, triton_backend

INF = math.inf
PS = [1.0, 1.5, 2.0, 3.0, 2.7, INF]
BACKENDS = ["reference"] + (["cpu"] if lp_cpu.available()[0] else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("L1FX_BACKEND", request.param)
    return request.param


def brute(x, w, p, b=None):
    """float64 -||x - w||_p (+ b) by the definition."""
    a = (x.double().unsqueeze(-2) - w.double()).abs()
    y = -(a.amax(-1) if math.isinf(p) else a.pow(p).sum(-1).pow(1.0 / p))
    return y if b is None else y + b.double()


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("p", PS)
def test_linear_matches_cdist_and_brute(backend, p):
    x, w, b = torch.randn(3, 7, 11), torch.randn(5, 11), torch.randn(5)
    y = L.lp_linear(x, w, b, p=p)
    assert y.shape == (3, 7, 5) and y.dtype == torch.float32
    want = -torch.cdist(x.reshape(-1, 11).double(), w.double(), p=p, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(y.reshape(-1, 5).double(), want + b.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), brute(x, w, p, b), rtol=1e-6, atol=1e-6)


def test_p1_is_the_l1_op():
    """p = 1 runs torch.ops.l1fx.linear / conv themselves: identical results, same graph node."""
    x, w = torch.randn(4, 6), torch.randn(3, 6)
    assert torch.equal(L.lp_linear(x, w, p=1), L.l1_linear(x, w))
    xc, wc = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    assert torch.equal(L.lp_conv2d(xc, wc, p=1.0, padding=1), L.l1_conv2d(xc, wc, padding=1))
    for p, op in ((1, torch.ops.l1fx.linear.default), (2, torch.ops.l1fx.lp_linear.default)):
        gm = torch.fx.symbolic_trace(l1nn.LpLinear(6, 3, p=p))
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [op]
    layer = l1nn.LpLinear(6, 3, p=1)
    ref = l1nn.L1Linear(6, 3)
    ref.load_state_dict(layer.state_dict(), strict=False)
    assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("p", [1.5, 2.0, INF])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_matches_unfold_brute(backend, p, nd):
    """Conv against explicit patches + the brute force, forward and (mix = 0) gradients."""
    stride, padding, dilation, groups = [2, 1, 1][:nd], [1, 0, 1][:nd], [1, 2, 1][:nd], 2
    size = [7, 6, 5][:nd]
    kernel = [3, 2, 2][:nd]
    x = torch.randn(2, 4, *size, requires_grad=True)
    w = torch.randn(6, 4 // groups, *kernel, requires_grad=True)
    b = torch.randn(6)
    y = getattr(L, f"lp_conv{nd}d")(x, w, b, stride, padding, dilation, groups, p=p, mix=0.0)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    pt, out = patches_loop(x64, kernel, stride, padding, dilation)
    pt = pt.reshape(2, math.prod(out), groups, 1, -1)  # [B, P, G, 1, Kg]
    d = pt - w64.reshape(groups, 3, -1)[None, None]
    a = d.abs()
    r = a.amax(-1) if math.isinf(p) else a.pow(p).sum(-1).pow(1 / p)
    want = (-r.reshape(2, *out, 6) + b.double()).movedim(-1, 1)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ax, aw = torch.autograd.grad(want, (x64, w64), g.double())
    torch.testing.assert_close(gx.double(), ax, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), aw, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, 2.7, INF])
def test_exact_gradient_is_autograd_of_the_norm(backend, p):
    x, w = torch.randn(9, 13, requires_grad=True), torch.randn(7, 13, requires_grad=True)
    g = torch.randn(9, 7)
    gx, gw = torch.autograd.grad(L.lp_linear(x, w, p=p, mix=0.0), (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ax, aw = torch.autograd.grad(brute(x64, w64, p), (x64, w64), g.double())
    torch.testing.assert_close(gx.double(), ax, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), aw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("p", [2.0, 3.0, INF])
def test_mgs_blend(backend, p):
    """mix = 1 is the p = 1 full-precision gradient; a blend is linear in mix between mix = 0 and 1."""
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    g = torch.randn(5, 4)

    def grads(mix, q=p):
        return torch.autograd.grad(L.lp_linear(x, w, p=q, mix=mix), (x, w), g)

    for a, b in zip(grads(1.0), grads(1.0, q=1.0)):
        torch.testing.assert_close(a, b)
    g0, g1, gh = grads(0.0), grads(1.0), grads(0.3)
    for a0, a1, ah in zip(g0, g1, gh):
        torch.testing.assert_close(ah, 0.3 * a1 + 0.7 * a0, rtol=1e-5, atol=1e-6)


def test_gradient_zero_at_x_equal_w():
    """At ||x - w|| = 0 the exact ℓp gradient (0/0 for p > 1) is the zero subgradient."""
    x = torch.ones(2, 3, requires_grad=True)
    w = torch.ones(1, 3, requires_grad=True)
    for p in (1.5, 2.0, INF):
        gx, gw = torch.autograd.grad(L.lp_linear(x, w, p=p, mix=0.0).sum(), (x, w))
        assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [0.5, 0.0, -2.0, float("nan"), True, "two", None])
def test_bad_p_rejected(bad):
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(UsageError, match=r"lp_linear.*p must"):
        L.lp_linear(x, w, p=bad)
    with pytest.raises(UsageError, match=r"lp_conv2d.*p must"):
        L.lp_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), p=bad)
    with pytest.raises(ValueError, match="p must"):
        l1nn.LpLinear(3, 4, p=bad)
    with pytest.raises(l1fx.ConversionError, match=r"l1fx.convert: p: p must"):
        l1fx.convert(nn.Linear(3, 4), p=bad)


# ------------------------------------------------------------------ nn layers and state
def test_layers_and_state_dict_round_trip():
    dense = nn.Conv2d(3, 4, 3, padding=1)
    layer = l1nn.LpConv2d.from_dense(dense, p=INF)
    assert isinstance(layer, l1nn.L1Conv2d) and "p=inf" in repr(layer)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(layer(x), L.lp_conv2d(x, dense.weight, dense.bias, padding=1, p=INF))
    state = layer.state_dict()
    assert state["_extra_state"] == {"p": INF}
    fresh = l1nn.LpConv2d(3, 4, 3, padding=1, p=2.0)
    fresh.load_state_dict(state)
    assert fresh.p == INF and torch.equal(fresh(x), layer(x))
    lin = l1nn.LpLinear(3, 4, p=3.0)
    lin.load_state_dict(nn.Linear(3, 4).state_dict(), strict=True)  # a dense checkpoint: p kept
    assert lin.p == 3.0
    with pytest.raises(ValueError, match="p must"):
        lin.load_state_dict({**lin.state_dict(), "_extra_state": {"p": 0.1}})


# ------------------------------------------------------------------ convert / rewrite / export
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Parameter(torch.randn(2, 5))

    def forward(self, x):
        return F.linear(self.fc(self.conv(x).mean((2, 3))), self.head)


@pytest.mark.parametrize("p", [2.0, INF])
def test_convert_round_trip(p):
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 3, 6, 6)
    out = l1fx.convert(model, p=p, normalize=None, example_inputs=(x,), pretrained=True)  # dense weights kept
    kinds = {type(m).__name__: m.p for m in out.modules() if isinstance(m, l1nn.LpModule)}
    assert kinds == {"LpConv2d": p, "LpLinear": p, "LpFunctionalCall": p}
    info = l1fx.summary(out)
    assert info.p == p and f"p={'inf' if p == INF else '2'}" in str(info)
    h = L.lp_conv2d(x, model.conv.weight, model.conv.bias, padding=1, p=p).mean((2, 3))
    h = L.lp_linear(h, model.fc.weight, model.fc.bias, p=p)
    torch.testing.assert_close(out(x), L.lp_linear(h, model.head, p=p))
    # the state_dict carries p: a p = 3 conversion loaded with it computes the p model
    other = l1fx.convert(model, p=3.0, normalize=None)
    other.load_state_dict(out.state_dict())
    torch.testing.assert_close(other(x), out(x))


def test_convert_p1_unchanged():
    model = _Net()
    out = l1fx.convert(model, p=1, normalize=None)
    assert not any(isinstance(m, l1nn.LpModule) for m in out.modules())
    assert set(out.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("p", [2.0, INF])
def test_rewrite_round_trip(p, tmp_path):
    from l1fx.rewrite import main, rewrite_source

    src = ("import torch.nn as nn\nimport torch.nn.functional as F\n\n\n"
           "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
           "        self.fc = nn.Linear(4, 3)\n        self.conv = nn.Conv1d(2, 4, 3)\n\n"
           "    def forward(self, x, w):\n        return F.linear(self.fc(x), w)\n")
    result = rewrite_source(src, p=p)
    lit = 'float("inf")' if p == INF else "2.0"
    assert f"l1fx.nn.LpLinear(4, 3, p={lit})" in result.code
    assert f"l1fx.nn.LpConv1d(2, 4, 3, p={lit})" in result.code
    assert f"l1fx.functional.lp_linear(self.fc(x), w, p={lit})" in result.code
    scope: dict = {}
    exec(compile(result.code, "<rewritten>", "exec"), scope)
    net = scope["Net"]()
    assert net.fc.p == p and net.conv.p == p
    x, w = torch.randn(2, 4), torch.randn(5, 3)
    torch.testing.assert_close(net(x, w), L.lp_linear(L.lp_linear(x, net.fc.weight, net.fc.bias, p=p), w, p=p))
    f = tmp_path / "m.py"
    f.write_text(src)
    assert main([str(f), "--in-place", "-q", "--p", "inf" if p == INF else "2"]) == 0
    assert "LpLinear" in f.read_text()


def test_rewrite_cli_bad_p(tmp_path, capsys):
    from l1fx.rewrite import main

    f = tmp_path / "m.py"
    f.write_text("import torch.nn as nn\nfc = nn.Linear(2, 3)\n")
    try:
        rc = main([str(f), "--in-place", "--p", "0.5"])
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "--p" in err and "p must be >= 1" in err and "Traceback" not in err
    assert f.read_text() == "import torch.nn as nn\nfc = nn.Linear(2, 3)\n"


@pytest.mark.parametrize("p", [2.0, INF])
def test_export_round_trip(p, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from l1fx.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(2, 3, 5, 5)
    lp = l1fx.convert(model, p=p, normalize=None).eval()
    result = export_onnx(lp, (x,), tmp_path / "m.onnx")
    assert result.l1_nodes == {"LpConv": 1, "LpLinear": 1}
    proto = onnx.load(str(tmp_path / "m.onnx"))
    attrs = [a.f for n in proto.graph.node if n.op_type.startswith("Lp") for a in n.attribute if a.name == "p"]
    assert attrs == [p, p]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), lp(x).detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Triton (interpreter)
_TRITON_CHILD = r"""
import math, torch
from l1fx.kernels import lp_triton, lp_reference as R
torch.manual_seed(0)
eps = torch.finfo(torch.float32).eps
for off, spread in [(0.0, 1.0), (1e6, 1.0), (0.0, 1e6), (0.0, 1e-20)]:
    x = torch.randn(9, 13) * spread + off
    w = torch.randn(11, 13) * spread + off
    for p in [2.0, math.inf, 1.5, 3.0, 2.7]:
        r = -R.linear_forward(x.double(), w.double(), None, p)
        y = lp_triton.lp_linear_forward(x, w, None, p)
        err = ((y.double() + r).abs() / r.clamp_min(1e-300)).max().item()
        assert err <= 17 * eps, (off, spread, p, err)
x[1, 2] = float("nan"); x[2, 3] = float("inf")
for p in [2.0, math.inf, 2.7]:
    torch.testing.assert_close(lp_triton.lp_linear_forward(x, w, None, p), R.linear_forward(x, w, None, p),
                               equal_nan=True)
print("ok")
"""


@pytest.mark.skipif(not triton_backend._triton_installed(), reason="triton is not installed")
def test_triton_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env.update(TRITON_INTERPRET="1", L1FX_BACKEND="triton")
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", _TRITON_CHILD], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-3000:] + run.stderr[-3000:]


def test_energy_report_counts_lp_operations():
    """Only p = 1 (and the compare-only p = inf) is multiplication-free; p = 2 is one multiply per MAC."""
    from l1fx.energy import energy_report

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(2, 3, 5, 5)
    macs = energy_report(model, x).total["mul"]
    totals = {p: energy_report(l1fx.convert(model, p=p, normalize=None), x).total for p in (1, 2, INF, 3, 2.5)}
    assert totals[1]["mul"] == 0 and totals[INF]["mul"] == 0 and totals[1]["add"] == 2 * macs
    assert totals[2]["mul"] == macs and totals[3]["mul"] == 2 * macs
    assert totals[2.5]["mul"] == 18 * macs and totals[2.5]["energy_pJ"] > totals[3]["energy_pJ"] > totals[1]["energy_pJ"]


def test_rewrite_file_takes_p(tmp_path):
    from l1fx.rewrite import rewrite_file

    f = tmp_path / "m.py"
    f.write_text("import torch.nn as nn\nfc = nn.Linear(2, 3)\n")
    assert "l1fx.nn.L1Linear(2, 3)" in rewrite_file(f).text()
    assert "l1fx.nn.LpLinear(2, 3, p=3.0)" in rewrite_file(f, p=3).text()


def test_kinds_without_an_lp_layer_stay_dense_with_the_reason():
    """p != 1 on a decoder with transposed convolutions: those have no ℓp layer, so they are kept, and said so."""
    import torch.nn.functional as F

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv3d(2, 4, 3, padding=1)
            self.up = nn.ConvTranspose3d(4, 3, 2, stride=2)
            self.w = nn.Parameter(torch.randn(3, 2, 1, 1, 1))

        def forward(self, x):
            return F.conv_transpose3d(torch.relu(self.up(torch.relu(self.a(x)))), self.w)

    torch.manual_seed(0)
    model, x = Decoder(), torch.randn(2, 2, 4, 4, 4)
    out = l1fx.convert(model, p=2.0, example_inputs=(x,))
    info = l1fx.summary(out)
    assert type(out.a).__name__ == "LpConv3d" and type(out.up) is nn.ConvTranspose3d
    assert "no lp layer for conv_transpose3d" in info.skipped["up"]
    assert "no lp layer for conv_transpose3d" in info.skipped["w"]
    assert out(x).shape == model(x).shape


def test_lp_kernels_unavailable_raise_when_forced_and_warn_under_auto(monkeypatch):
    from l1fx.kernels import lp as lp_core
    from l1fx.kernels import lp_cpu

    monkeypatch.setattr(lp_cpu, "available", lambda: (False, "no compiler (test)"))
    lp_core._warn_fallback.cache_clear()
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    monkeypatch.setenv("L1FX_BACKEND", "cpu")
    with pytest.raises(l1fx.BackendUnavailable, match="L1FX_BACKEND=cpu: its lp kernels are unavailable"):
        L.lp_linear(x, w, p=2.0)
    monkeypatch.setenv("L1FX_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match="running the reference lp kernel"):
        y = L.lp_linear(x, w, p=2.0)
    torch.testing.assert_close(y, -torch.cdist(x, w, p=2.0))
    lp_core._warn_fallback.cache_clear()
