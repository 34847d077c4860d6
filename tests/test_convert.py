"""l1fx.convert on the model zoo: the fx pass pipeline end to end."""
import copy
import os
import sys
import time
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
from zoo import ZOO  # noqa: E402

import l1fx.nn as l1nn  # noqa: E402
from l1fx import passes  # noqa: E402
from l1fx.convert import ConvertConfig, convert, summary  # noqa: E402

NAMES = sorted(ZOO)


@pytest.fixture(autouse=True)
def _one_thread():
    # Two xdist workers on two shared cores: more intra-op threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quiet_convert(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, *args, **kwargs)


def _make(name, batch=2):
    torch.manual_seed(0)
    ctor, make_inputs = ZOO[name]
    return ctor(), make_inputs(batch=batch)


def _run(model, inputs, train=False):
    model.train(train)
    torch.manual_seed(1)  # FPS draws its first point at random
    return model(*inputs)


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------ weight-reading kernel counter
class WeightKernelCounter(TorchDispatchMode):
    """Counts convolution/matmul kernels that read a (view of a) model parameter."""

    KERNELS = {"convolution", "conv1d", "conv2d", "conv3d", "_convolution", "mkldnn_convolution", "mm", "addmm",
               "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot", "einsum", "_mkldnn_linear"}

    def __init__(self, model):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aten" and func.overloadpacket.__name__ in self.KERNELS:
            flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
            if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages for t in flat):
                self.count += 1
        return func(*args, **kwargs)


def _weight_kernels(model, inputs):
    with torch.no_grad(), WeightKernelCounter(model) as counter:
        _run(model, inputs)
    return counter.count


# ------------------------------------------------------------------ per-model properties
@pytest.mark.parametrize("name", NAMES)
def test_ratios_remove_weight_kernels_and_keep_shapes(name):
    model, x = _make(name)
    with torch.no_grad():
        ref = [t.shape for t in _tensors(_run(model, x))]
    counts = []
    for ratio in (0.0, 1 / 3, 2 / 3, 1.0):
        converted = _quiet_convert(model, ratio)
        counts.append(_weight_kernels(converted, x))
        with torch.no_grad():
            assert [t.shape for t in _tensors(_run(converted, x))] == ref, (name, ratio)
    assert counts[0] > 0, "the dense model must use conv/matmul kernels on its weights"
    assert counts[-1] == 0, f"{name}: at ratio 1.0 a conv/matmul kernel still reads a weight ({counts})"
    assert all(a >= b for a, b in zip(counts, counts[1:])), f"{name}: counts must not increase: {counts}"


