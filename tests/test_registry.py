"""The layer registry (l1fx.layers), the selection core, the shared helpers and the status enums."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import l1fx
import l1fx.nn as l1nn
from l1fx import _util, layers, passes
from l1fx.convert import ConvertConfig
from l1fx.passes.select import Layer, Matcher, check_ratio, check_strategy, choose, choose_in_order
from l1fx.passes.status import CandidateKind, Status, Strategy, UnitKind

from zoo import ZOO

DENSE = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


# ---------------------------------------------------------------- recognition
def test_every_kind_is_registered_with_what_the_tree_uses_today():
    assert [s.name for s in layers.specs()][:4] == ["linear", "conv1d", "conv2d", "conv3d"]
    for name, dense in DENSE.items():
        spec = layers.get(name)
        l1cls = l1nn.DENSE_TO_L1[dense]
        assert spec.module is dense and spec.l1_class is l1cls
        assert spec.l1_callable is l1nn.L1FunctionalCall.FUNCTIONS[name]
        assert layers.spec_for_function(getattr(F, name)) is spec
        assert layers.spec_for_module(l1nn.L1FunctionalCall(name, "w")) is spec
    assert layers.spec_for_function(torch.conv2d) is layers.get("conv2d")  # F.conv2d is torch.conv2d
    assert layers.spec_for_function(F.relu) is None and layers.spec_for_module(nn.ReLU()) is None
    # subclasses and the l1 classes are their kind
    assert layers.spec_for_module(type("MyLinear", (nn.Linear,), {})(2, 2)).name == "linear"
    assert layers.spec_for_module(l1nn.L1Conv3d(2, 2, 1)).name == "conv3d"
    # transposed convolutions are a kind with an l1 layer too
    t = layers.spec_for_module(nn.ConvTranspose3d(2, 2, 2))
    assert t.unsupported is None and t.l1_class is l1nn.L1ConvTranspose3d
    assert set(layers.FunctionNames()) == {F.linear, F.conv1d, F.conv2d, F.conv3d,
                                           F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def test_source_names_are_the_codemods_table():
    pytest.importorskip("libcst")
    import l1fx.rewrite as R

    assert layers.source_table() == R.DENSE_TO_L1
    assert layers.l1_source_names() == R.L1_NAMES


def test_onnx_schemas_name_the_exported_ops():
    pytest.importorskip("onnx")
    from l1fx import onnx_ops

    lin, conv = layers.get("linear").onnx, layers.get("conv3d").onnx
    assert (lin.domain, lin.op_type, conv.op_type) == (onnx_ops.DOMAIN, onnx_ops.LINEAR, onnx_ops.CONV)
    assert lin.version == conv.version == onnx_ops.DOMAIN_VERSION
    schema = {s.name: s for s in onnx_ops._schemas()}
    assert set(conv.attributes) == set(schema[onnx_ops.CONV].attributes)
    assert [i.name for i in schema[onnx_ops.LINEAR].inputs] == list(lin.inputs)


def test_build_replacement_copies_the_layer():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="reflect")
    new = layers.build_replacement(conv)
    assert type(new) is l1nn.L1Conv2d and new.groups == 2 and new.padding_mode == "reflect"
    assert torch.equal(new.weight, conv.weight) and torch.equal(new.bias, conv.bias)
    assert new.weight is not conv.weight
    assert layers.build_replacement(conv, share_parameters=True).weight is conv.weight  # options reach from_dense
    assert type(layers.build_replacement(nn.ConvTranspose2d(2, 2, 2))) is l1nn.L1ConvTranspose2d
    with pytest.raises(TypeError, match="ReLU is not a registered layer kind"):
        layers.build_replacement(nn.ReLU())


def test_a_variant_is_one_registered_handler():
    """torchao style: another variant (here a stand-in 'lp') registers a builder per kind."""
    built = []

    @layers.register_replacement("test-variant", "linear")
    def _lp(module, **options):
        built.append(module)
        return nn.Identity()

    try:
        lin = nn.Linear(2, 3)
        assert isinstance(layers.build_replacement(lin, "test-variant"), nn.Identity) and built == [lin]
        with pytest.raises(TypeError, match="'conv1d' has no 'test-variant' replacement"):
            layers.build_replacement(nn.Conv1d(2, 2, 1), "test-variant")
    finally:
        layers._REPLACEMENTS.pop(("test-variant", "linear"))


def test_register_layer_refuses_a_second_claim():
    with pytest.raises(ValueError, match="'linear' is registered already"):
        layers.register_layer(layers.LayerSpec("linear", nn.Linear))
    with pytest.raises(ValueError, match="recognises what 'linear' does"):
        layers.register_layer(layers.LayerSpec("linear2", nn.Linear))


# ---------------------------------------------------------------- one MAC counter
def _own_flops(counts, root: str, path: str) -> int:
    return sum(counts.get(f"{root}.{path}", {}).values())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_macs_are_torchs_flop_formula_for_dense_and_l1(name):
    """analyse's MACs (the registry's counter) = FlopCounterMode / 2 per layer, on the dense model and,
    through the l1 ops' registered formula, on the converted one."""
    model_fn, inputs_fn = ZOO[name]
    model, x = model_fn(), inputs_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # partial tracing is reported; not what this test is about
        state = passes.run_pipeline(model, ConvertConfig(example_inputs=x), (passes.trace, passes.analyse))
    live = [c for c in state.candidates if not c.skip]
    assert sum(c.macs > 0 for c in live) >= len(live) - 1  # shape_dependent: one stem is not reached

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as dense:
        model(*x)
    counts = dense.get_flop_counts()
    for c in live:
        if c.kind == "module":
            assert _own_flops(counts, type(model).__name__, c.name) == 2 * c.macs, c.name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = l1fx.convert(model, 1.0)
    converted.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as l1:
        converted(*x)
    counts = l1.get_flop_counts()
    root = next(k for k in counts if k != "Global" and "." not in k)
    rows = {r.name: r for r in l1fx.summary(converted).rows}
    checked = 0
    for c in live:
        row = rows[c.name]
        assert row.status == Status.CONVERTED
        path = row.module_path or row.name
        assert _own_flops(counts, root, path) == 2 * c.macs, path
        checked += 1
    assert checked == len(live)
    # and analyse counts the l1 ops (a converted model) exactly as the dense calls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = passes.run_pipeline(converted, ConvertConfig(example_inputs=x), (passes.trace, passes.analyse))
    assert {c.name: c.macs for c in again.candidates if not c.skip} == {c.name: c.macs for c in live}


