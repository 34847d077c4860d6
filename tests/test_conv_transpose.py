"""The l1 transposed convolution: kernels against a float64 brute force over the pairs definition, MGS
gradients, backends, nn/functional, convert of a 3D U-Net decoder, source rewrite, ONNX round trip."""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import l1fx
from l1fx import layers
from l1fx.functional import l1_conv_transpose1d, l1_conv_transpose2d, l1_conv_transpose3d
from l1fx.nn import L1ConvTranspose1d, L1ConvTranspose2d, L1ConvTranspose3d, L1OutputNorm

from brute import away_from_kinks, huber1, surrogate_elems

EPS = 2.0 ** -24
FUNCTIONS = {1: l1_conv_transpose1d, 2: l1_conv_transpose2d, 3: l1_conv_transpose3d}
DENSE_F = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# (nd, input spatial, kernel, stride, padding, output_padding, dilation, groups)
CONFIGS = [
    (1, (5,), (3,), (2,), (1,), (1,), (1,), 1),
    (2, (3, 4), (2, 3), (2, 1), (0, 1), (1, 0), (1, 2), 2),
    (3, (2, 3, 2), (2, 2, 2), (2, 2, 2), (0, 0, 0), (0, 0, 0), (1, 1, 1), 1),  # the U-Net upsampling
    (3, (3, 2, 3), (2, 3, 3), (1, 2, 3), (1, 0, 2), (0, 1, 2), (2, 1, 1), 3),
]