@pytest.mark.parametrize("name", NAMES)
def test_conversion_keeps_original_and_state_dict_and_gradients(name):
    model, x = _make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    converted = _quiet_convert(model, 1.0, example_inputs=x)

    # input model untouched
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())

    # every original key survives with its shape; new keys are the output normalisations only
    after = converted.state_dict()
    for k, v in before.items():
        assert k in after and after[k].shape == v.shape, k
    assert all(".l1fx_norm." in k for k in set(after) - set(before))
    converted.load_state_dict(before, strict=False)  # dense weights load into the l1 model

    # gradients: whatever got a gradient in the dense model gets one now, and so do new parameters
    def grads(m):
        m.zero_grad(set_to_none=True)
        sum(t.float().sum() for t in _tensors(_run(m, x, train=True))).backward()
        return {n for n, p in m.named_parameters() if p.grad is not None and torch.isfinite(p.grad).all()}

    dense_grads = grads(copy.deepcopy(model))
    l1_grads = grads(converted)
    assert dense_grads <= l1_grads, sorted(dense_grads - l1_grads)
    new_params = {n for n, _ in converted.named_parameters()} - set(before)
    for n in new_params:
        layer = n.split(".l1fx_norm.")[0]
        if any(d.startswith(layer + ".") or d == layer for d in dense_grads) or layer.startswith("l1fx_calls"):
            assert n in l1_grads, n


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_save_load_round_trip(name, tmp_path):
    model, x = _make(name)
    converted = _quiet_convert(model, 2 / 3)
    with torch.no_grad():
        ref = _tensors(_run(converted, x))
    path = tmp_path / f"{name}.pt"
    torch.save(converted, path)
    loaded = torch.load(path, weights_only=False)
    for clone in (copy.deepcopy(converted), loaded):
        assert set(clone.state_dict()) == set(converted.state_dict())
        assert summary(clone).converted == summary(converted).converted
        with torch.no_grad():
            out = _tensors(_run(clone, x))
        assert all(torch.allclose(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("name", NAMES)
def test_converting_twice_changes_nothing(name):
    model, x = _make(name)
    for ratio in (1 / 3, 1.0):
        once = _quiet_convert(model, ratio)
        twice = _quiet_convert(once, ratio)
        assert set(twice.state_dict()) == set(once.state_dict()), ratio
        assert [(n, type(m).__name__) for n, m in twice.named_modules()] == \
               [(n, type(m).__name__) for n, m in once.named_modules()], ratio
        assert summary(twice).converted == summary(once).converted
        twice.load_state_dict(once.state_dict())
        with torch.no_grad():
            assert all(torch.allclose(a, b) for a, b in zip(_tensors(_run(twice, x)), _tensors(_run(once, x))))


# ------------------------------------------------------------------ tracing fallbacks
def test_pointnet2_traces_with_opaque_helpers_and_converts_fast():
    model, _ = _make("pointnet2_ssg")
    start = time.perf_counter()
    converted = convert(model)  # no warning: nothing is swapped, helpers become graph nodes
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"PointNet++ conversion took {elapsed:.2f} s"
    info = summary(converted)
    assert isinstance(converted, fx.GraphModule) and info.tracing == "full"
    assert {q.rsplit(".", 1)[1] for q in info.opaque_functions} >= {"farthest_point_sample", "index_points"}
    units = {tuple(r.name for r in info.rows if r.unit == u) for u in range(info.units)}
    assert ("sa1.mlp_convs.0", "sa1.mlp_convs.1", "sa1.mlp_convs.2") in units
    assert ("fc1", "fc2", "fc3") in units
    assert type(converted.sa1).__name__ == "PointNetSetAbstraction"  # real hierarchy kept


def test_pointnet_tnets_become_leaves_converted_by_swap():
    model, x = _make("pointnet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(model, example_inputs=x)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("kept as one graph node" in m and "TraceError" in m for m in messages)
    assert "'feat.stn' (STN3d)" in messages[0] and "'feat.fstn' (STNkd)" in messages[1]
    info = summary(converted)
    assert set(info.leaves) == {"feat.stn", "feat.fstn"} and info.tracing == "partial"
    assert isinstance(converted.feat.stn.conv1, l1nn.L1Conv1d)
    rows = {r.name: r for r in info.rows}
    assert rows["feat.stn.conv1"].region == "feat.stn" and rows["feat.conv1"].traced
    # T-Net fc3 feeds no norm: the inserted one is applied by a hook; conv1 is followed by bn1
    assert rows["feat.stn.fc3"].norm == "inserted (hook)"
    assert rows["feat.stn.conv1"].norm.startswith("followed")
    assert "swapped (untraced) module feat.stn" in str(info)


def test_shape_dependent_model_falls_back_to_whole_model_swap():
    model, x = _make("shape_dependent")
    with pytest.warns(UserWarning, match=r"cannot trace ShapeDependentNet\.forward.*whole model"):
        converted = convert(model)
    info = summary(converted)
    assert type(converted) is type(model) and info.whole_model_error is not None
    assert "registration order" in info.order_note
    assert all(isinstance(m, l1nn.L1Module) for m in (converted.stem_xyz, converted.mlp[0], converted.fc))
    # a batch with colour channels takes the other stem, also converted
    rgb = torch.randn(2, 6, 16)
    assert _run(converted, (rgb,)).shape == (2, 5)


def _group_by_size(x, npoint):
    # a private helper building a tensor from a traced size, like FPS
    B = x.shape[0]
    return x[:, :, :npoint] + torch.zeros(B, 1, npoint)


class _Grouper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 1)

    def forward(self, x):
        return self.conv(_group_by_size(x, 4))


class _Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        for i in range(x.shape[0]):  # loop over the batch: this module cannot be traced
            x = x + 0 * i
        return self.conv(x)


class _TwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.sample = _Sampler()
        self.group = _Grouper()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.group(self.sample(x)).max(-1)[0])


def test_failures_are_narrowed_to_the_helper_and_the_smallest_module():
    model = _TwoStage()
    with pytest.warns(UserWarning, match=r"'sample' \(_Sampler\)"):
        converted = convert(model)
    info = summary(converted)
    assert list(info.leaves) == ["sample"]
    assert [q.rsplit(".", 1)[1] for q in info.opaque_functions] == ["_group_by_size"]
    rows = {r.name: r for r in info.rows}
    assert rows["group.conv"].traced and rows["sample.conv"].region == "sample"
    assert all(isinstance(converted.get_submodule(n), l1nn.L1Module) for n in ("sample.conv", "group.conv", "head"))
    assert converted(torch.randn(2, 4, 6)).shape == (2, 3)


def test_functional_calls_on_parameters_are_rewritten():
    model, x = _make("rawparam")
    converted = convert(model)
    calls = [m for m in converted.modules() if isinstance(m, l1nn.L1FunctionalCall)]
    assert sorted(m.weight_name for m in calls) == ["cls_weight", "head.weight", "w1", "w2"]
    assert all(m.weight is converted.get_parameter(m.weight_name) for m in calls)
    assert sorted(summary(converted).l1_weight_names) == ["cls_weight", "head.weight", "w1", "w2"]
    code = converted.code
    assert "F.linear" not in code and "torch.conv1d" not in code and "torch._C._nn.linear" not in code


# ------------------------------------------------------------------ selection
def _unit_order(info):
    return [[r.name for r in info.rows if r.unit == u] for u in range(info.units)]


def test_depth_strategy_takes_units_nearest_the_inputs():
    model, _ = _make("resnet3d")
    info = summary(_quiet_convert(model, 0.4))  # 5 units -> 2
    assert info.converted == ["conv1", "layer1.conv1"]
    assert _unit_order(info)[0] == ["conv1"] and _unit_order(info)[-1] == ["fc"]


def test_energy_strategy_takes_most_macs_first():
    model, x = _make("resnet3d")
    info = summary(_quiet_convert(model, 0.2, strategy="energy", example_inputs=x))
    rows = [r for r in info.rows if r.unit is not None]
    assert info.converted == [max(rows, key=lambda r: r.macs).name] == ["layer1.conv1"]


def test_include_exclude_and_filter_fn():
    model, _ = _make("pointnet2_ssg")
    assert summary(_quiet_convert(model, include="sa1")).converted == [f"sa1.mlp_convs.{i}" for i in range(3)]
    info = summary(_quiet_convert(model, exclude=["fc*", "sa3.*"]))
    assert not any(n.startswith(("fc", "sa3")) for n in info.converted) and len(info.converted) == 6
    only_linear = _quiet_convert(model, include=lambda name, m: isinstance(m, nn.Linear))
    assert summary(only_linear).converted == ["fc1", "fc2", "fc3"]
    with pytest.warns(UserWarning, match=r"'nope\*' match no layer"):
        convert(model, include=["sa1", "nope*"])


def test_normalize_none_inserts_nothing_and_auto_inserts_where_needed():
    model, x = _make("voxnet")
    plain = convert(model, normalize=None)
    assert not any(isinstance(m, l1nn.L1OutputNorm) for m in plain.modules())
    auto = convert(model)
    norms = [n for n, m in auto.named_modules() if isinstance(m, l1nn.L1OutputNorm)]
    assert norms == ["body.0.l1fx_norm", "body.3.l1fx_norm", "head.0.l1fx_norm", "head.3.l1fx_norm"]
    assert "l1fx_norm" in auto.code
    # standardised outputs: the head's logits are no longer huge negative numbers
    auto.train()
    out = auto(x[0].repeat(4, 1, 1, 1, 1) + torch.rand(8, 1, 16, 16, 16))
    assert out.abs().mean() < 10


def test_skipped_layers_are_reported_and_circular_padding_converts():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.circ = nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")
            self.up = nn.ConvTranspose1d(4, 4, 2, stride=2)
            self.lazy = nn.LazyLinear(5)
            self.ints = nn.Linear(4, 4).to(torch.float64)

        def forward(self, x):
            y = self.up(self.circ(x))
            return self.lazy(y.mean(-1)), self.ints(y.mean(-1).double())

    model = Odd()
    converted = _quiet_convert(model)
    info = summary(converted)
    assert isinstance(converted.circ, l1nn.L1Conv1d) and converted.circ.padding_mode == "circular"
    assert isinstance(converted.up, l1nn.L1ConvTranspose1d) and "up" not in info.skipped
    assert "lazy" in info.skipped["lazy"]
    assert isinstance(converted.ints, l1nn.L1Linear)  # float64 is supported
    out = converted(torch.randn(2, 3, 8))
    assert out[0].shape == (2, 5)


# ------------------------------------------------------------------ errors and options
@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "half", True])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="ratio must be a number in \\[0, 1\\]"):
        convert(nn.Linear(2, 2), ratio)


