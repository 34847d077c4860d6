"""Every CPU backend against a float64 brute force, on data far from zero.

The bound is what float32 rounding of the result itself allows: each output
``r = sum_t a_t`` of T terms (T = K for the forward, M or N for the gradients)
must be within ``(T + 2) * eps32 * sum_t |a_t|`` of the float64 value computed
from the same (float32- or bfloat16-rounded) data, plus the rounding to the
output dtype. For the forward without bias ``sum_t |a_t| = |y|``: the error is
relative to the result, whatever the offset or spread of the data. The old
``x + w - 2 min(x, w)`` forward and ``g^T x - w * colsum(g)`` weight gradient
miss it by orders of magnitude at offsets of 1e4..1e6.

NaN/inf placement: the reference kernel (plain PyTorch) is the oracle.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from brute import patches_loop
from l1fx.kernels import conv as _conv
from l1fx.kernels import cpu, reference


def _backends():
    out = [pytest.param(reference.BACKEND, id="reference")]
    ok, why = cpu.available()
    out.append(pytest.param(cpu.BACKEND, id="cpu", marks=[] if ok else pytest.mark.skip(
        reason=f"cpu backend unavailable: {why.splitlines()[0] if why else ''}")))
    return out


BACKENDS = _backends()
EPS32 = torch.finfo(torch.float32).eps
# Fixed examples (derandomize), no example database, no shrinking: a failure reports
# the generated case as is, quickly.
_COMMON = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SETTINGS = settings(max_examples=20, **_COMMON)


def _out_eps(dtype):
    return torch.finfo(dtype).eps / 2  # rounding to nearest of the returned dtype


def _check(got, exact, abs_terms, terms, dtype, what):
    """|got - exact| <= (terms + 2) eps32 sum|a_t| + eps_out |exact| (+ a denormal-sized floor), per element."""
    got = got.double()
    bound = (terms + 2) * EPS32 * abs_terms + _out_eps(dtype) * exact.abs() + 1e-30
    err = (got - exact).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        rel = (err / abs_terms.clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; first at {i}: got "
            f"{got[tuple(i)].item()!r}, exact {exact[tuple(i)].item()!r}, bound {bound[tuple(i)].item():.3g}; "
            f"max error / sum|terms| = {rel:.3g}")


def _data(seed, n, k, m, offset, spread, near, dtype):
    """x, w, b, g rounded to dtype. ``near``: filters are copies of input rows plus tiny noise
    (the outputs that carry the information: small |x - w| at a large offset)."""
    gen = torch.Generator().manual_seed(seed)
    x = offset + spread * torch.randn(n, k, generator=gen, dtype=torch.float64)
    if near and n > 0:
        pick = torch.randint(0, n, (m,), generator=gen)
        w = x[pick] + spread * 1e-4 * torch.randn(m, k, generator=gen, dtype=torch.float64)
    else:
        w = offset + spread * torch.randn(m, k, generator=gen, dtype=torch.float64)
    b = spread * torch.randn(m, generator=gen, dtype=torch.float64)
    g = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b, g)]


offsets = st.sampled_from([0.0, 1.0, -37.5, 1e3, -1e4, 1e6, -1e6])
spreads = st.sampled_from([1e-3, 1.0, 50.0, 5e3, 1e6])


def _mgs_terms_w(d, mix):
    return mix * d + (1 - mix) * d.sign()


def _mgs_terms_x(d, mix):  # d = w - x
    return mix * d.clamp(-1, 1) + (1 - mix) * d.sign()


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=st.integers(1, 40), k=st.integers(1, 70), m=st.integers(1, 40), offset=offsets, spread=spreads,
       near=st.booleans(), bias=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 2**16))
@SETTINGS
def test_linear_forward_exact(backend, n, k, m, offset, spread, near, bias, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w, b, _ = _data(seed, n, k, m, offset, spread, near, dtype)
    b = b if bias else None
    y = backend.linear_forward(x, w, b)
    assert y.dtype == dtype and y.shape == (n, m)
    d = x.double()[:, None, :] - w.double()[None]
    s = d.abs().sum(-1)
    exact = -s + (0 if b is None else b.double())
    _check(y, exact, s + (0 if b is None else b.double().abs()), k, dtype, f"forward {backend.name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
@given(n=st.integers(1, 40), k=st.integers(1, 40), m=st.integers(1, 40), offset=offsets, spread=spreads,
       near=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 2**16))
@SETTINGS
def test_linear_gradients_exact(backend, mix, n, k, m, offset, spread, near, bf16, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w, _, g = _data(seed, n, k, m, offset, spread, near, dtype)
    gx, gw = backend.linear_backward(g, x, w, mix, True, True)
    assert gx.dtype == dtype and gw.dtype == dtype
    d = x.double()[:, None, :] - w.double()[None]  # [n, m, k]
    g64 = g.double()[:, :, None]
    tw = g64 * _mgs_terms_w(d, mix)
    tx = g64 * _mgs_terms_x(-d, mix)
    _check(gw, tw.sum(0), tw.abs().sum(0), n, dtype, f"grad w {backend.name} mix={mix}")
    _check(gx, tx.sum(1), tx.abs().sum(1), m, dtype, f"grad x {backend.name} mix={mix}")


# ----------------------------------------------------------------- convolutions

def _conv_exact(x, w, b, g, stride, padding, dilation, groups, mix):
    """float64 forward, gradients and their sum|terms|, from explicit patches."""
    kernel = list(w.shape[2:])
    nd = len(kernel)
    x64 = x.double().requires_grad_(True)
    pt, out = patches_loop(x64, kernel, stride, padding, dilation)  # [B, *out, C, *kernel]
    B, C, M = x.shape[0], x.shape[1], w.shape[0]
    cg, mg = C // groups, M // groups
    P = math.prod(out)
    pt = pt.reshape(B, P, groups, 1, cg * math.prod(kernel))
    w64 = w.double().reshape(groups, mg, -1)
    d = pt - w64[None, None]  # [B, P, G, Mg, Kg]
    s = d.abs().sum(-1).detach()
    y = -s.reshape(B, P, M)
    ysum = s.reshape(B, P, M)
    if b is not None:
        y = y + b.double()
        ysum = ysum + b.double().abs()
    to_ncl = lambda t: t.movedim(-1, 1).reshape(B, M, *out)  # noqa: E731
    gg = g.double().reshape(B, M, P).transpose(1, 2).reshape(B, P, groups, mg, 1)
    tw = (gg * _mgs_terms_w(d.detach(), mix))
    gw = tw.sum((0, 1)).reshape(w.shape)
    gw_abs = tw.abs().sum((0, 1)).reshape(w.shape)
    tx = gg * _mgs_terms_x(-d.detach(), mix)
    gpatch, gpatch_abs = tx.sum(3), tx.abs().sum(3)  # [B, P, G, Kg]
    # The patch view is linear in x with 0/1 coefficients: its adjoint scatters the
    # per-patch sums (and sums of |terms|) onto the inputs.
    gx, = torch.autograd.grad(pt, x64, gpatch[:, :, :, None].expand_as(pt), retain_graph=True)
    gx_abs, = torch.autograd.grad(pt, x64, gpatch_abs[:, :, :, None].expand_as(pt))
    return to_ncl(y), to_ncl(ysum), gx, gx_abs, gw, gw_abs, out


CONV_CASES = [
    # (nd, B, C, M, spatial, kernel, stride, padding, dilation, groups)
    (1, 2, 3, 4, (9,), (3,), (1,), (1,), (1,), 1),
    (1, 1, 4, 6, (11,), (2,), (2,), (0,), (2,), 2),
    (2, 2, 2, 3, (5, 6), (3, 2), (1, 1), (1, 0), (1, 1), 1),
    (2, 1, 4, 4, (7, 6), (3, 3), (2, 1), (1, 2), (1, 2), 2),
    (3, 1, 2, 3, (4, 5, 4), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
    (3, 2, 4, 2, (5, 4, 5), (2, 3, 2), (2, 2, 1), (0, 1, 1), (1, 1, 2), 2),
    (3, 1, 3, 4, (6, 6, 6), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 1),
    # kernel 1, stride 1, no padding: the cpu backend's pointwise forward (a short last panel, groups)
    (1, 2, 5, 7, (70,), (1,), (1,), (0,), (1,), 1),
    (3, 1, 4, 6, (3, 4, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1), 2),
]


def _conv_call(backend, which, *args):
    fn = getattr(backend, which)
    if fn is None:  # backends without their own conv run the im2col lowering
        return getattr(_conv, which)(backend, *args)
    return fn(*args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-s{c[6]}-p{c[7]}-d{c[8]}-g{c[9]}")
@given(offset=offsets, spread=spreads, near=st.booleans(), bias=st.booleans(), bf16=st.booleans(),
       mix=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
@settings(max_examples=5, **_COMMON)
def test_conv_exact(backend, case, offset, spread, near, bias, bf16, mix, seed):
    nd, B, C, M, spatial, kernel, stride, padding, dilation, groups = case
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = offset + spread * torch.randn(B, C, *spatial, generator=gen, dtype=torch.float64)
    if near:  # filters close to one input patch: small outputs at a large offset
        w = (x[(0, slice(0, C // groups)) + tuple(slice(0, k) for k in kernel)].unsqueeze(0).repeat(M, 1, *[1] * nd)
             + spread * 1e-4 * torch.randn(M, C // groups, *kernel, generator=gen, dtype=torch.float64))
    else:
        w = offset + spread * torch.randn(M, C // groups, *kernel, generator=gen, dtype=torch.float64)
    b = spread * torch.randn(M, generator=gen, dtype=torch.float64) if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    out = _conv.out_shape(spatial, kernel, stride, padding, dilation)
    g = torch.randn(B, M, *out, generator=gen, dtype=torch.float64).to(dtype)
    y_ex, y_abs, gx_ex, gx_abs, gw_ex, gw_abs, _ = _conv_exact(x, w, b, g, stride, padding, dilation, groups, mix)
    kg = (C // groups) * math.prod(kernel)
    y = _conv_call(backend, "conv_forward", x, w, b, stride, padding, dilation, groups)
    assert y.dtype == dtype and tuple(y.shape) == tuple(y_ex.shape)
    _check(y, y_ex, y_abs, kg, dtype, f"conv forward {backend.name}")
    gx, gw = _conv_call(backend, "conv_backward", g, x, w, stride, padding, dilation, groups, mix, True, True)
    terms_x = (M // groups) * math.prod(kernel)
    _check(gx, gx_ex, gx_abs, terms_x, dtype, f"conv grad x {backend.name} mix={mix}")
    _check(gw, gw_ex, gw_abs, B * math.prod(out), dtype, f"conv grad w {backend.name} mix={mix}")


# ----------------------------------------------------------------- NaN / inf placement

def _same_nonfinite(got, want, what):
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(got == math.inf, want == math.inf), f"{what}: +inf positions differ"
    assert torch.equal(got == -math.inf, want == -math.inf), f"{what}: -inf positions differ"
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)


def _nonfinite_cases():
    torch.manual_seed(1)
    x, w, g = torch.randn(13, 21) + 100, torch.randn(37, 21) + 100, torch.randn(13, 37)
    cases = {}
    a, b = x.clone(), w.clone()
    b[5, 3] = math.nan
    cases["nan in one filter"] = (a, b)
    a, b = x.clone(), w.clone()
    a[2, 7] = -math.inf
    cases["-inf input"] = (a, b)
    a, b = x.clone(), w.clone()
    a[4, 0] = math.inf
    b[9, 11] = math.inf
    cases["+inf input and filter"] = (a, b)
    a, b = x.clone(), w.clone()
    a[6, 1] = math.nan
    b[30, 20] = -math.inf
    cases["nan input, -inf filter"] = (a, b)
    # inf - inf = NaN in one difference of otherwise finite data (the kernels'
    # faster clamp for finite data must not take this case).
    a, b = x.clone(), w.clone()
    a[4, 3] = math.inf
    b[9, 3] = math.inf
    cases["+inf input and filter, same k"] = (a, b)
    return cases, g


NONFINITE, G_NONFINITE = _nonfinite_cases()


@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_nonfinite_linear_like_reference(case, mix):
    if not cpu.available()[0]:
        pytest.skip("cpu backend unavailable")
    x, w = NONFINITE[case]
    yr = reference.linear_forward(x, w, None)
    y = cpu.linear_forward(x, w, None)
    _same_nonfinite(y, yr, f"forward, {case}")
    got = cpu.linear_backward(G_NONFINITE, x, w, mix, True, True)
    want = reference.linear_backward(G_NONFINITE, x, w, mix, True, True)
    _same_nonfinite(got[0], want[0], f"grad x, {case}, mix={mix}")
    _same_nonfinite(got[1], want[1], f"grad w, {case}, mix={mix}")


def test_nonfinite_semantics():
    # One NaN in one filter poisons only that filter's outputs; -inf input gives -inf.
    x, w = NONFINITE["nan in one filter"]
    for be in (reference, cpu) if cpu.available()[0] else (reference,):
        y = be.linear_forward(x, w, None)
        assert y[:, 5].isnan().all() and y[:, [i for i in range(37) if i != 5]].isfinite().all()
    x, w = NONFINITE["-inf input"]
    for be in (reference, cpu) if cpu.available()[0] else (reference,):
        y = be.linear_forward(x, w, None)
        assert (y[2] == -math.inf).all() and y[[i for i in range(13) if i != 2]].isfinite().all()
        gx, _ = be.linear_backward(G_NONFINITE, x, w, 1.0, True, False)
        assert gx.isfinite().all()  # HardTanh / sign of an infinite difference are finite


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_nonfinite_conv_like_reference(mix):
    if not cpu.available()[0]:
        pytest.skip("cpu backend unavailable")
    torch.manual_seed(2)
    x, w = torch.randn(2, 4, 6, 7, 5) + 50, torch.randn(6, 2, 3, 3, 3) + 50
    x[1, 3, 2, 4, 1] = -math.inf
    w[4, 0, 1, 1, 1] = math.nan
    for stride in ((1, 1, 1), (2, 1, 2)):
        args = (stride, (1, 1, 1), (1, 1, 1), 2)
        yr = _conv.conv_forward(reference.BACKEND, x, w, None, *args)
        _same_nonfinite(cpu.conv_forward(x, w, None, *args), yr, f"conv forward stride {stride}")
        g = torch.randn(yr.shape)
        want = _conv.conv_backward(reference.BACKEND, g, x, w, *args, mix, True, True)
        got = cpu.conv_backward(g, x, w, *args, mix, True, True)
        _same_nonfinite(got[0], want[0], f"conv grad x stride {stride} mix={mix}")
        _same_nonfinite(got[1], want[1], f"conv grad w stride {stride} mix={mix}")


@pytest.mark.parametrize("mix", [0.5, 1.0])
def test_conv_inf_minus_inf_like_reference(mix):
    # No NaN in the data, but inf - inf = NaN in some differences: the input
    # gradient's faster clamp (for finite data only) must not be used here.
    if not cpu.available()[0]:
        pytest.skip("cpu backend unavailable")
    torch.manual_seed(4)
    x, w = torch.randn(1, 2, 5, 6, 18), torch.randn(4, 2, 3, 3, 3)
    x[0, 1, 2, 3, 8] = math.inf  # reached by the centre tap at stride 1 and 2
    w[2, 1, 1, 1, 1] = math.inf
    for stride in ((1, 1, 1), (1, 1, 2)):
        args = (stride, (1, 1, 1), (1, 1, 1), 1)
        out = _conv.out_shape(x.shape[2:], w.shape[2:], *args[:3])
        g = torch.randn(1, 4, *out)
        want = _conv.conv_backward(reference.BACKEND, g, x, w, *args, mix, True, False)[0]
        got = cpu.conv_backward(g, x, w, *args, mix, True, False)[0]
        assert want.isnan().any()
        _same_nonfinite(got, want, f"conv grad x, inf - inf, stride {stride}, mix={mix}")
