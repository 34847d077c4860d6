"""Operation counts, energy and latency report (l1fx.report)."""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from l1fx.nn import L1Conv3d, L1Linear
from l1fx.report import HOROWITZ_45NM_PJ, DemoPointNet, compare, energy_report, main

sys.path.insert(0, str(Path(__file__).parent))
from zoo import ZOO  # noqa: E402

FP32 = HOROWITZ_45NM_PJ["fp32"]


def _row(report, name):
    rows = [r for r in report.layers if r.name == name]
    assert len(rows) == 1, [r.name for r in report.layers]
    return rows[0]


def _convert(model, inputs):
    from l1fx.convert import convert
    return convert(model, 1.0, example_inputs=inputs)


# ------------------------------------------------------------------ exact counts by hand
@pytest.mark.parametrize("bias", [True, False])
def test_linear_counts_by_hand(bias):
    dense = nn.Linear(5, 7, bias=bias)
    x = torch.randn(3, 4, 5)  # 3*4 rows, 7 outputs each, K = 5
    outputs, k = 3 * 4 * 7, 5
    params = 7 * 5 + (7 if bias else 0)

    r = energy_report(nn.Sequential(dense), x)
    row = _row(r, "0")
    assert (row.type, row.multiplies, row.additions, row.parameters) == ("Linear", outputs * k, outputs * k, params)
    assert row.energy == pytest.approx(outputs * k * (FP32["mul"] + FP32["add"]))

    r1 = energy_report(nn.Sequential(L1Linear.from_dense(dense)), x)
    row1 = _row(r1, "0")
    # l1: K subtractions + K accumulations per output, no multiply.
    assert (row1.type, row1.multiplies, row1.additions, row1.parameters) == ("L1Linear", 0, 2 * outputs * k, params)
    assert row1.energy == pytest.approx(2 * outputs * k * FP32["add"])


