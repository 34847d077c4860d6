"""ConvertConfig (frozen, keyword-only), filter_fn, per-layer MACs, run_pipeline's RNG, and a new layer kind
declared entirely in this file (the registry's "one new file" claim)."""
import dataclasses
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l1fx
import l1fx.nn as l1nn
from l1fx import layers, passes
from l1fx.convert import ConvertConfig
from l1fx.passes.status import Status, Strategy


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------- ConvertConfig
def test_config_is_frozen_and_keyword_only():
    cfg = ConvertConfig(ratio=1, example_inputs=torch.zeros(2, 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 0.5
    with pytest.raises(TypeError, match="positional"):
        ConvertConfig(0.5)
    checked = cfg.validate()
    # validate returns a checked copy and leaves the original as it was
    assert checked is not cfg and cfg.ratio == 1 and isinstance(cfg.example_inputs, torch.Tensor)
    assert type(checked.ratio) is float and checked.ratio == 1.0
    assert isinstance(checked.example_inputs, tuple) and checked.example_inputs[0] is cfg.example_inputs
    assert checked.strategy is Strategy.DEPTH and checked.validate() == checked  # idempotent
    assert dataclasses.replace(checked, ratio=0.25).ratio == 0.25


def test_config_errors_name_the_argument():
    with pytest.raises(l1fx.ConversionError, match=r"l1fx.convert: ratio must be a number in \[0, 1\]"):
        ConvertConfig(ratio=2).validate()
    with pytest.raises(l1fx.ConversionError, match=r"l1fx.convert: strategy must be one of \('depth', 'energy'\)"):
        ConvertConfig(strategy="widest").validate()
    with pytest.raises(TypeError, match="l1fx.convert: example_inputs must be a tensor or a tuple/list"):
        ConvertConfig(example_inputs={"x": torch.zeros(1)}).validate()
    with pytest.raises(TypeError, match="l1fx.convert: filter_fn must be a function"):
        l1fx.convert(nn.Linear(2, 2), filter_fn="fc")
    with pytest.raises(TypeError, match=r"convert\(\) takes from 1 to 2 positional"):
        l1fx.convert(nn.Linear(2, 2), 1.0, None)


# ---------------------------------------------------------------- filter_fn
class _Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 1)
        self.fc1 = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):  # x: [B, 3, N]
        return F.linear(self.fc1(self.conv(x).transpose(1, 2)), self.w)


def test_filter_fn_gets_module_then_fqn_and_acts_like_include():
    model, seen = _Three(), []

    def only_linear(module, fqn):
        seen.append((type(module).__name__, fqn))
        return isinstance(module, nn.Linear)

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new order is not deprecated
        out = l1fx.convert(model, 0.0, filter_fn=only_linear)  # like include: overrides the ratio
    assert sorted(seen) == [("Conv1d", "conv"), ("Linear", "fc1"), ("_Three", "w")]  # F.linear: owner + weight
    assert l1fx.summary(out).converted == ["fc1"]
    # with include as well, a layer must pass both; exclude still wins
    both = l1fx.convert(model, include=["fc1", "w"], filter_fn=lambda m, fqn: fqn != "w")
    assert l1fx.summary(both).converted == ["fc1"]
    none = _quiet(l1fx.convert, model, filter_fn=only_linear, exclude="fc1")
    assert l1fx.summary(none).converted == []


def test_old_order_in_include_still_works_with_a_deprecation_warning():
    model = _Three()
    with pytest.warns(DeprecationWarning, match=r"function as include= .*filter_fn=lambda module, fqn") as rec:
        old = l1fx.convert(model, include=lambda name, m: isinstance(m, nn.Linear))
    assert rec[0].filename == __file__  # points at the caller's line
    assert l1fx.summary(old).converted == ["fc1"]
    with pytest.warns(DeprecationWarning, match=r"function as exclude= .*not \.\.\."):
        kept = l1fx.convert(model, exclude=lambda name, m: name == "w")
    assert l1fx.summary(kept).converted == ["conv", "fc1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        l1fx.convert(model, include="fc*")  # patterns are not deprecated


# ---------------------------------------------------------------- MACs per layer, also when weights are tied
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one Parameter, two layers
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):  # x: [3, 4]
        x = self.a(self.b(self.a(x)))
        return F.linear(F.linear(x, self.w), self.w) + F.linear(x[:1], self.w)