# ---------------------------------------------------------------- brute force (independent of kernels/)
def brute(x, w, b, stride, padding, output_padding, dilation, groups, elem=None):
    """``y[n, m, o] = sum over pairs o = i*s + k*d - p and channels c of elem(x[n,c,i] - w[c,m_g,k]) (+ b)``.

    Loops over every (input position, tap); differentiable (in-place adds on a fresh tensor).
    """
    elem = elem or (lambda d: -d.abs())
    n, c = x.shape[:2]
    mg = w.shape[1]
    cg = c // groups
    out = [(i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, k, s, p, op, d in
           zip(x.shape[2:], w.shape[2:], stride, padding, output_padding, dilation)]
    y = torch.zeros(n, mg * groups, *out, dtype=x.dtype)
    for i in itertools.product(*(range(s) for s in x.shape[2:])):
        for k in itertools.product(*(range(s) for s in w.shape[2:])):
            o = [ii * s + kk * d - p for ii, kk, s, d, p in zip(i, k, stride, dilation, padding)]
            if any(oo < 0 or oo >= size for oo, size in zip(o, out)):
                continue
            for g in range(groups):
                xs = x[(slice(None), slice(g * cg, (g + 1) * cg), *i)]  # [N, Cg]
                ws = w[(slice(g * cg, (g + 1) * cg), slice(None), *k)]  # [Cg, Mg]
                y[(slice(None), slice(g * mg, (g + 1) * mg), *o)] += elem(xs[:, :, None] - ws[None]).sum(1)
    if b is not None:
        y = y + b.reshape(1, -1, *[1] * len(out))
    return y


def _data(nd, spatial, kernel, groups, offset=0.0, spread=1.0, n=2, mg=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = 2 * groups
    x = offset + spread * torch.randn(n, c, *spatial, generator=gen, dtype=torch.float64)
    w = offset + spread * torch.randn(c, mg, *kernel, generator=gen, dtype=torch.float64)
    b = spread * torch.randn(mg * groups, generator=gen, dtype=torch.float64)
    return x, w, b


def _run(x, w, b, cfg, mix=1.0):
    nd, _, _, s, p, op, d, g = cfg
    return FUNCTIONS[nd](x, w, b, s, p, op, g, d, mix=mix)


@pytest.fixture(params=["reference", "cpu"])
def backend(request, monkeypatch):
    monkeypatch.setenv("L1FX_BACKEND", request.param)
    return request.param


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}d-g{c[-1]}")
@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (1e6, 1.0), (-1e6, 1e3), (0.0, 1e6)])
def test_forward_matches_float64_brute_force(backend, cfg, offset, spread):
    nd, spatial, kernel, s, p, op, d, g = cfg
    x, w, b = _data(nd, spatial, kernel, g, offset, spread)
    want = brute(x, w, b, s, p, op, d, g)
    magnitude = brute(x, w, None, s, p, op, d, g, elem=lambda t: t.abs()) + b.abs().reshape(1, -1, *[1] * nd)
    got = _run(x.float(), w.float(), b.float(), cfg)
    assert got.shape == want.shape == DENSE_F[nd](x, w, b, s, p, op, g, d).shape
    terms = (x.shape[1] // g) * int(torch.tensor(kernel).prod())  # pairs * channels of one output, at most
    # inputs rounded to float32 first: compare with the brute force on those inputs
    want32 = brute(x.float().double(), w.float().double(), b.float().double(), s, p, op, d, g)
    bound = (terms + 2) * EPS * magnitude + EPS * want32.abs()  # + the rounding of the result
    assert ((got.double() - want32).abs() <= bound).all()
    if offset == 0 and spread == 1:
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_only_real_pairs_no_zero_stuffing(backend):
    """Stride 2: an output between two inputs' taps has fewer pairs; no |0 - w| term appears anywhere."""
    x = torch.full((1, 1, 3), 5.0)
    w = torch.tensor([[[1.0, 2.0]]])  # tap 0: |5-1| = 4, tap 1: |5-2| = 3
    y = l1_conv_transpose1d(x, w, None, stride=3)  # outputs 0..7: pairs at 0,1 | 3,4 | 6,7; 2 and 5 have none
    assert y.flatten().tolist() == [-4.0, -3.0, 0.0, -4.0, -3.0, 0.0, -4.0, -3.0]
    y = l1_conv_transpose1d(x, w, torch.tensor([0.5]), stride=3)
    assert y.flatten().tolist()[2] == 0.5  # no pairs: the bias


def test_nonfinite_values_land_where_the_formula_puts_them(backend):
    cfg = CONFIGS[1]
    nd, spatial, kernel, s, p, op, d, g = cfg
    x, w, b = _data(nd, spatial, kernel, g)
    x[0, 1, 1, 2] = float("nan")
    x[1, 3, 0, 0] = float("inf")
    w[2, 1, 0, 1] = float("-inf")
    want = brute(x, w, b, s, p, op, d, g)
    got = _run(x.float(), w.float(), b.float(), cfg).double()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isinf(got)], want[torch.isinf(want)])
    assert torch.isnan(want).any() and torch.isinf(want).any() and torch.isfinite(want).any()
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- gradients
def _mag_elems(mix):
    """Per-element functions whose gradients bound |each gradient summand| (for the error bound)."""
    def for_w(t):  # d/dw = mix*|d| + (1 - mix)
        return -(mix * 0.5 * t * t.abs() + (1 - mix) * t)

    def for_x(t):  # d/dx = mix*min(|d|, 1) + (1 - mix)
        return mix * torch.sign(t) * huber1(t) + (1 - mix) * t

    return for_x, for_w


def _grads(x, w, g_up, cfg, elem):
    nd, _, _, s, p, op, d, groups = cfg
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    (brute(x, w, None, s, p, op, d, groups, elem=elem) * g_up).sum().backward()
    return x.grad, w.grad