def test_bad_options_raise_clearly():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        convert(model, strategy="random")
    with pytest.raises(ValueError, match="needs example_inputs"):
        convert(model, strategy="energy")
    with pytest.raises(ValueError, match="normalize must be 'auto' or None"):
        convert(model, normalize="batch")
    with pytest.raises(TypeError, match="include must be a pattern"):
        convert(model, include=3)
    with pytest.raises(RuntimeError, match="running Linear on example_inputs failed.*TypeError|RuntimeError"):
        convert(model, example_inputs=(torch.randn(2, 3),))
    with pytest.raises(ValueError, match="was not produced by l1fx.convert"):
        summary(model)


def test_model_without_candidates_warns_and_returns_an_unchanged_copy():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match="no Linear/Conv1d/2d/3d layer"):
        out = convert(model)
    assert out is not model and type(out) is type(model)
    x = torch.randn(4, 3)
    model.eval(), out.eval()
    assert torch.equal(out(x), model(x))


def test_inplace_converts_the_given_model():
    model, x = _make("dgcnn")
    converted = _quiet_convert(model, inplace=True)
    assert isinstance(model.linear1, l1nn.L1Linear) and isinstance(model.conv1[0], l1nn.L1Conv2d)
    assert converted.conv1 is model.conv1


def test_inplace_on_an_untraceable_model_returns_it():
    model, x = _make("shape_dependent")
    assert _quiet_convert(model, inplace=True) is model
    assert isinstance(model.fc, l1nn.L1Linear) and summary(model).whole_model_error