def test_conv3d_stride_padding_groups_counts_by_hand():
    dense = nn.Conv3d(4, 6, kernel_size=(3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 1), groups=2)
    x = torch.randn(2, 4, 5, 4, 6)
    # Output size per dim: (5+2-3)//2+1 = 3, (4+0-2)//1+1 = 3, (6+2-3)//2+1 = 3.
    assert dense(x).shape == (2, 6, 3, 3, 3)
    outputs = 2 * 6 * 3 * 3 * 3                  # 324
    k = (4 // 2) * 3 * 2 * 3                     # in_channels/groups * kernel volume = 36
    params = 6 * (4 // 2) * 3 * 2 * 3 + 6        # 222

    r = energy_report(dense, x)
    assert [(row.name, row.multiplies, row.additions, row.parameters) for row in r.layers] == [
        ("(top level)", 11664, 11664, 222)]
    assert outputs * k == 11664 and params == 222

    l1 = L1Conv3d.from_dense(dense)
    r1 = energy_report(l1, x)
    assert [(row.type, row.multiplies, row.additions, row.parameters) for row in r1.layers] == [
        ("L1Conv3d", 0, 2 * 11664, 222)]
    assert r1.total["energy_pJ"] == pytest.approx(23328 * 0.9)


def test_l1_formulas_registered_for_plain_flop_counter():
    # The registry (imported with l1fx) registers the l1 ops with FlopCounterMode: FLOP = 2K per output element.
    layer = L1Linear(5, 7)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(torch.randn(3, 5))
    assert counter.get_total_flops() == 2 * 3 * 7 * 5


# ------------------------------------------------------------------ rows and totals
@pytest.mark.parametrize("name", ["pointnet", "rawparam", "resnet3d"])
def test_totals_equal_sum_of_rows(name):
    ctor, make_inputs = ZOO[name]
    model, x = ctor(), make_inputs()
    r = energy_report(model, x)
    assert r.total["mul"] == sum(row.multiplies for row in r.layers)
    assert r.total["add"] == sum(row.additions for row in r.layers)
    assert r.total["params"] == sum(row.parameters for row in r.layers) == sum(p.numel() for p in model.parameters())
    assert r.total["energy_pJ"] == pytest.approx(sum(row.energy for row in r.layers))
    assert r.total["energy_pJ"] == pytest.approx(r.total["mul"] * FP32["mul"] + r.total["add"] * FP32["add"])
    assert r.total["cycles"] == pytest.approx(sum(row.cycles for row in r.layers))
    # Ops are counted once: the same as FlopCounterMode's global total (FLOP = mul + add here).
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(*x)
    assert r.total["mul"] + r.total["add"] == counter.get_total_flops()
    text = str(r)
    assert "TOTAL" in text and all(row.name in text for row in r.layers)


def test_functional_calls_are_attributed_to_the_calling_module():
    model, x = ZOO["rawparam"][0](), ZOO["rawparam"][1]()
    b, n = x[0].shape[0], x[0].shape[2]
    r = energy_report(model, x)
    top = _row(r, "(top level)")
    # F.conv1d 3->16 and 16->32 over n points, F.linear 32->16 and 16->5 (weights applied in forward).
    macs = b * n * (3 * 16 + 16 * 32) + b * (32 * 16 + 16 * 5)
    assert (top.multiplies, top.additions) == (macs, macs)
    # Parameters: its own w1, b1, w2, cls_weight, cls_bias; head.* belong to the "head" row.
    assert top.parameters == 16 * 3 + 16 + 32 * 16 + 5 * 16 + 5
    assert _row(r, "head").multiplies == 0 and _row(r, "head").parameters == 32 * 16 + 16


def test_shared_module_and_repeated_calls_count_once_per_call():
    shared = nn.Linear(4, 4)

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.p1 = nn.Sequential(shared)
            self.p2 = nn.Sequential(shared)

        def forward(self, x):
            return self.p2(self.p1(x)) + self.p1(x)

    r = energy_report(TwoPaths(), torch.randn(2, 4))
    # Three calls of one 4x4 linear on 2 rows, booked at its first name; no negative rows.
    assert [(row.name, row.multiplies, row.parameters) for row in r.layers] == [("p1.0", 3 * 2 * 4 * 4, 20)]


def test_report_leaves_the_model_unchanged():
    model, x = ZOO["pointnet"][0](), ZOO["pointnet"][1]()
    model.train()
    model.feat.stn.eval()
    before = copy.deepcopy(model.state_dict())
    flags = {n: m.training for n, m in model.named_modules()}
    energy_report(model, x)
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm running stats untouched


def test_forward_failure_names_the_model_and_shapes():
    from l1fx.errors import L1fxError

    with pytest.raises(RuntimeError, match=r"Linear.*\(2, 3\)") as e:
        energy_report(nn.Linear(5, 7), torch.randn(2, 3))
    assert isinstance(e.value, L1fxError)  # one hierarchy: l1fx.L1fxError catches it


# ------------------------------------------------------------------ converted PointNet
@pytest.mark.filterwarnings("ignore:l1fx.convert.*cannot trace module:UserWarning")  # T-Nets: swapped, by design
def test_converted_pointnet_energy_ratio():
    ctor, make_inputs = ZOO["pointnet"]
    model, x = ctor(), make_inputs(batch=2, num_points=32)
    converted = _convert(model, x)
    cmp = compare(model, converted, x)

    b, n = 2, 32
    bmm = b * n * 3 * 3 + b * n * 16 * 16  # point x transform products: data x data, not converted
    o = cmp.original.total
    layer_macs = o["mul"] - bmm            # every conv/linear becomes l1
    assert cmp.converted.total["mul"] == bmm
    assert cmp.converted.total["add"] == bmm + 2 * layer_macs
    expected_energy = bmm * (FP32["mul"] + FP32["add"]) + 2 * layer_macs * FP32["add"]
    assert cmp.converted.total["energy_pJ"] == pytest.approx(expected_energy)
    assert cmp.ratio["energy_pJ"] == pytest.approx(expected_energy / o["energy_pJ"])
    # Bounded by the pure l1/dense ratio 2*add/(mul+add) and below 1.
    assert 2 * 0.9 / 4.6 < cmp.ratio["energy_pJ"] < 1
    text = str(cmp)
    assert "TOTAL" in text and "converted/original" in text and "L1Conv1d" in text


def test_pure_l1_ratio_and_latency_model():
    model, x = DemoPointNet(), torch.randn(2, 3, 64)
    converted = _convert(model, x)
    cmp = compare(model, converted, x)
    assert cmp.converted.total["mul"] == 0
    assert cmp.ratio["energy_pJ"] == pytest.approx(2 * 0.9 / (3.7 + 0.9))
    assert cmp.ratio["cycles"] == pytest.approx(1.0)  # fp32 add and mul both 4 cycles on Skylake
    cmp_int = compare(model, converted, x, precision="int32")
    assert cmp_int.ratio["energy_pJ"] == pytest.approx(2 * 0.1 / (3.1 + 0.1))
    assert cmp_int.ratio["cycles"] == pytest.approx(2 * 1 / (1 + 3))
    # No latency table entry for fp16: no cycles at all rather than made-up ones.
    r16 = energy_report(model, x, precision="fp16")
    assert r16.latency is None and "cycles" not in r16.total and "Cycles" not in str(r16)
    assert r16.total["energy_pJ"] == pytest.approx(r16.total["mul"] * 1.1 + r16.total["add"] * 0.4)


# ------------------------------------------------------------------ tables
def test_custom_tables():
    x = torch.randn(3, 5)
    flat = energy_report(nn.Linear(5, 7), x, table={"add": 1.0, "mul": 10})
    assert flat.total["energy_pJ"] == pytest.approx(105 * 10 + 105 * 1) and flat.precision == "custom"
    per_prec = energy_report(nn.Linear(5, 7), x, precision="bf16", table={"bf16": {"add": 0.5, "mul": 2}},
                             latency={"add": 1, "mul": 5})
    assert per_prec.total["energy_pJ"] == pytest.approx(105 * 2 + 105 * 0.5)
    assert per_prec.total["cycles"] == 105 * 5 + 105 * 1


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "fp64"}, r"unknown precision 'fp64'.*fp32, fp16, int32, int8"),
    ({"table": {"add": 1.0}}, r"needs both 'add' and 'mul'"),
    ({"table": {"add": -1.0, "mul": 1.0}}, r"'add'.*finite number >= 0"),
    ({"precision": "x", "table": {"x": {"add": 1.0, "mul": "big"}}}, r"'mul' at 'x'"),
    ({"latency": {"fp16": {"add": 1, "mul": 1}}}, r"unknown precision 'fp32' for the latency table"),
])
def test_bad_precision_or_table_is_a_clear_error(kwargs, match):
    from l1fx.errors import UsageError

    with pytest.raises(UsageError, match=match):  # also a ValueError
        energy_report(nn.Linear(5, 7), torch.randn(3, 5), **kwargs)