def test_tied_layers_each_get_their_own_macs():
    x = torch.randn(3, 4)
    state = passes.run_pipeline(_Tied(), ConvertConfig(example_inputs=x), (passes.trace, passes.analyse))
    macs = [(c.name, c.node, c.macs) for c in state.candidates]
    # a is called twice (2 * 3*4*4), b once; the three call sites of w each count their own call
    assert macs == [("a", "a", 96), ("b", "b", 48), ("w", "linear", 48), ("w", "linear_1", 48),
                    ("w", "linear_2", 16)]
    # the same on the converted model (l1 layers, L1FunctionalCall modules), as convert reports it
    out = l1fx.convert(_Tied(), include=["a", "b"], example_inputs=x)
    rows = {r.name: r.macs for r in l1fx.summary(out).rows if r.kind == "module"}
    assert rows == {"a": 96, "b": 48}
    again = passes.run_pipeline(out, ConvertConfig(example_inputs=x), (passes.trace, passes.analyse))
    assert [(c.name, c.macs) for c in again.candidates if c.already_l1] == [("a", 96), ("b", 48)]


# ---------------------------------------------------------------- run_pipeline keeps the caller's RNG
def test_a_custom_pipeline_leaves_the_rng_states_alone():
    def draws(state):  # a user pass that draws from every global generator
        torch.rand(3), random.random(), np.random.rand()
        return state

    model, config = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)), ConvertConfig(example_inputs=torch.randn(4, 2))
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    expected = torch.rand(2), random.random(), np.random.rand()
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    passes.run_pipeline(model, config, (passes.trace, draws, passes.analyse))
    got = torch.rand(2), random.random(), np.random.rand()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ---------------------------------------------------------------- a new layer kind from this file only
class ChannelMix(nn.Module):
    """A dense kind l1fx does not know: ``y[b, o, n] = sum_c w[o, c] x[b, c, n] + bias[o]`` (not in torch.nn)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels) / in_channels ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x):
        return torch.einsum("oc,bcn->bon", self.weight, x) + self.bias[:, None]


class L1ChannelMix(l1nn.L1Module, nn.Module):
    """Its l1 replacement: ``y[b, o, n] = -sum_c |x[b, c, n] - w[o, c]| + bias[o]``."""

    def __init__(self, weight, bias):
        super().__init__()
        self.out_channels, self.in_channels = weight.shape
        self.weight, self.bias = weight, bias
        self._init_l1()

    @classmethod
    def from_dense(cls, m, *, share_parameters=False):
        take = (lambda p: p) if share_parameters else (lambda p: nn.Parameter(p.detach().clone()))
        return cls(take(m.weight), take(m.bias))

    def forward(self, x):
        return -(x[:, None] - self.weight[None, :, :, None]).abs().sum(2) + self.bias[:, None]


@pytest.fixture
def channel_mix_kind():
    spec = layers.register_layer(layers.LayerSpec(
        name="test_channel_mix", module=ChannelMix, l1_module=f"{__name__}.L1ChannelMix",
        channel_dim=1, features_attr="out_channels", pointwise_module=lambda m: True))
    yield spec
    layers.unregister_layer("test_channel_mix")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix1, self.mix2 = ChannelMix(3, 8), ChannelMix(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: [B, 3, N]
        return self.head(self.bn(self.mix2(torch.relu(self.mix1(x)))).amax(-1))


def test_a_layer_kind_registered_outside_l1fx_is_converted(channel_mix_kind):
    model, x = _Net(), torch.randn(2, 3, 16)
    out = l1fx.convert(model, example_inputs=(x,), pretrained=True)
    info = l1fx.summary(out)
    rows = {r.name: r for r in info.rows}
    assert info.converted == ["mix1", "mix2", "head"]
    assert (rows["mix1"].op, rows["mix1"].status, rows["mix1"].unit) == ("ChannelMix", Status.CONVERTED, 0)
    assert rows["mix2"].unit == 0  # pointwise, joined through a ReLU: one shared-MLP unit
    assert rows["mix1"].macs == 2 * 8 * 16 * 3 and rows["mix2"].macs == 2 * 8 * 16 * 8  # count_macs per layer
    assert (rows["mix1"].norm, rows["mix2"].norm) == ("inserted", "followed by BatchNorm1d")
    assert "mix1.weight" in info.l1_weight_names and l1nn.DENSE_TO_L1[ChannelMix] is L1ChannelMix
    # a call_module node, replaced by the l1 class with the dense layer's own Parameters
    assert isinstance(out.mix1, L1ChannelMix) and out.mix1.weight is not model.mix1.weight
    assert out.get_submodule("mix1").weight is out.get_parameter("mix1.weight")
    out.eval()
    with torch.no_grad():
        h = -(x[:, None] - model.mix1.weight[None, :, :, None]).abs().sum(2) + model.mix1.bias[:, None]
        assert torch.allclose(out.mix1(x), h)
    # converting again finds the l1 layers as "already l1"
    twice = l1fx.summary(l1fx.convert(out, example_inputs=(x,)))
    assert {r.name: r.status for r in twice.rows}["mix1"] == Status.ALREADY_L1


def test_without_the_registration_the_layer_stays_invisible():
    info = l1fx.summary(l1fx.convert(_Net(), example_inputs=(torch.randn(2, 3, 16),)))
    assert [r.name for r in info.rows] == ["head"]