def test_layer_names_reach_error_messages():
    model, _ = _make("rawparam")
    converted = convert(model)
    with pytest.raises(ValueError, match=r"w1"):
        converted(torch.randn(2, 4, 16))  # wrong channel count


def test_user_pipeline_with_an_extra_pass():
    model, x = _make("dgcnn")

    def keep_first_unit_dense(state):
        for c in min(state.units, key=lambda u: u.order).members:
            c.selected = False
        return state

    pipeline = passes.DEFAULT_PIPELINE[:3] + (keep_first_unit_dense,) + passes.DEFAULT_PIPELINE[3:]
    state = passes.run_pipeline(model, ConvertConfig(ratio=1.0), pipeline)
    assert type(state.result.conv1[0]) is nn.Conv2d and isinstance(state.result.conv2[0], l1nn.L1Conv2d)
    assert all(state.graph.has_node(c.node) for c in state.candidates if c.traced and c.node)


# ------------------------------------------------------------------ initial l1 weights (init=...)
def _raw_l1_outputs(model, inputs):
    """Raw l1 output (before any inserted normalisation) of every l1 layer reached, in train mode."""
    calls = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, l1nn.L1Module)}
    handles = [m.register_forward_pre_hook(lambda m, a, k: calls.setdefault(m, (a, k)), with_kwargs=True)
               for m in layers.values()]
    try:
        with torch.no_grad():
            _run(model, inputs, train=True)
            return {n: (m, m.forward(*calls[m][0], **calls[m][1])) for n, m in layers.items() if m in calls}
    finally:
        for h in handles:
            h.remove()