@pytest.mark.parametrize("cfg", CONFIGS[1:3], ids=lambda c: f"{c[0]}d-g{c[-1]}")
@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_gradients_are_the_documented_mgs_blend(backend, cfg, mix, offset):
    """mix = 0: autograd of the brute force (exact l1); mix > 0: of the surrogate whose gradient is the blend."""
    nd, spatial, kernel, s, p, op, d, groups = cfg
    gen = torch.Generator().manual_seed(1)
    x = away_from_kinks((2, 2 * groups, *spatial), "x", gen=gen) + offset
    w = away_from_kinks((2 * groups, 2, *kernel), "w", gen=gen) + offset
    x, w = x.float().double(), w.float().double()
    b = torch.randn(2 * groups, dtype=torch.float64)
    g_up = torch.randn(brute(x, w, None, s, p, op, d, groups).shape, dtype=torch.float64)
    for_x, for_w = surrogate_elems(mix)
    if mix == 0.0:
        want_x, want_w = _grads(x, w, g_up, cfg, None)
    else:
        want_x, _ = _grads(x, w, g_up, cfg, for_x)
        _, want_w = _grads(x, w, g_up, cfg, for_w)
    mag_x, mag_w = (_grads(x, w, g_up.abs(), cfg, e)[i] for i, e in enumerate(_mag_elems(mix)))

    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
    y = _run(xf, wf, bf, cfg, mix=mix)
    y.backward(g_up.float())
    terms_x = 2 * int(torch.tensor(kernel).prod())  # M_g * kvol
    terms_w = 2 * int(torch.tensor(spatial).prod())  # N * I
    assert ((xf.grad.double() - want_x).abs() <= (terms_x + 2) * EPS * mag_x + 1e-30).all()
    assert ((wf.grad.double() - want_w).abs() <= (terms_w + 2) * EPS * mag_w + 1e-30).all()
    assert torch.allclose(bf.grad.double(), g_up.sum(dim=[0] + list(range(2, g_up.dim()))), rtol=1e-5)


# ---------------------------------------------------------------- backends, dtypes, sizes
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}d-g{c[-1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_and_cpu_backends_agree(cfg, dtype, monkeypatch):
    nd, spatial, kernel, s, p, op, d, g = cfg
    x, w, b = (t.to(dtype) for t in _data(nd, spatial, kernel, g, offset=3.0))
    g_up = torch.randn(brute(x.double(), w.double(), None, s, p, op, d, g).shape).to(dtype)
    results = {}
    for name in ("reference", "cpu"):
        monkeypatch.setenv("L1FX_BACKEND", name)
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = _run(xx, ww, bb, cfg, mix=0.5)
        y.backward(g_up)
        assert y.dtype == dtype and xx.grad.dtype == dtype and ww.grad.dtype == dtype
        results[name] = [t.float() for t in (y, xx.grad, ww.grad)]
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: each side rounds its float32 result once
    for a, c in zip(results["reference"], results["cpu"]):
        assert torch.allclose(a, c, rtol=tol, atol=tol * a.abs().max().item())


def test_wide_channel_blocks_agree_with_the_brute_force(monkeypatch):
    """17 input and 18 output channels per group: the cpu kernels' 16-lane blocks with a partial block."""
    cfg = (3, (2, 3, 2), (2, 1, 2), (2, 1, 2), (1, 0, 0), (1, 0, 1), (1, 1, 1), 2)
    _, spatial, kernel, s, p, op, d, g = cfg
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 34, *spatial, generator=gen, dtype=torch.float64).float().double()
    w = torch.randn(34, 18, *kernel, generator=gen, dtype=torch.float64).float().double()
    g_up = torch.randn(brute(x, w, None, s, p, op, d, g).shape, generator=gen, dtype=torch.float64)
    want = brute(x, w, None, s, p, op, d, g)
    want_x, _ = _grads(x, w, g_up, cfg, surrogate_elems(0.5)[0])
    _, want_w = _grads(x, w, g_up, cfg, surrogate_elems(0.5)[1])
    for name in ("reference", "cpu"):
        monkeypatch.setenv("L1FX_BACKEND", name)
        xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
        y = _run(xf, wf, None, cfg, mix=0.5)
        y.backward(g_up.float())
        for got, ref in ((y, want), (xf.grad, want_x), (wf.grad, want_w)):
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), name


def test_cpu_kernels_are_chosen_and_fall_back(monkeypatch):
    from l1fx.kernels import BackendUnavailable, conv_transpose_kernels, cpu_transpose

    x = torch.randn(1, 2, 3)
    assert conv_transpose_kernels(x)[0] == "cpu"
    assert conv_transpose_kernels(x.double())[0] == "reference"  # the cpu kernels run float32/bfloat16
    import l1fx.kernels

    monkeypatch.setattr(cpu_transpose, "_state", {"error": "no compiler (test)"})
    monkeypatch.setattr(l1fx.kernels, "_transpose_warned", set())
    with pytest.warns(RuntimeWarning, match="transposed-convolution kernels are unavailable"):
        assert conv_transpose_kernels(x)[0] == "reference"
    monkeypatch.setenv("L1FX_BACKEND", "cpu")
    with pytest.raises(BackendUnavailable, match="no compiler"):
        conv_transpose_kernels(x)