def test_flop_counter_counts_l1_layers_without_the_report_module():
    code = (
        "import sys, torch\n"
        "import l1fx\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "lin, conv = l1fx.L1Linear(4, 3), l1fx.L1Conv2d(2, 5, 3)\n"
        "with torch.no_grad(), FlopCounterMode(display=False) as fc:\n"
        "    lin(torch.randn(7, 4)); conv(torch.randn(1, 2, 6, 6))\n"
        "assert 'l1fx.report' not in sys.modules, 'imported l1fx.report'\n"
        "print(fc.get_total_flops())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 2 * (7 * 3 * 4) + 2 * (1 * 5 * 4 * 4 * (2 * 3 * 3))


def test_report_counts_what_the_registry_registered():
    """l1fx.report keeps working on top of the registry's formula (it registers only what is missing)."""
    from l1fx.report import energy_report

    rep = energy_report(l1nn.L1Linear(4, 3), torch.randn(7, 4))
    assert (rep.total["mul"], rep.total["add"]) == (0, 2 * 7 * 3 * 4)


# ---------------------------------------------------------------- a new kind is one registration
class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 5, 3)
        self.w = nn.Parameter(torch.randn(3, 4, 5))
        self.fc = nn.Linear(3, 2)

    def forward(self, a, b):
        return self.fc(self.bil(a, b) + F.bilinear(a, b, self.w))


@pytest.fixture
def bilinear_kind():
    """A dummy new kind, declared here as a plug-in file would: nn.Bilinear / F.bilinear (weight 3rd)."""
    spec = layers.register_layer(layers.LayerSpec(
        name="bilinear", module=nn.Bilinear, functions=(F.bilinear,), weight_arg=(2, "weight"),
        source_modules=("torch.nn.Bilinear",), source_functions=("torch.nn.functional.bilinear",),
        channel_dim=-1, features_attr="out_features"))
    yield spec
    layers.unregister_layer("bilinear")


def _analyse(model, inputs):
    return passes.run_pipeline(model, ConvertConfig(example_inputs=inputs),
                               (passes.trace, passes.analyse, passes.select))


def test_a_new_layer_kind_is_picked_up_by_analyse(bilinear_kind):
    a, b = torch.randn(6, 4), torch.randn(6, 5)
    state = _analyse(_TwoInputs(), (a, b))
    rows = {c.name: c for c in state.candidates}
    assert set(rows) == {"bil", "w", "fc"}
    assert (rows["bil"].op, rows["w"].op, rows["w"].kind) == ("Bilinear", "F.bilinear", "function")
    assert rows["bil"].skip is None and rows["bil"].selected and rows["w"].selected
    assert rows["bil"].macs == rows["w"].macs == 6 * 3 * 4 * 5  # count_macs on the weight [3, 4, 5]
    assert sorted(u.names for u in state.units) == [["bil"], ["fc"], ["w"]]
    assert "torch.nn.Bilinear" not in layers.source_table()  # no l1 replacement declared: the codemod leaves it