def _channel_spread(model, inputs):
    """Per l1 layer: std across output channels / mean |y|, averaged over positions."""
    spread = {}
    for n, (m, y) in _raw_l1_outputs(model, inputs).items():
        linear = m.op == "linear" if isinstance(m, l1nn.L1FunctionalCall) else isinstance(m, l1nn.L1Linear)
        y = y.movedim(-1 if linear else 1, -1)
        spread[n] = (y.std(-1) / y.abs().mean(-1)).mean().item()
    return spread


def _l1_weight_ids(model):
    return {id(p) for n, p in model.named_parameters() if n in summary(model).l1_weight_names}


@pytest.mark.parametrize("name", ["pointnet2_ssg", "shape_dependent"])
def test_pretrained_keeps_the_dense_weights_exactly(name):
    # (the default is init="auto" now, which re-initialises l1 weights so that they train: issue 21)
    model, x = _make(name)
    for converted in (_quiet_convert(model, pretrained=True), _quiet_convert(model, init="dense", example_inputs=x)):
        after = converted.state_dict()
        assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["pointnet", "pointnet2_ssg", "rawparam", "shape_dependent"])
def test_data_init_changes_only_l1_weights_and_spreads_the_channels(name):
    # pointnet: partly traced (T-Nets swapped); rawparam: functional calls; shape_dependent: whole-model swap
    model, x = _make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _quiet_convert(model, example_inputs=x, init="dense")
    data = _quiet_convert(model, example_inputs=x, init="data")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched
    assert not any(m._forward_pre_hooks for m in data.modules())  # the recording hooks are gone

    # same keys and shapes; only l1 weights differ (buffers such as running statistics were restored)
    sd_dense, sd_data = dense.state_dict(), data.state_dict()
    assert {k: v.shape for k, v in sd_dense.items()} == {k: v.shape for k, v in sd_data.items()}
    l1_keys = set(summary(data).l1_weight_names)
    unreached = {"stem_xyzrgb.weight"} if name == "shape_dependent" else set()  # a 3-channel batch skips it
    for k in sd_dense:
        same = torch.equal(sd_dense[k], sd_data[k])
        assert same == (k not in l1_keys or k in unreached), k
    note = [n for n in summary(data).notes if n.startswith("init='data'")]
    assert len(note) == 1 and f"{len(l1_keys) - len(unreached)} l1 weight(s)" in note[0]
    assert ("stem_xyzrgb" in note[0]) == bool(unreached)

    # the point of it: output channels no longer all equal -||x||_1 (measured: every layer's spread
    # rises, the mean over layers by 1.65x (PointNet++) to 1.84x (rawparam) on these batches)
    spread_dense, spread_data = _channel_spread(dense, x), _channel_spread(data, x)
    assert spread_dense.keys() == spread_data.keys() and spread_dense
    assert all(spread_data[n] > spread_dense[n] for n in spread_dense), (spread_dense, spread_data)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(spread_data) > 1.5 * mean(spread_dense)


