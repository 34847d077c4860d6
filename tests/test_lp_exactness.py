"""The ℓp kernels (reference, cpu) against a float64 brute force, on data far from zero.

Same standard as tests/test_exactness.py: each output within about ``K eps |y|``
of the float64 value computed from the same (float32- or bfloat16-rounded)
data, at offsets and spreads up to 1e6, where ``||x||^2 + ||w||^2 - 2 x.w`` (for
p = 2) or unscaled powers (large p) would be far off. The gradient bound adds
the error of ``r`` propagated through ``(|d| / r)^(p - 1)`` (p - 1 times r's).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from l1fx.kernels import lp_cpu, lp_reference

EPS32 = torch.finfo(torch.float32).eps
_COMMON = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SETTINGS = settings(max_examples=15, **_COMMON)
PS = [1.5, 2.0, 3.0, 2.7, 9.0, 20.0, math.inf]
offsets = st.sampled_from([0.0, 1.0, -37.5, 1e3, -1e4, 1e6, -1e6])
spreads = st.sampled_from([1e-3, 1.0, 50.0, 5e3, 1e6])


def _kernels():
    ok, why = lp_cpu.available()
    return [pytest.param((lp_reference.linear_forward, lp_reference.linear_backward), id="reference"),
            pytest.param((lp_cpu.lp_linear_forward, lp_cpu.lp_linear_backward), id="cpu",
                         marks=[] if ok else pytest.mark.skip(reason=f"cpu kernels unavailable: {why[:200]}"))]


KERNELS = _kernels()


def _data(seed, n, k, m, offset, spread, near, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = offset + spread * torch.randn(n, k, generator=gen, dtype=torch.float64)
    if near:
        w = x[torch.randint(0, n, (m,), generator=gen)] + spread * 1e-4 * torch.randn(m, k, generator=gen,
                                                                                       dtype=torch.float64)
    else:
        w = offset + spread * torch.randn(m, k, generator=gen, dtype=torch.float64)
    b = spread * torch.randn(m, generator=gen, dtype=torch.float64)
    g = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b, g)]


def brute_norm(x, w, p):
    """float64 ``||x[n] - w[m]||_p`` by the definition (float64 has the range for these data)."""
    a = (x.double()[:, None, :] - w.double()[None]).abs()
    return a.amax(-1) if math.isinf(p) else a.pow(p).sum(-1).pow(1.0 / p)


def _check(got, exact, scale, terms, dtype, what):
    bound = (terms + 4) * EPS32 * scale + torch.finfo(dtype).eps / 2 * exact.abs() + 1e-30
    err = (got.double() - exact).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} outside the bound; worst err/scale "
                           f"{(err / scale.clamp_min(1e-300)).max().item():.3g}")


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("p", PS)
@given(n=st.integers(1, 24), k=st.integers(1, 50), m=st.integers(1, 24), offset=offsets, spread=spreads,
       near=st.booleans(), bias=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 2**16))
@SETTINGS
def test_lp_forward_exact(kernels, p, n, k, m, offset, spread, near, bias, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w, b, _ = _data(seed, n, k, m, offset, spread, near, dtype)
    b = b if bias else None
    y = kernels[0](x, w, b, p)
    assert y.dtype == dtype and y.shape == (n, m)
    r = brute_norm(x, w, p)
    exact = -r + (0 if b is None else b.double())
    _check(y, exact, r + (0 if b is None else b.double().abs()), k, dtype, f"forward p={p}")


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, 2.7])
@pytest.mark.parametrize("mix", [0.0, 0.5])
@given(n=st.integers(1, 20), k=st.integers(1, 30), m=st.integers(1, 20), offset=offsets, spread=spreads,
       near=st.booleans(), seed=st.integers(0, 2**16))
@SETTINGS
def test_lp_gradients_exact(kernels, p, mix, n, k, m, offset, spread, near, seed):
    x, w, _, g = _data(seed, n, k, m, offset, spread, near, torch.float32)
    gx, gw = kernels[1](g, x, w, p, mix, True, True)
    d = x.double()[:, None, :] - w.double()[None]
    r = brute_norm(x, w, p)[:, :, None]
    e = torch.where(r == 0, 0.0, d.sign() * (d.abs() / r).pow(p - 1))
    g64 = g.double()[:, :, None]
    tw = g64 * (mix * d + (1 - mix) * e)
    tx = -g64 * (mix * d.clamp(-1, 1) + (1 - mix) * e)
    slack = (p - 1) * (k + 4)  # r's relative error, raised to the power p - 1
    _check(gw, tw.sum(0), tw.abs().sum(0), n + slack, torch.float32, f"grad w p={p} mix={mix}")
    _check(gx, tx.sum(1), tx.abs().sum(1), m + slack, torch.float32, f"grad x p={p} mix={mix}")


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, 2.7, math.inf])
def test_cpu_nonfinite_as_reference(p):
    """NaN/inf in the data (sent to the reference) and x - w overflowing to inf (in the C++ kernel)."""
    if not lp_cpu.available()[0]:
        pytest.skip("cpu kernels unavailable")
    x, w = torch.randn(6, 9), torch.randn(5, 9)
    x[1, 2], x[2, 3], w[3, 4] = float("nan"), float("inf"), -float("inf")
    torch.testing.assert_close(lp_cpu.lp_linear_forward(x, w, None, p), lp_reference.linear_forward(x, w, None, p),
                               equal_nan=True)
    big = torch.full((2, 3), 3e38)
    y = lp_cpu.lp_linear_forward(big, -big, None, p)
    assert torch.isneginf(y).all()  # |x - w| = inf: the norm is inf, not NaN (inf / inf)
    tiny = torch.full((2, 3), 1e-25)  # |d|^p underflows in float32 (r does not): the rescue answers
    y = lp_cpu.lp_linear_forward(tiny, torch.zeros(4, 3), None, p)
    want = -brute_norm(tiny, torch.zeros(4, 3), p)
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=0)