def test_zero_sizes_give_bias_or_empty(backend):
    b = torch.tensor([1.0, 2.0])
    y = l1_conv_transpose2d(torch.randn(0, 3, 2, 2), torch.randn(3, 2, 2, 2), b, stride=2)
    assert y.shape == (0, 2, 4, 4)
    x = torch.randn(2, 0, 2, 2, requires_grad=True)
    w = torch.randn(0, 2, 2, 2, requires_grad=True)
    y = l1_conv_transpose2d(x, w, b)  # no input channels: an empty sum, every output is its bias
    assert y.shape == (2, 2, 3, 3) and torch.equal(y, b.view(1, 2, 1, 1).expand_as(y))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    y = l1_conv_transpose1d(torch.randn(2, 3, 4), torch.randn(3, 0, 2))  # no output channels
    assert y.shape == (2, 0, 5)


def test_functional_errors_name_the_argument():
    x, w = torch.randn(1, 4, 5), torch.randn(4, 2, 3)
    with pytest.raises(l1fx.UsageError, match="input has 3 channels"):
        l1_conv_transpose1d(torch.randn(1, 3, 5), w)
    with pytest.raises(l1fx.UsageError, match="output_padding"):
        l1_conv_transpose1d(x, w, stride=2, output_padding=2)
    with pytest.raises(l1fx.UsageError, match="padding must be an int"):
        l1_conv_transpose1d(x, w, padding="same")
    with pytest.raises(l1fx.UsageError, match="groups=3 does not divide"):
        l1_conv_transpose1d(x, w, groups=3)
    with pytest.raises(l1fx.UsageError, match=r"\(dec.up\).*bias"):
        l1_conv_transpose1d(x, w, torch.randn(3), name="dec.up")


# ---------------------------------------------------------------- modules
def test_module_keeps_dense_interface_and_output_size():
    dense = nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    l1 = L1ConvTranspose3d.from_dense(dense)
    assert not isinstance(l1, nn.ConvTranspose3d) and l1.weight.shape == dense.weight.shape
    assert l1.state_dict().keys() == dense.state_dict().keys()
    fresh = L1ConvTranspose3d(4, 6, 3, stride=2, padding=1, groups=2)
    fresh.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(1, 4, 3, 4, 3)
    for size in (None, [6, 8, 6]):
        y = fresh(x, output_size=size)
        assert y.shape == dense(x, output_size=size).shape
        assert torch.equal(y, l1_conv_transpose3d(x, dense.weight, dense.bias, 2, 1, dense._output_padding(
            x, size, [2] * 3, [1] * 3, [3] * 3, 3, [1] * 3), 2))
    for nd, cls in ((1, L1ConvTranspose1d), (2, L1ConvTranspose2d)):
        dense = getattr(nn, f"ConvTranspose{nd}d")(2, 3, 2, stride=2, dilation=2, output_padding=1, bias=False)
        assert cls.from_dense(dense)(torch.randn(1, 2, *[3] * nd)).shape == dense(torch.randn(1, 2, *[3] * nd)).shape


def test_output_norm_channels_last_is_contiguous():
    norm = L1OutputNorm(5, channel_dim=-1)
    x = torch.randn(3, 7, 5)
    y = norm(x)
    assert y.is_contiguous() and y.view(-1, 5).shape == (21, 5)  # failed before: .view on a movedim view
    want = F.batch_norm(x.reshape(-1, 5), None, None, norm.weight, norm.bias, True, 0.0, 1e-5).view_as(x)
    assert torch.allclose(y, want, atol=1e-5)
    xcl = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    y = L1OutputNorm(4, channel_dim=2)(xcl)  # keeps the input's layout
    assert y.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- convert, energy, rewrite, export