def test_data_init_lets_gradients_reach_the_first_layers():
    model, x = _make("pointnet2_ssg")

    def first_layer_grad(converted):
        sum(t.sum() for t in _tensors(_run(converted, x, train=True))).backward()
        return converted.sa1.mlp_convs[0].weight.grad.pow(2).mean().sqrt().item()

    dense, data = (first_layer_grad(_quiet_convert(model, example_inputs=x, init=i)) for i in ("dense", "data"))
    assert data > 1e6 * dense, (dense, data)  # measured: RMS 1.6e-17 (dense) vs 34 (data)


def test_data_init_matches_input_statistics_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.BatchNorm1d(64))
    x = torch.randn(4096, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([0.0, 10.0, -2.0])
    converted = convert(model, example_inputs=(x,), init="data")
    w = converted.get_submodule("0").weight
    torch.testing.assert_close(w.mean(0), x.mean(0), atol=0.5, rtol=0.1)  # 64 templates per channel
    torch.testing.assert_close(w.std(0), x.std(0), atol=0.05, rtol=0.3)
    torch.testing.assert_close(converted.get_submodule("1").running_mean, torch.zeros(64))  # restored


def test_init_factor_scales_l1_weights_and_reinit_is_idempotent():
    model, x = _make("rawparam")
    dense = _quiet_convert(model, init="dense")
    scaled = _quiet_convert(model, init=10.0)
    l1 = set(summary(scaled).l1_weight_names)
    for k, v in dense.state_dict().items():
        torch.testing.assert_close(scaled.state_dict()[k], v * 10 if k in l1 else v, msg=k)
    assert any("multiplied by 10" in n for n in summary(scaled).notes)
    again = _quiet_convert(scaled, example_inputs=x, init="data")  # layers already l1 keep their weights
    assert all(torch.equal(again.state_dict()[k], v) for k, v in scaled.state_dict().items())


def test_init_options_are_checked():
    model, x = _make("voxnet")
    with pytest.raises(ValueError, match=r"init='data'.*needs example_inputs"):
        convert(model, init="data")
    for bad in ("kaiming", 0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="init must be 'auto'"):
            convert(model, init=bad)
    one = (torch.randn(1, 3),)  # BatchNorm on batch statistics needs 2 samples: say so
    with pytest.raises(RuntimeError, match=r"init='data'.*batch of at least 2"):
        convert(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), example_inputs=one, init="data")
    state = passes.run_pipeline(model, ConvertConfig(example_inputs=x, init="data"))
    assert passes.init_l1_weights in passes.pipeline_for(state.config)
    assert passes.pipeline_for(ConvertConfig(init="dense")) == passes.DEFAULT_PIPELINE
    assert passes.pipeline_for(ConvertConfig(pretrained=True).validate()) == passes.DEFAULT_PIPELINE
    assert passes.init_l1_weights in passes.pipeline_for(ConvertConfig())  # the default, init="auto"


class _TiedAndReparametrized(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.shared.weight
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 4))
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.wn(self.bn(self.tied(self.bn(self.shared(x)))))


def test_tied_weights_stay_tied_and_reparametrized_layers_are_skipped():
    model = _TiedAndReparametrized()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    out = convert(model, example_inputs=(torch.randn(4, 8),))
    assert isinstance(out.tied, l1nn.L1Module) and isinstance(out.shared, l1nn.L1Module)
    assert out.tied.weight is out.shared.weight
    # weight_norm would be silently dropped by a swap: the layer stays dense, with the reason.
    assert not isinstance(out.wn, l1nn.L1Module)
    assert "reparametrized" in str(summary(out))
    assert {k: v.shape for k, v in out.state_dict().items() if k in keys} == keys


@pytest.mark.parametrize("name", NAMES)
def test_zoo_conversion_leaves_the_global_rng_alone(name):
    model, x = _make(name)
    state = torch.get_rng_state()
    _quiet_convert(model, example_inputs=x, init="data")  # traces, runs the model twice, builds layers
    assert torch.equal(torch.get_rng_state(), state), f"{name}: convert consumed the global RNG"
