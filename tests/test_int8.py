"""int8 ℓ1 layers: exact integer kernels (every ISA path), calibration invariants, quantize(), errors, fallback."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l1fx
from l1fx import layers
from l1fx.errors import BackendUnavailable, UsageError
from l1fx.kernels import int8_cpu as C
from l1fx.kernels import int8_reference as R
from l1fx.quantized import Int8L1Config, Int8L1ConvNd, Int8L1FunctionalCall, Int8L1Linear, choose_qparams

ISAS = (0, 1, 2)  # portable, AVX2, AVX-512BW (capped by what this CPU's build has: all run, at worst as a lower one)


def brute_codes(qx, qw):
    """sum_k |qx - qw| by the definition, in int64 (no chunking, no packing)."""
    return (qx.long()[:, None, :] - qw.long()[None, :, :]).abs().sum(-1)


def codes(*shape, lo=0, hi=256):
    return torch.randint(lo, hi, shape, dtype=torch.uint8)


# ------------------------------------------------------------ integer kernels
@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (7, 13, 9), (50, 64, 33), (97, 200, 17), (49, 8, 70), (3, 65536, 5)])
def test_codes_kernel_exact_on_every_isa(n, k, m):
    qx, qw = codes(n, k), codes(m, k)
    want = brute_codes(qx, qw)
    assert torch.equal(R.linear_codes(qx, qw), want)
    packed = R.pack_weight(qw)
    for isa in ISAS:
        got = C.linear_codes(qx, packed, m, isa=isa)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want), isa


def test_saturated_codes_reach_the_bound():
    # |0 - 255| everywhere: the largest sum a layer can have, 255 * K (K = 65536 here: 16,711,680)
    k = 65536
    qx, qw = torch.zeros(3, k, dtype=torch.uint8), torch.full((5, k), 255, dtype=torch.uint8)
    for isa in ISAS:
        got = C.linear_codes(qx, R.pack_weight(qw), 5, isa=isa)
        assert bool((got == 255 * k).all())
        back = C.linear_codes(qw, R.pack_weight(qx), 3, isa=isa)  # the other way round too
        assert bool((back == 255 * k).all())


def test_int64_output_past_the_int32_bound():
    # 255 * K >= 2^31 from K = INT32_MAX_K + 1 on: the kernel switches to int64 and stays exact.
    k = R.INT32_MAX_K + 1
    assert 255 * R.INT32_MAX_K < 2**31 <= 255 * k
    qx, qw = torch.zeros(1, k, dtype=torch.uint8), torch.full((1, k), 255, dtype=torch.uint8)
    got = C.linear_codes(qx, R.pack_weight(qw), 1)
    assert got.dtype == torch.int64 and int(got) == 255 * k


@pytest.mark.parametrize("bias", [True, False])
def test_float_path_bit_identical_to_reference(bias):
    # Quantisation inside the kernel, dequantisation bias + -(s * acc): the same float32 operations as torch.
    g = torch.Generator().manual_seed(1)
    for n, k, m in [(7, 13, 9), (61, 64, 40), (5, 300, 3)]:
        x = torch.randn(n, k, generator=g) * 4 + 1
        x[0, 3] = 1e30  # saturates at 255
        x[1, 0] = -float("inf")  # saturates at 0
        x[2, 5] = float("nan")  # its row is NaN
        b = torch.randn(m, generator=g) if bias else None
        qw = codes(m, k)
        s, z = 0.037, 101
        want = R.linear(x, qw, s, z, b)
        assert bool(torch.isnan(want[2]).all()) and not bool(torch.isnan(want[[0, 1]]).any())
        for isa in ISAS:
            got = C.linear(x, R.pack_weight(qw), m, s, z, b, isa=isa)
            assert torch.equal(torch.isnan(got), torch.isnan(want)), isa
            assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5)), isa
        # and the integer part is the brute force on the codes
        qx = R.quantize_codes(x, s, z)
        brute = R.dequantize(brute_codes(qx, qw), s, b)
        assert torch.equal(want[[0, 1, 3, 4]], brute[[0, 1, 3, 4]])


def test_quantize_codes_kernel_matches_reference():
    x = torch.cat([torch.randn(1000) * 10, torch.tensor([0.5, 1.5, 2.5, -0.5, 1e30, -1e30, float("inf"),
                                                         -float("inf"), float("nan")]) * 0.1])
    for s, z in [(0.1, 0), (0.1, 128), (0.013, 255), (1.0, 7)]:
        want = R.quantize_codes(x, s, z)
        got, nans = C.quantize(x, s, z)
        assert torch.equal(got, want) and nans == 1
    # round half to even on the grid (x / s: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2)
    exact = R.quantize_codes(torch.tensor([0.0, 0.25, 0.75, 1.25]), 0.5, 10)
    assert exact.tolist() == [10, 10, 12, 12]


# ------------------------------------------------------------ grid choice
def test_choose_qparams_invariants():
    for lo, hi in [(-1.0, 3.0), (0.0, 5.0), (2.0, 7.0), (-9.0, -1.0), (-1e-3, 1e-3), (0.0, 0.0)]:
        s, z = choose_qparams(lo, hi)
        assert s > 0 and 0 <= z <= 255 and float(torch.tensor(s, dtype=torch.float32)) == s
        a, b = min(lo, 0.0), max(hi, 0.0)
        grid = torch.tensor([a, b, 0.0])
        q = R.quantize_codes(grid, s, z)
        back = (q.double() - z) * s
        assert bool(((back - grid.double()).abs() <= s / 2 * (1 + 1e-6)).all()), (lo, hi)
        assert int(R.quantize_codes(torch.tensor([0.0]), s, z)) == z  # 0 is a code exactly
    with pytest.raises(UsageError, match="finite"):
        choose_qparams(0.0, float("inf"))


# ------------------------------------------------------------ quantize()
def _mlp_l1():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    return l1fx.convert(m, normalize=None).eval()


def test_quantize_leaves_the_input_model_untouched():
    model = _mlp_l1()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    q = l1fx.quantize(model, [(torch.randn(8, 6),) for _ in range(2)])
    assert q is not model and model.training and not q.training
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, Int8L1Linear) for m in q.modules()) == 2


def test_calibration_grid_covers_weights_and_observed_inputs():
    model = _mlp_l1()
    batches = [(torch.randn(32, 6) * 3 + 1,) for _ in range(3)]
    q = l1fx.quantize(model, batches)
    first = q.get_submodule("0")
    s, z = first.qparams()
    w = model.get_submodule("0").weight.detach()
    xs = torch.cat([b[0] for b in batches])
    lo, hi = min(float(w.min()), float(xs.min()), 0.0), max(float(w.max()), float(xs.max()), 0.0)
    assert (s, z) == choose_qparams(lo, hi)
    deq = (first.weight_codes.double() - z) * s
    assert float((deq - w.double()).abs().max()) <= s / 2 * (1 + 1e-6)
    qx = R.quantize_codes(xs, s, z)
    assert float(((qx.double() - z) * s - xs.double()).abs().max()) <= s / 2 * (1 + 1e-6)
    # percentile observer: a narrower (or equal) input range than min/max
    qp = l1fx.quantize(model, batches, Int8L1Config(observer="percentile", percentile=99.0))
    assert qp.get_submodule("0").qparams()[0] <= s


def test_quantized_layer_is_the_integer_formula_and_close_to_fp32():
    model = _mlp_l1()
    x = torch.randn(20, 6)
    q = l1fx.quantize(model, [(x,)])
    layer = q.get_submodule("0")
    s, z = layer.qparams()
    want = R.dequantize(brute_codes(R.quantize_codes(x, s, z), layer.weight_codes), s, layer.bias)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
        y, yq = model(x), q(x)
    assert float((y - yq).abs().max()) <= 0.02 * float(y.abs().max())


def _brute_conv(x, layer, stride, padding, dilation, groups):
    """The int8 conv by definition: codes as float64 (exact integers), zero-point padded, fp32-free ℓ1 conv."""
    s, z = layer.qparams()
    nd = x.dim() - 2
    qx = R.quantize_codes(x, s, z).double()
    pads = [p for i in reversed(range(nd)) for p in (padding[i], padding[i])]
    qx = F.pad(qx, pads, value=float(z))
    acc = -l1fx.functional.l1_conv(qx, layer.weight_codes.double(), None, stride, 0, dilation, groups)
    bias = layer.bias.view(1, -1, *([1] * nd)) if layer.bias is not None else None
    return R.dequantize(acc.round().long(), s, bias)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", [
    # (dense layer, input shape)
    (lambda: nn.Conv1d(3, 8, 1), (2, 3, 17)),
    (lambda: nn.Conv1d(4, 6, 3, padding=2, groups=2, dilation=2), (2, 4, 19)),
    (lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 3, 9, 7)),
    (lambda: nn.Conv3d(2, 4, 3, padding=1), (1, 2, 5, 4, 6)),
])
def test_int8_conv_exact_against_brute_force(case, backend, monkeypatch):
    make, shape = case
    dense = make()
    l1 = layers.build_replacement(dense)
    x = torch.randn(*shape) * 2
    w = l1.weight.detach()
    s, z = choose_qparams(min(float(x.min()), float(w.min())), max(float(x.max()), float(w.max())))
    q = layers.build_replacement(l1, "int8", scale=s, zero_point=z)
    assert isinstance(q, Int8L1ConvNd)
    want = _brute_conv(x, q, q.stride, q.padding, q.dilation, q.groups)
    xn = x.clone()
    xn[0, 0, 1] = float("nan")  # NaN reaches exactly the outputs whose patch holds it
    with torch.no_grad():
        ref_nan = torch.isnan(l1(xn))
    monkeypatch.setenv("L1FX_BACKEND", backend)
    got = q(x)
    assert got.shape == want.shape and torch.equal(got, want)
    got = q(xn)
    assert torch.equal(torch.isnan(got), ref_nan)


def test_functional_call_is_quantised():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 7))
            self.b = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return F.linear(x, self.w, self.b)

    model = l1fx.convert(Net(), normalize=None).eval()
    x = torch.randn(9, 7)
    q = l1fx.quantize(model, [(x,)])
    calls = [m for m in q.modules() if isinstance(m, Int8L1FunctionalCall)]
    assert len(calls) == 1 and set(q.state_dict()) >= set(model.state_dict())
    with torch.no_grad():
        y, yq = model(x), q(x)
    assert float((y - yq).abs().max()) <= 0.02 * float(y.abs().max())


def test_state_dict_round_trip_repacks():
    model = _mlp_l1()
    q = l1fx.quantize(model, [(torch.randn(8, 6),)])
    q2 = l1fx.quantize(model, [(torch.randn(8, 6) * 5,)])
    q2.load_state_dict(q.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(q(x), q2(x))


# ------------------------------------------------------------ errors
def test_clear_errors():
    model = _mlp_l1()
    with pytest.raises(UsageError, match="no l1 layers"):
        l1fx.quantize(nn.Sequential(nn.Linear(2, 2)), [(torch.randn(1, 2),)])
    with pytest.raises(UsageError, match="calibration_inputs is empty"):
        l1fx.quantize(model, [])
    with pytest.raises(UsageError, match="iterable of forward-argument tuples"):
        l1fx.quantize(model, torch.randn(3, 6))
    with pytest.raises(UsageError, match="observer"):
        Int8L1Config(observer="mse")
    with pytest.raises(UsageError, match="skip names no layer"):
        l1fx.quantize(model, [(torch.randn(1, 6),)], Int8L1Config(skip=("nope",)))
    with pytest.raises(UsageError, match="config must be an Int8L1Config"):
        l1fx.quantize(model, [(torch.randn(1, 6),)], {"observer": "minmax"})
    q = l1fx.quantize(model, [(torch.randn(4, 6),)])
    with pytest.raises(UsageError, match=r"expected input \[\.\.\., 6\]"):
        q(torch.randn(2, 5))
    with pytest.raises(UsageError, match="floating-point"):
        q(torch.ones(2, 6, dtype=torch.long))
    skipped = l1fx.quantize(model, [(torch.randn(4, 6),)], Int8L1Config(skip=("2",)))
    assert isinstance(skipped.get_submodule("0"), Int8L1Linear)
    assert not isinstance(skipped.get_submodule("2"), Int8L1Linear)


def test_unreached_layer_stays_float_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x)

    model = Branchy()
    model.a, model.b = layers.build_replacement(model.a), layers.build_replacement(model.b)
    with pytest.warns(RuntimeWarning, match="layer b was not run"):
        q = l1fx.quantize(model, [(torch.randn(2, 3),)])
    assert isinstance(q.a, Int8L1Linear) and not isinstance(q.b, Int8L1Linear)


# ------------------------------------------------------------ build, cache, fallback
@pytest.fixture
def fresh_int8_state():
    C.reset()
    import l1fx.quantized as qmod

    qmod._warned = False
    yield
    C.reset()
    qmod._warned = False


def test_kernel_is_built_once_and_cached(monkeypatch, tmp_path, fresh_int8_state):
    monkeypatch.setenv("L1FX_CACHE_DIR", str(tmp_path))
    info = C.build_info()
    assert info["loaded"] and info["isa"] in C.ISA_NAMES.values()
    lib = tmp_path / next(p.name for p in tmp_path.iterdir() if p.name.startswith("l1fx_int8-")) / "libl1fx_int8.so"
    assert str(lib) == info["path"]
    mtime = lib.stat().st_mtime_ns
    C.reset()
    assert C.build_info()["path"] == str(lib) and lib.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_missing_compiler_falls_back_to_reference(monkeypatch, tmp_path, fresh_int8_state):
    model = _mlp_l1()
    x = torch.randn(5, 6)
    q = l1fx.quantize(model, [(x,)])
    want = q(x)
    C.reset()
    monkeypatch.setenv("L1FX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-l1fx")
    with pytest.warns(RuntimeWarning, match="int8 cpu kernels unavailable") as record:
        got = q(x)
        q(x)
    assert len([r for r in record if "int8" in str(r.message)]) == 1  # once, not per call
    assert torch.equal(got, want)  # the reference gives the same bits
    monkeypatch.setenv("L1FX_BACKEND", "cpu")
    with pytest.raises(BackendUnavailable, match="no C\\+\\+ compiler"):
        q(x)
    monkeypatch.setenv("L1FX_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="'cpu' and 'reference'"):
        q(x)


# ------------------------------------------------------------ energy
def test_energy_report_books_int8_layers_as_int8_additions():
    from l1fx.energy import HOROWITZ_45NM_PJ, energy_report as fp32_report
    from l1fx.quantized import energy_report

    model = _mlp_l1()
    x = torch.randn(3, 6)
    q = l1fx.quantize(model, [(x,)])
    fp, i8 = fp32_report(model, x), energy_report(q, x)
    assert i8.total["mul"] == 0 and i8.total["add"] == fp.total["add"] == 2 * 3 * (6 * 16 + 16 * 4)
    assert i8.total["energy_pJ"] == pytest.approx(i8.total["add"] * HOROWITZ_45NM_PJ["int8"]["add"])
    assert fp.total["energy_pJ"] / i8.total["energy_pJ"] == pytest.approx(0.9 / 0.03)
    custom = energy_report(q, x, table={"fp32": {"add": 1.0, "mul": 2.0}, "int8": {"add": 0.5, "mul": 1.0}})
    assert custom.total["energy_pJ"] == pytest.approx(custom.total["add"] * 0.5)


def test_pointwise_channels_first_and_rows_paths_agree(monkeypatch):
    # [N, C, L] contiguous input takes the channels-first kernel (AVX-512BW); a non-contiguous one the rows path
    l1 = layers.build_replacement(nn.Conv1d(37, 70, 1))
    x = torch.randn(3, 300, 37).transpose(1, 2) * 2  # non-contiguous
    x[1, 2, 5] = float("nan")
    w = l1.weight.detach()
    finite = x.nan_to_num()
    s, z = choose_qparams(min(float(finite.min()), float(w.min())), max(float(finite.max()), float(w.max())))
    q = layers.build_replacement(l1, "int8", scale=s, zero_point=z)
    rows_path, cf_path = q(x), q(x.contiguous())
    monkeypatch.setenv("L1FX_BACKEND", "reference")
    want = q(x)
    for got in (rows_path, cf_path):
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(want[1, :, 5]).all())
        assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5))


def test_calibration_batches_from_a_dataloader_and_a_clear_error_for_bad_ones():
    """A DataLoader yields lists: they are the forward's arguments like tuples; a batch the model rejects
    (labels left in, say) is one UsageError naming the batch, not a traceback from inside the model."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = l1fx.convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), pretrained=True)
    x = torch.randn(9, 4)
    q = l1fx.quantize(model, DataLoader(TensorDataset(x), batch_size=3))
    assert q(x).shape == (9, 2)
    with pytest.raises(l1fx.UsageError, match="failed on calibration batch 0 .2 argument"):
        l1fx.quantize(model, DataLoader(TensorDataset(x, torch.zeros(9)), batch_size=3))
