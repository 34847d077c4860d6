"""The l1 ops against brute-force formulas: forward, MGS gradients, dtypes, edge cases."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import l1fx.functional as L1F
from l1fx.kernels import set_chunk_bytes

from brute import away_from_kinks, l1_conv_brute, l1_linear_brute, surrogate_elems


@pytest.fixture
def tiny_chunks():
    """Force many chunks so the blocking logic is exercised."""
    set_chunk_bytes(4096)
    yield
    set_chunk_bytes(None)


# ------------------------------------------------------------------ forward
@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    k=st.integers(1, 17), m=st.integers(1, 9), bias=st.booleans(), small=st.booleans(),
)
def test_linear_forward_matches_brute_force(lead, k, m, bias, small):
    set_chunk_bytes(512 if small else None)
    try:
        x = torch.randn(*lead, k, dtype=torch.float64)
        w = torch.randn(m, k, dtype=torch.float64)
        b = torch.randn(m, dtype=torch.float64) if bias else None
        y = L1F.l1_linear(x, w, b)
        assert y.shape == (*lead, m)
        torch.testing.assert_close(y, l1_linear_brute(x, w, b))
    finally:
        set_chunk_bytes(None)


CONV_CASES = [
    # nd, in_c, out_c, kernel, stride, padding, dilation, groups, spatial
    (1, 3, 4, (1,), (1,), (0,), (1,), 1, (7,)),
    (1, 4, 6, (3,), (2,), (1,), (2,), 2, (9,)),
    (2, 3, 5, (3, 2), (1, 2), (1, 0), (1, 1), 1, (5, 6)),
    (2, 4, 4, (2, 2), (2, 1), (0, 1), (2, 1), 4, (6, 5)),
    (3, 2, 3, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1, (4, 4, 4)),
    (3, 4, 6, (1, 2, 3), (2, 1, 1), (0, 1, 1), (1, 2, 1), 2, (5, 4, 5)),
    (3, 3, 2, (2, 1, 1), (1, 1, 2), (0, 0, 0), (2, 1, 1), 1, (3, 2, 4)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-k{c[3]}-s{c[4]}-p{c[5]}-d{c[6]}-g{c[7]}")
@pytest.mark.parametrize("bias", [True, False])
def test_conv_forward_matches_loop_reference(case, bias, tiny_chunks):
    nd, cin, cout, k, s, p, d, g, sp = case
    x = torch.randn(2, cin, *sp, dtype=torch.float64)
    w = torch.randn(cout, cin // g, *k, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    fn = (L1F.l1_conv1d, L1F.l1_conv2d, L1F.l1_conv3d)[nd - 1]
    y = fn(x, w, b, s, p, d, g)
    torch.testing.assert_close(y, l1_conv_brute(x, w, b, s, p, d, g))


@pytest.mark.parametrize("nd,kernel,dilation", [(1, (4,), (1,)), (2, (2, 3), (2, 1)), (3, (2, 2, 3), (1, 1, 1))])
def test_conv_same_and_valid_padding(nd, kernel, dilation):
    x = torch.randn(1, 2, *([6] * nd), dtype=torch.float64)
    w = torch.randn(3, 2, *kernel, dtype=torch.float64)
    fn = (L1F.l1_conv1d, L1F.l1_conv2d, L1F.l1_conv3d)[nd - 1]
    y = fn(x, w, None, 1, "same", dilation)
    assert y.shape[2:] == x.shape[2:]
    # 'same' pads the extra element at the high end, like PyTorch.
    pads = []
    for k, d in reversed(list(zip(kernel, dilation))):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    ref = l1_conv_brute(torch.nn.functional.pad(x, pads), w, None, [1] * nd, [0] * nd, list(dilation), 1)
    torch.testing.assert_close(y, ref)
    yv = fn(x, w, None, 1, "valid", dilation)
    torch.testing.assert_close(yv, l1_conv_brute(x, w, None, [1] * nd, [0] * nd, list(dilation), 1))


# ------------------------------------------------------------------ gradients
def _straight_through(surrogate_value, op_value):
    # Value of the surrogate (used by finite differences), gradient of the op (used by autograd).
    return surrogate_value.detach() + op_value - op_value.detach()


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_linear_gradcheck(mix, tiny_chunks):
    gen = torch.Generator().manual_seed(1)
    x = away_from_kinks((3, 2, 5), "x", gen=gen).requires_grad_()
    w = away_from_kinks((4, 5), "w", gen=gen).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    if mix == 0.0:
        # mix=0 is the exact gradient of the forward: plain gradcheck.
        assert torch.autograd.gradcheck(lambda x, w, b: L1F.l1_linear(x, w, b, mix=0.0), (x, w, b))
    for_x, for_w = surrogate_elems(mix)
    # Gradient w.r.t. the input: finite differences of the surrogate whose derivative is the MGS formula.
    wd = w.detach()
    assert torch.autograd.gradcheck(
        lambda x: _straight_through(for_x(x.unsqueeze(-2) - wd).sum(-1), L1F.l1_linear(x, wd, mix=mix)), (x,)
    )
    xd = x.detach()
    assert torch.autograd.gradcheck(
        lambda w: _straight_through(for_w(xd.unsqueeze(-2) - w).sum(-1), L1F.l1_linear(xd, w, mix=mix)), (w,)
    )


@pytest.mark.parametrize("case", CONV_CASES[1::2], ids=lambda c: f"{c[0]}d-g{c[7]}")
@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_conv_gradcheck(case, mix, tiny_chunks):
    nd, cin, cout, k, s, p, d, g, sp = case
    gen = torch.Generator().manual_seed(2)
    x = away_from_kinks((1, cin, *sp), "x", gen=gen).requires_grad_()
    w = away_from_kinks((cout, cin // g, *k), "w", gen=gen).requires_grad_()
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    fn = (L1F.l1_conv1d, L1F.l1_conv2d, L1F.l1_conv3d)[nd - 1]
    if mix == 0.0:
        assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, s, p, d, g, mix=0.0), (x, w, b))
    for_x, for_w = surrogate_elems(mix)
    wd, xd = w.detach(), x.detach()
    assert torch.autograd.gradcheck(
        lambda x: _straight_through(l1_conv_brute(x, wd, None, s, p, d, g, elem=for_x), fn(x, wd, None, s, p, d, g, mix=mix)),
        (x,),
    )
    assert torch.autograd.gradcheck(
        lambda w: _straight_through(l1_conv_brute(xd, w, None, s, p, d, g, elem=for_w), fn(xd, w, None, s, p, d, g, mix=mix)),
        (w,),
    )


def test_mix_one_is_addernet_full_precision_gradient():
    # AdderNet (CVPR 2020) eqs. 5-6: dY/dF = X - F, dY/dX = HT(F - X).
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 3, dtype=torch.float64)
    L1F.l1_linear(x, w, mix=1.0).backward(g)
    d = x.detach()[:, None, :] - w.detach()[None]
    torch.testing.assert_close(w.grad, torch.einsum("nm,nmk->mk", g, d))
    torch.testing.assert_close(x.grad, torch.einsum("nm,nmk->nk", g, (-d).clamp(-1, 1)))


def test_mix_is_linear_blend():
    x = torch.randn(5, 7, dtype=torch.float64)
    w = torch.randn(4, 7, dtype=torch.float64)
    grads = {}
    for mix in (0.0, 0.3, 1.0):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        L1F.l1_linear(xx, ww, mix=mix).sum().backward()
        grads[mix] = (xx.grad, ww.grad)
    for i in range(2):
        torch.testing.assert_close(grads[0.3][i], 0.3 * grads[1.0][i] + 0.7 * grads[0.0][i])


# ------------------------------------------------------------------ dtypes and edge cases
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    x = torch.randn(33, 19)
    w = torch.randn(7, 19)
    y = L1F.l1_linear(x.to(dtype), w.to(dtype))
    assert y.dtype == dtype
    ref = l1_linear_brute(x.to(dtype).double(), w.to(dtype).double())
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    xx = x.to(dtype).clone().requires_grad_()
    ww = w.to(dtype).clone().requires_grad_()
    L1F.l1_linear(xx, ww, mix=0.5).sum().backward()
    assert xx.grad.dtype == dtype and ww.grad.dtype == dtype
    x64 = x.to(dtype).double().detach().requires_grad_()
    w64 = w.to(dtype).double().detach().requires_grad_()
    L1F.l1_linear(x64, w64, mix=0.5).sum().backward()
    torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=tol, atol=tol * w64.grad.abs().max().item())
    torch.testing.assert_close(xx.grad.double(), x64.grad, rtol=tol, atol=tol * x64.grad.abs().max().item())


def test_bfloat16_conv3d():
    x = torch.randn(1, 2, 4, 5, 3)
    w = torch.randn(3, 2, 2, 2, 2)
    y = L1F.l1_conv3d(x.bfloat16(), w.bfloat16(), padding=1)
    ref = l1_conv_brute(x.bfloat16().double(), w.bfloat16().double(), None, [1] * 3, [1] * 3, [1] * 3, 1)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=0.1)


def test_non_contiguous_inputs():
    x = torch.randn(9, 6, dtype=torch.float64).t()  # [6, 9], non-contiguous
    w = torch.randn(9, 4, dtype=torch.float64).t()
    assert not x.is_contiguous() and not w.is_contiguous()
    torch.testing.assert_close(L1F.l1_linear(x, w), l1_linear_brute(x, w))
    xc = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64).permute(0, 1, 4, 3, 2)  # [2, 5, 6, 4, 3]
    wc = torch.randn(4, 5, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(L1F.l1_conv3d(xc, wc, stride=2), l1_conv_brute(xc, wc, None, [2] * 3, [0] * 3, [1] * 3, 1))


def test_empty_batch_and_k1():
    w = torch.randn(5, 1, requires_grad=True)
    x = torch.randn(0, 1, requires_grad=True)
    y = L1F.l1_linear(x, w)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 1) and torch.equal(w.grad, torch.zeros(5, 1))
    x1 = torch.randn(8, 1, dtype=torch.float64)
    w1 = torch.randn(3, 1, dtype=torch.float64)
    torch.testing.assert_close(L1F.l1_linear(x1, w1), l1_linear_brute(x1, w1))
    xc = torch.randn(0, 2, 4, 4, 4, requires_grad=True)
    wc = torch.randn(3, 2, 3, 3, 3, requires_grad=True)
    yc = L1F.l1_conv3d(xc, wc, padding=1)
    assert yc.shape == (0, 3, 4, 4, 4)
    yc.sum().backward()
    assert xc.grad.shape == xc.shape and torch.equal(wc.grad, torch.zeros_like(wc))


def test_mixed_dtypes_promote():
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    w = torch.randn(2, 3)
    assert L1F.l1_linear(x, w).dtype == torch.float32


# ------------------------------------------------------------------ memory
class _LargestAlloc(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_reference_never_materialises_the_broadcast():
    n, k, m = 2048, 64, 128  # the broadcast would be 64 MiB in float32
    budget = 1 << 20
    set_chunk_bytes(budget)
    try:
        x = torch.randn(n, k, requires_grad=True)
        w = torch.randn(m, k, requires_grad=True)
        with _LargestAlloc() as mode:
            y = L1F.l1_linear(x, w, mix=0.5)
            y.sum().backward()
        # Nothing bigger than one chunk or the output/gradients themselves.
        assert mode.largest <= max(budget, n * m * 4, n * k * 4)
        xc = torch.randn(1, 8, 16, 16, 16, requires_grad=True)
        wc = torch.randn(8, 8, 3, 3, 3, requires_grad=True)
        with _LargestAlloc() as mode:
            L1F.l1_conv3d(xc, wc, padding=1).sum().backward()
        unfolded = 16 ** 3 * 8 * 27 * 4
        assert mode.largest < unfolded / 2
        assert mode.largest <= max(budget, xc.numel() * 4 * 2)
    finally:
        set_chunk_bytes(None)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: L1F.l1_linear(torch.randn(3, 4), torch.randn(5, 6)), r"l1_linear.*4 features.*\(3, 4\).*expects 6"),
        (lambda: L1F.l1_linear(torch.randn(3, 4), torch.randn(5, 4, 1)), r"weight must be 2-D"),
        (lambda: L1F.l1_linear(torch.randn(3, 4), torch.randn(5, 4), mix=1.5), r"mix must be in \[0, 1\]"),
        (lambda: L1F.l1_conv3d(torch.randn(2, 3, 4, 4), torch.randn(4, 3, 1, 1, 1)), r"5-D input.*\(2, 3, 4, 4\)"),
        (lambda: L1F.l1_conv1d(torch.randn(2, 3, 8), torch.randn(4, 2, 1)), r"3 channels.*expects 2"),
        (lambda: L1F.l1_conv2d(torch.randn(2, 4, 8, 8), torch.randn(3, 2, 1, 1), groups=2), r"groups=2 does not divide out_channels=3"),
        (lambda: L1F.l1_conv1d(torch.randn(2, 3, 8), torch.randn(4, 3, 1), mix=-0.1), r"mix must be in"),
        (lambda: L1F.l1_conv1d(torch.randn(2, 3, 2), torch.randn(4, 3, 5)), r"smaller than the dilated kernel"),
        (lambda: L1F.l1_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=2, padding="same"), r"not supported for strided"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_error_names_the_layer():
    with pytest.raises(ValueError, match=r"l1_linear \(encoder.fc1\)"):
        L1F.l1_linear(torch.randn(2, 3), torch.randn(4, 5), name="encoder.fc1")


# ------------------------------------------------------------------ zero sizes (every backend)
import torch.nn.functional as F  # noqa: E402

from l1fx.errors import UsageError  # noqa: E402
from l1fx.kernels import registered_backends  # noqa: E402

_CPU_BACKENDS = [n for n in ("reference", "cpu") if n in registered_backends() and registered_backends()[n].available()[0]]


@pytest.fixture(params=_CPU_BACKENDS)
def each_backend(request, monkeypatch):
    monkeypatch.setenv("L1FX_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("xs,ws", [((3, 0), (4, 0)), ((2, 3, 0), (4, 0)), ((0,), (4, 0)), ((3, 5), (0, 5)),
                                   ((0, 5), (4, 5)), ((0, 0), (0, 0))])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_zero_sizes_match_f_linear(each_backend, xs, ws, bias):
    """K = 0 gives the bias (or zeros); M = 0 and N = 0 give empty outputs; gradients are zeros, bias grad sum(g)."""
    x = torch.randn(xs, dtype=torch.float64, requires_grad=True)
    w = torch.randn(ws, dtype=torch.float64, requires_grad=True)
    b = torch.randn(ws[0], dtype=torch.float64, requires_grad=True) if bias else None
    y = L1F.l1_linear(x, w, b, mix=0.5)
    dense = F.linear(x, w, b)
    assert y.shape == dense.shape
    if xs[-1] == 0:  # an empty sum: l1 and inner product agree exactly
        assert torch.equal(y, dense)
    g = torch.randn(y.shape, dtype=torch.float64)
    ins = (x, w) + ((b,) if bias else ())
    got = torch.autograd.grad(y, ins, g)
    want = torch.autograd.grad(dense, ins, g)
    assert torch.equal(got[0], torch.zeros(xs, dtype=torch.float64)) and torch.equal(got[1], torch.zeros(ws, dtype=torch.float64))
    for a, e in zip(got, want):
        assert a.shape == e.shape
    if bias:
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


@pytest.mark.parametrize("mix", [0.0, 1.0])
def test_conv_zero_sizes(each_backend, mix):
    # No input channels (K = 0): every output is its bias, over the full output shape (F.conv2d
    # returns zero output channels here, a PyTorch quirk l1fx does not copy).
    x = torch.randn(2, 0, 5, 6, requires_grad=True)
    w = torch.randn(3, 0, 3, 2, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = L1F.l1_conv2d(x, w, b, stride=(2, 1), padding=1, mix=mix)
    assert torch.equal(y, b.detach().view(1, 3, 1, 1).expand(2, 3, 3, 7))
    g = torch.randn(y.shape)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, g.sum((0, 2, 3)))
    # Zero input channels per group, with groups.
    xg = torch.randn(1, 0, 7, requires_grad=True)
    yg = L1F.l1_conv1d(xg, torch.randn(4, 0, 3), torch.arange(4.0), groups=2)
    assert torch.equal(yg, torch.arange(4.0).view(1, 4, 1).expand(1, 4, 5))
    # No filters (M = 0): an empty output and a zero input gradient, as F.linear (F.conv3d refuses it).
    x3 = torch.randn(1, 2, 3, 4, 3, requires_grad=True)
    w3 = torch.randn(0, 2, 2, 2, 2, requires_grad=True)
    y3 = L1F.l1_conv3d(x3, w3, torch.zeros(0, requires_grad=True), padding=1, mix=mix)
    assert y3.shape == (1, 0, 4, 5, 4)
    gx3, gw3 = torch.autograd.grad(y3.sum(), (x3, w3))
    assert torch.equal(gx3, torch.zeros_like(x3)) and gw3.shape == w3.shape
    # No batch keeps working.
    x0 = torch.randn(0, 2, 5, requires_grad=True)
    y0 = L1F.l1_conv1d(x0, torch.randn(3, 2, 3), None, mix=mix)
    assert y0.shape == (0, 3, 3) and torch.autograd.grad(y0.sum(), x0)[0].shape == x0.shape


def test_zero_sizes_never_reach_a_backend(monkeypatch):
    """Answered by l1fx/ops.py: no backend needs code for them."""
    import l1fx.ops as ops_mod

    def no_backend(*a, **k):
        raise AssertionError("a zero-size op must not dispatch to a backend")

    monkeypatch.setattr(ops_mod, "get_backend", no_backend)
    x, w = torch.randn(3, 0, requires_grad=True), torch.randn(4, 0, requires_grad=True)
    L1F.l1_linear(x, w).sum().backward()
    xc, wc = torch.randn(2, 0, 4, requires_grad=True), torch.randn(3, 0, 2, requires_grad=True)
    L1F.l1_conv1d(xc, wc).sum().backward()
    assert x.grad.shape == x.shape and wc.grad.shape == wc.shape


# ------------------------------------------------------------------ meta and fake tensors: shapes only
def _shapes_only(make):
    x, w, xc, wc = make((3, 2, 5)), make((4, 5)), make((2, 4, 6, 7)), make((6, 2, 3, 3))
    for t in (x, w, xc, wc):
        t.requires_grad_()
    y = L1F.l1_linear(x, w, make((4,)), mix=0.5)
    yc = L1F.l1_conv2d(xc, wc, None, stride=2, padding=1, dilation=(1, 2), groups=2, mix=0.5)
    (y.sum() + yc.sum()).backward()
    y0 = L1F.l1_linear(make((3, 0)), make((4, 0)), make((4,)))
    ym = L1F.l1_linear(make((3, 5)), make((0, 5)))
    yk = L1F.l1_conv2d(make((2, 0, 5, 5)), make((3, 0, 3, 3)), None, padding=1)
    return [tuple(t.shape) for t in (y, yc, x.grad, w.grad, xc.grad, wc.grad, y0, ym, yk)], [y, yc, x.grad, yk]


SHAPES_ONLY = [(3, 2, 4), (2, 6, 3, 3), (3, 2, 5), (4, 5), (2, 4, 6, 7), (6, 2, 3, 3), (3, 4), (3, 0), (2, 3, 5, 5)]


def test_meta_tensors_give_shapes_only():
    shapes, outs = _shapes_only(lambda s: torch.empty(s, device="meta"))
    assert shapes == SHAPES_ONLY and all(t.device.type == "meta" for t in outs)
    # The dense layer agrees on the conv shape.
    assert SHAPES_ONLY[1] == tuple(F.conv2d(torch.empty(2, 4, 6, 7), torch.empty(6, 2, 3, 3), None, 2, 1, (1, 2), 2).shape)


def test_fake_tensors_give_shapes_only():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        shapes, outs = _shapes_only(lambda s: torch.empty(s))
    assert shapes == SHAPES_ONLY and all(isinstance(t, FakeTensor) for t in outs)


# ------------------------------------------------------------------ integer arguments
@pytest.mark.parametrize(
    "kwargs,arg",
    [(dict(stride=1.5), "stride"), (dict(stride=2.0), "stride"), (dict(stride=(1, 2.0)), "stride"),
     (dict(stride=True), "stride"), (dict(padding=0.5), "padding"), (dict(padding=(1, 1.0)), "padding"),
     (dict(padding=False), "padding"), (dict(dilation=1.0), "dilation"), (dict(dilation=(1, True)), "dilation"),
     (dict(groups=1.0), "groups"), (dict(groups=True), "groups"), (dict(stride="2"), "stride"),
     (dict(stride=(1, 1, 1)), "stride")],
)
def test_non_integer_conv_arguments_raise(kwargs, arg):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 2, 3, 3)
    with pytest.raises(UsageError, match=rf"l1_conv2d \(enc.conv\): {arg} must be") as info:
        L1F.l1_conv2d(x, w, name="enc.conv", **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    # Integer types that are not int still work (numpy ints, torch.Size).
    import numpy as np

    torch.testing.assert_close(L1F.l1_conv2d(x, w, stride=np.int64(2), padding=torch.Size([1, 1])),
                               L1F.l1_conv2d(x, w, stride=2, padding=1))


def test_bad_kernel_and_spatial_sizes_raise():
    with pytest.raises(UsageError, match=r"kernel size must be >= 1"):
        L1F.l1_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 0, 3))
    with pytest.raises(UsageError, match=r"input spatial size must be >= 1"):
        L1F.l1_conv2d(torch.randn(1, 2, 0, 5), torch.randn(3, 2, 1, 1), padding=1)