class UNet3D(nn.Module):
    """A GarmentNets/MONAI-style 3D U-Net: one down step, a ConvTranspose3d upsampling, a skip concat."""

    def __init__(self, c=2, f=4):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(c, f, 3, padding=1), nn.BatchNorm3d(f), nn.ReLU())
        self.down = nn.Sequential(nn.Conv3d(f, 2 * f, 3, stride=2, padding=1), nn.BatchNorm3d(2 * f), nn.ReLU())
        self.up = nn.ConvTranspose3d(2 * f, f, 2, stride=2)
        self.up_bn = nn.BatchNorm3d(f)
        self.dec = nn.Sequential(nn.Conv3d(2 * f, f, 3, padding=1), nn.BatchNorm3d(f), nn.ReLU())
        self.head = nn.Conv3d(f, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        u = torch.relu(self.up_bn(self.up(self.down(e))))
        return self.head(self.dec(torch.cat([u, e], 1)))


def test_convert_unet_decoder_leaves_no_dense_transposed_conv():
    model = UNet3D().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 2, 8, 8, 8)
    converted = l1fx.convert(model, 1.0, example_inputs=(x,))
    assert type(model.up) is nn.ConvTranspose3d  # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not [m for m in converted.modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)
                and not isinstance(m, l1fx.nn.L1Module)]
    assert isinstance(converted.get_submodule("up"), L1ConvTranspose3d)
    text = str(l1fx.summary(converted))
    assert "5 of 5 layers are l1" in text and "ConvTranspose3d" in text
    converted.train()  # batch statistics: eval-mode BN on untrained stats would cut every l1 output by the ReLU
    converted(x).square().sum().backward()
    converted.eval()
    assert converted.get_submodule("up").weight.grad.abs().sum() > 0
    # state_dict round trip: the converted model loads the dense keys (its own extra norm keys aside)
    sd = converted.state_dict()
    assert set(before) <= set(sd)
    again = l1fx.convert(UNet3D().eval(), 1.0, example_inputs=(x,))
    again.load_state_dict(sd, strict=True)
    assert torch.equal(again(x), converted(x))
    # MACs: the transposed layer's are the dense ConvTranspose3d's (FlopCounterMode's count), all additions
    with FlopCounterMode(display=False) as dense_count:
        model.up(torch.randn(2, 8, 4, 4, 4))
    with FlopCounterMode(display=False) as l1_count:
        converted.get_submodule("up")(torch.randn(2, 8, 4, 4, 4))
    assert l1_count.get_total_flops() == dense_count.get_total_flops() > 0
    row = [line for line in text.splitlines() if line.split()[1:2] == ["up"]][0]
    assert f"{dense_count.get_total_flops() // 2:,}" in row


def test_lazy_and_functional_transposed_convs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lazy = nn.LazyConvTranspose2d(3, 2)
            self.w = nn.Parameter(torch.randn(3, 2, 3))

        def forward(self, x, z):
            return self.lazy(x), F.conv_transpose1d(z, self.w, stride=2)

    x, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 5)
    converted = l1fx.convert(M(), 1.0, normalize=None)
    text = str(l1fx.summary(converted))
    assert "lazy module not initialised" in text  # left dense, with the reason
    assert isinstance(converted.lazy, nn.LazyConvTranspose2d)
    yz = converted(x, z)[1]
    assert torch.allclose(yz, l1_conv_transpose1d(z, converted.w, stride=2))


def test_source_rewrite_of_transposed_convs():
    from l1fx.rewrite import rewrite_source

    src = ("import torch.nn as nn\nimport torch.nn.functional as F\n"
           "up = nn.ConvTranspose3d(8, 4, kernel_size=2, stride=2)\n"
           "def f(x, w):\n    return F.conv_transpose2d(x, w, stride=2)\n")
    result = rewrite_source(src)
    assert "l1fx.nn.L1ConvTranspose3d(8, 4, kernel_size=2, stride=2)" in result.code
    assert "l1fx.functional.l1_conv_transpose2d(x, w, stride=2)" in result.code
    namespace: dict = {}
    exec(compile(result.code, "<rewritten>", "exec"), namespace)
    assert isinstance(namespace["up"], L1ConvTranspose3d)