def test_without_the_kind_analyse_does_not_see_it():
    state = _analyse(_TwoInputs(), (torch.randn(6, 4), torch.randn(6, 5)))
    assert [c.name for c in state.candidates] == ["fc"]


# ---------------------------------------------------------------- selection core
def test_choose_in_order_is_the_codemods_selection():
    pytest.importorskip("libcst")
    from l1fx.rewrite import select as rewrite_select

    sites = [("self.conv1", "Net.__init__"), ("self.conv2", "Net.__init__"), ("self.fc", "Net.__init__"),
             ("x", "Net.forward"), ("self.head",)]
    cases = [dict(ratio=r) for r in (0.0, 0.3, 0.5, 0.7, 1.0)]
    cases += [dict(include="self.conv*"), dict(exclude="self.fc"), dict(ratio=0.5, exclude=["self.conv1", "nope"]),
              dict(include=["Net.forward", "typo"], exclude="x"), dict(include="Net", exclude="self.fc")]
    for kw in cases:
        flags, un_inc, un_exc = rewrite_select(sites, **kw)
        got = choose_in_order(sites, kw.get("ratio", 1.0), kw.get("include"), kw.get("exclude"))
        assert (got.selected, got.unmatched_include, got.unmatched_exclude) == (flags, un_inc, un_exc), kw


def test_choose_units_skips_and_patterns():
    layers_ = [Layer(("a.0",)), Layer(("a.1",)), Layer(("b",), skip=True), Layer(("c",))]
    units = [[3], [0, 1]]  # ranked: c first
    assert choose(layers_, units, ratio=0.5).selected == [False, False, False, True]
    assert choose(layers_, units, ratio=1.0, exclude="a.1").selected == [True, False, False, True]
    ch = choose(layers_, units, include=["a", "b"])  # naming the skipped "b" is not a typo, but never selected
    assert ch.selected == [True, True, False, False] and ch.unmatched == []
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\] \(fraction of units"):
        choose(layers_, units, ratio=1.5)
    with pytest.raises(l1fx.ConversionError, match="l1fx.convert: ratio must .* call sites"):
        check_ratio(True, prefix="l1fx.convert: ", unit="call sites", error=l1fx.ConversionError)
    with pytest.raises(l1fx.UsageError):
        check_ratio("1")
    assert check_strategy("energy") is Strategy.ENERGY
    with pytest.raises(ValueError, match=r"strategy must be one of \('depth', 'energy'\), got 'random'"):
        check_strategy("random")


def test_matcher_takes_both_filter_orders():
    m = nn.Linear(2, 2)
    seen = []
    assert Matcher(lambda name, mod: seen.append((name, mod)) or True, "include")("fc", m)
    assert Matcher(lambda mod, fqn: seen.append((mod, fqn)) or True, "include", module_first=True)("fc", m)
    assert seen == [("fc", m), (m, "fc")]


# ---------------------------------------------------------------- status enums
def test_statuses_are_their_strings():
    assert Status.CONVERTED == "converted" and f"{Status.ALREADY_L1}" == "already l1"
    assert str(UnitKind.SHARED_MLP) == "shared-mlp" and CandidateKind("function") is CandidateKind.FUNCTION
    assert Status.is_l1("already l1") and not Status.is_l1(Status.KEPT)
    state = _analyse(nn.Sequential(nn.Conv1d(3, 4, 1), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 3)),
                     (torch.randn(2, 3, 8),))
    assert [u.kind for u in state.units] == ["shared-mlp", "single"]
    assert all(isinstance(u.kind, UnitKind) and isinstance(c.kind, CandidateKind)
               for u in state.units for c in u.members)


# ---------------------------------------------------------------- shared helpers
def test_evaluating_restores_each_flag_also_on_error():
    model = nn.Sequential(nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2)))
    model[1].eval()  # a submodule the user set differently from its parent
    with _util.evaluating(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == [True, True, False, False]
    with pytest.raises(RuntimeError, match="boom"):
        with _util.evaluating(model):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, False] and torch.is_grad_enabled()


def test_as_input_tuple():
    t = torch.randn(2)
    assert _util.as_input_tuple(t) == (t,) and _util.as_input_tuple([t, 3]) == (t, 3)
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple/list"):
        _util.as_input_tuple({"x": t})
    with pytest.raises(TypeError, match=r"inputs\[1\] is a int, not a tensor"):
        _util.as_input_tuple((t, 3), "inputs", tensors_only=True)
    with pytest.raises(TypeError, match="is empty"):
        _util.as_input_tuple((), tensors_only=True)