# ------------------------------------------------------------------ command line
def test_cli_demo(capsys):
    assert main(["--demo", "--input-shape", "2,3,64"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "L1Conv1d" in out and "TOTAL" in out
    assert "converted/original = 0.391" in out  # 2*0.9 / (3.7+0.9)


def test_cli_user_model_file_json_and_precision(tmp_path, capsys):
    (tmp_path / "helper_blocks.py").write_text(
        "import torch.nn as nn\n"
        "def block(cin, cout):\n    return nn.Sequential(nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout), nn.ReLU())\n")
    (tmp_path / "mynet.py").write_text(
        "import torch.nn as nn\nfrom helper_blocks import block\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=8):\n"
        "        super().__init__()\n        self.mlp = nn.Sequential(block(3, width), block(width, 16))\n"
        "    def forward(self, x):\n        return self.mlp(x).amax(2)\n")
    spec = f"{tmp_path / 'mynet.py'}:Net"
    rc = main([spec, "--kwargs", '{"width": 4}', "--input-shape", "2,3,10", "--precision", "int8", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    macs = 2 * 10 * (3 * 4 + 4 * 16)
    assert data["original"]["total"]["mul"] == macs and data["converted"]["total"]["mul"] == 0
    assert data["converted"]["total"]["add"] == 2 * macs
    assert data["original"]["precision"] == "int8"
    assert data["ratio"]["energy_pJ"] == pytest.approx(2 * 0.03 / (0.2 + 0.03))


@pytest.mark.parametrize("argv, match", [
    (["--demo", "--precision", "fp64"], "unknown precision 'fp64'"),
    (["nowhere/missing.py:Net", "--input-shape", "1,3,8"], "model file 'nowhere/missing.py' not found"),
    (["torch.nn:NoSuchLayer", "--input-shape", "1,3,8"], "has no attribute 'NoSuchLayer'"),
    (["torch.nn:Linear", "--input-shape", "1,3"], r"constructing torch.nn:Linear\(\*\*\{\}\) failed"),
    (["torch.nn:Identity"], "--input-shape is required"),
    (["--demo", "--input-shape", "2,three"], "comma-separated integers"),
    (["--demo", "--ratio", "1.5"], r"--ratio: must be in \[0, 1\]"),
    ([], "give a model"),
])
def test_cli_errors(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("l1fx.report: error:")
    assert re.search(match, err), err


def test_cli_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "l1fx.report", "--demo", "--input-shape", "1,3,16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Energy:" in proc.stdout and "x less" in proc.stdout


# ------------------------------------------------------------------ shared CLI conventions (issue 13)
_NET = ("import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=8):\n"
        "        super().__init__()\n        self.a, self.b = nn.Conv1d(3, width, 1), nn.Conv1d(width, 4, 1)\n"
        "    def forward(self, x):\n        return self.b(self.a(x)).amax(2)\n")


def test_cli_shape_the_model_rejects_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "net.py").write_text(_NET)
    assert main([f"{tmp_path / 'net.py'}:Net", "--input-shape", "2,5,10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("l1fx.report: error: Net rejects --input-shape (2, 5, 10)"), err


def test_cli_option_names_shared_with_export(tmp_path, capsys):
    (tmp_path / "net.py").write_text(_NET)
    spec = f"{tmp_path / 'net.py'}:Net"
    out = tmp_path / "report.json"
    assert main([spec, "--model-kwargs", '{"width": 6}', "--input-shape", "2,3,10", "--exclude", "b",
                 "--json", "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""  # written to -o instead
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["converted"]["layers"]}
    assert rows["a"]["type"].startswith("L1") and rows["b"]["type"] == "Conv1d"  # --exclude reached convert
    assert data["original"]["total"]["mul"] == 2 * 10 * (3 * 6 + 6 * 4)  # --model-kwargs built width 6
    # The old spelling still works, with a warning; --include picks exactly the matching layers.
    assert main([spec, "--kwargs", '{"width": 6}', "--input-shape", "2,3,10", "--include", "b", "--json"]) == 0
    captured = capsys.readouterr()
    assert "--kwargs is deprecated, use --model-kwargs" in captured.err
    rows = {r["name"]: r for r in json.loads(captured.out)["converted"]["layers"]}
    assert rows["a"]["type"] == "Conv1d" and rows["b"]["type"].startswith("L1")
    assert main([spec, "--input-shape", "2,3,10", "-o", str(tmp_path / "missing" / "r.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.py", "report.json"]


# ------------------------------------------------------------------ library and command line apart (issue 15)
def test_library_is_l1fx_energy_and_the_cli_reexports_it():
    code = ("import sys\n"
            "import l1fx.energy as E\n"
            "assert 'l1fx.report' not in sys.modules and 'l1fx._cli' not in sys.modules, 'the library imports the CLI'\n"
            "import l1fx, l1fx.report as R\n"
            "assert R.energy_report is E.energy_report is l1fx.energy_report and R.compare is E.compare is l1fx.compare\n"
            "assert R.ReportError is E.ReportError and R.HOROWITZ_45NM_PJ is E.HOROWITZ_45NM_PJ\n"
            "assert not hasattr(E, 'DemoPointNet') and hasattr(R, 'DemoPointNet')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_registered_kinds_op_counts_as_additions(monkeypatch):
    """An op is l1 (all additions) because a layer kind names it, not because report.py lists it."""
    from l1fx import energy, layers

    rep = energy_report(L1Linear(4, 3), torch.randn(7, 4))
    assert (rep.total["mul"], rep.total["add"]) == (0, 2 * 7 * 3 * 4)
    monkeypatch.setattr(layers, "spec_for_l1_op", lambda op: None)  # no kind claims the op: a dense count
    rep = energy.energy_report(L1Linear(4, 3), torch.randn(7, 4))
    assert (rep.total["mul"], rep.total["add"]) == (7 * 3 * 4, 7 * 3 * 4)


def test_op_costs_is_what_energy_report_uses():
    from l1fx.energy import op_costs

    assert op_costs() == {"add": 0.9, "mul": 3.7} and op_costs(precision="int8") == {"add": 0.03, "mul": 0.2}
    assert op_costs({"add": 1, "mul": 2}, "ignored") == {"add": 1.0, "mul": 2.0}
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        op_costs(precision="fp64")


def test_output_file_is_replaced_atomically_keeping_its_mode(tmp_path):
    out = tmp_path / "r.txt"
    out.write_text("old")
    out.chmod(0o640)
    stale = tmp_path / ".r.txt.l1fx-tmp-999999999.0badf00d"  # left by a killed writer (no such pid)
    stale.write_text("half")
    assert main(["--demo", "--input-shape", "1,3,16", "-o", str(out)]) == 0
    assert "Energy:" in out.read_text() and out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]  # the leftover is gone, no temp is left