class _Decoder(nn.Module):
    """Transposed convolutions with every option, no ReLU (it would cut the <= 0 l1 outputs)."""

    def __init__(self):
        super().__init__()
        self.a = nn.ConvTranspose3d(4, 6, 3, stride=(2, 1, 2), padding=(1, 0, 1), output_padding=(1, 0, 0),
                                    dilation=(1, 2, 1), groups=2, bias=False)
        self.b = nn.ConvTranspose3d(6, 2, 2, stride=2)

    def forward(self, x):
        return self.b(self.a(x))


def test_onnx_round_trip_in_plain_onnxruntime(tmp_path):
    import onnx
    import onnxruntime as ort

    converted = l1fx.convert(_Decoder().eval(), 1.0, normalize=None)
    x = torch.randn(2, 4, 3, 2, 3)
    result = l1fx.export_onnx(converted, x, tmp_path / "dec.onnx")
    assert result.l1_nodes == {"L1ConvTranspose": 2} and result.verified_batches == (2, 3)
    proto = onnx.load(tmp_path / "dec.onnx")
    assert {f.name for f in proto.functions} >= {"L1ConvTranspose", "L1Distance"}
    sess = ort.InferenceSession(str(tmp_path / "dec.onnx"), providers=["CPUExecutionProvider"])
    for batch in (2, 1):
        xb = torch.randn(batch, 4, 3, 2, 3)
        (got,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
        want = converted(xb).detach()
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_onnx_round_trip_of_a_calibrated_unet(tmp_path):
    converted = l1fx.convert(UNet3D().eval(), 1.0)
    x = torch.randn(2, 2, 8, 8, 8)
    for m in converted.modules():  # calibrate the norms on x (cumulative average), so the output depends on x
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    converted.train()
    with torch.no_grad():
        converted(x)
    converted.eval()
    result = l1fx.export_onnx(converted, x, tmp_path / "unet.onnx")
    assert result.l1_nodes == {"L1Conv": 4, "L1ConvTranspose": 1}
    assert result.input_dependent is True and result.max_rel_error < 1e-4


def test_registry_spec_of_the_transposed_kinds():
    for nd in (1, 2, 3):
        spec = layers.get(f"conv_transpose{nd}d")
        assert spec.unsupported is None and spec.l1_op == "l1fx::conv_transpose"
        assert spec.l1_class is getattr(l1fx.nn, f"L1ConvTranspose{nd}d")
        assert spec.l1_callable is FUNCTIONS[nd]
        assert layers.spec_for_function(DENSE_F[nd]) is spec
        assert spec.macs((2, 3, 9), (4, 3, 2), (2, 4, 5)) == 2 * 4 * 5 * 3 * 2


class _FunctionalUp(nn.Module):
    """A decoder written with F.conv_transpose1d on its own parameter: in 6 -> out 2*2 channels, groups 2."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3))

    def forward(self, x):
        return torch.relu(F.conv_transpose1d(x, self.w, None, 2, 1, 1, 2))


def test_functional_transposed_call_gets_a_norm_of_its_output_size_and_a_data_init():
    torch.manual_seed(0)
    model, x = _FunctionalUp(), torch.randn(4, 6, 5) * 3 + 50
    out = l1fx.convert(model, ratio=1.0, init="data", example_inputs=(x,))
    norms = [m for m in out.modules() if isinstance(m, L1OutputNorm)]
    assert [n.num_features for n in norms] == [4]  # w.shape[1] * groups, not w.shape[0]
    # templates at the input's scale, input channel c = row c of the [in, out/groups, k] weight
    mean = x.transpose(0, 1).reshape(6, -1).mean(1)
    torch.testing.assert_close(out.w.detach().mean((1, 2)), mean, atol=3.0, rtol=0)
    assert out(x).shape == model(x).shape


def test_data_init_of_a_transposed_module_whose_channels_do_not_divide():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose3d(5, 3, 2, stride=2), nn.ReLU())  # 5 % 3 != 0
    x = torch.randn(2, 5, 3, 3, 3) + 10
    out = l1fx.convert(model, ratio=1.0, init="data", example_inputs=(x,))
    w = out.get_submodule("0").weight.detach()
    assert w.shape == (5, 3, 2, 2, 2)
    assert (w.mean((1, 2, 3, 4)) - 10).abs().max() < 2
