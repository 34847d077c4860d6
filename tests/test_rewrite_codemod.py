"""The source codemod as a libcst command (``python -m libcst.tool codemod``) and driven by the layer registry."""
import subprocess
import sys

import pytest
from torch import nn

pytest.importorskip("libcst")
from libcst import parse_module  # noqa: E402
from libcst.codemod import CodemodContext  # noqa: E402

from l1fx import layers  # noqa: E402
from l1fx.rewrite import DENSE_TO_L1, L1_NAMES, L1Codemod, rewrite_source  # noqa: E402

MODEL = '''"""A model."""
from __future__ import annotations
import torch.nn as nn
import torch.nn.functional as F
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 1)
        self.conv2 = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(8, 2)
        self.head = nn.Linear(2, 2)
    def forward(self, x):
        assert isinstance(self.fc, nn.Linear)
        return F.linear(input=self.conv2(self.conv1(x)).mean(-1), weight=self.fc.weight)
'''


def _python(*args, cwd):
    """``python ARGS`` in ``cwd`` (a temporary directory: l1fx comes from the install, as for a user)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_libcst_tool_runs_the_codemod_as_l1fx_rewrite_does(tmp_path):
    # No blank line after the imports and ``input=``: where libcst's AddImportsVisitor would differ.
    (tmp_path / "a.py").write_text(MODEL)
    (tmp_path / "b.py").write_text(MODEL)
    options = ["--ratio", "0.6", "--exclude", "self.head"]  # 4 sites left, 0.6 * 4 = 2.4 -> the first 2
    ours = _python("-m", "l1fx.rewrite", "a.py", *options, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    # libcst's driver: -x takes the dotted class path (no .libcst.codemod.yaml needed); options after it.
    theirs = _python("-m", "libcst.tool", "codemod", "-x", "l1fx.rewrite.codemod.L1Codemod", "--no-format",
                     "--hide-progress", "-j", "1", *options, "b.py", cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr
    rewritten = (tmp_path / "b.py").read_text()
    assert rewritten == ours.stdout != MODEL
    assert rewritten.count("l1fx.nn.L1Conv1d(") == 2 and "l1fx.nn.L1Linear(" not in rewritten
    assert "import l1fx.nn\nclass Net" in rewritten  # no line added that the user did not ask for
    assert (tmp_path / "a.py").read_text() == MODEL  # l1fx.rewrite to stdout leaves the input alone
    # The rewrite's notes are the codemod's warnings.
    assert "WARNING: 13:36: note: nn.Linear (torch.nn.Linear) used but not called" in theirs.stderr
    assert "Transformed 1 files successfully" in theirs.stderr


def test_libcst_tool_finds_the_codemod_through_its_config(tmp_path):
    (tmp_path / ".libcst.codemod.yaml").write_text("modules:\n  - l1fx.rewrite\n")
    (tmp_path / "m.py").write_text(MODEL)
    run = _python("-m", "libcst.tool", "codemod", "codemod.L1Codemod", "--no-format", "--hide-progress",
                  "--include", "self.fc", "m.py", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "m.py").read_text() == rewrite_source(MODEL, include="self.fc").code
    assert "self.fc = l1fx.nn.L1Linear(8, 2)" in (tmp_path / "m.py").read_text()


# ---------------------------------------------------------------- a new layer kind, registered from outside
class MyConv(nn.Module):
    """Stands in for a third-party layer, ``mylib.MyConv`` (and ``mylib.my_conv``), with an l1 version."""


def _register() -> layers.LayerSpec:
    """What a plug-in's one new file does: one spec naming the dense and the l1 callables."""
    return layers.register_layer(layers.LayerSpec(
        name="myconv",
        module=MyConv,
        source_modules=("mylib.MyConv", "mylib.layers.MyConv"),
        source_functions=("mylib.my_conv",),
        l1_module="mylib_l1.L1MyConv",
        l1_function="mylib_l1.l1_my_conv",
    ))


PLUGIN_MODEL = '''import torch
import mylib
from mylib import my_conv
from mylib.layers import MyConv as C


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = mylib.MyConv(3, 4)
        self.b = C(4, 4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return my_conv(x, self.a.weight)
'''


def test_a_kind_registered_in_the_registry_is_rewritten_without_editing_l1fx():
    # Before: nothing in l1fx names mylib, so only the Linear is rewritten.
    assert "mylib.MyConv" not in DENSE_TO_L1
    assert [c.callee for c in rewrite_source(PLUGIN_MODEL).converted] == ["torch.nn.Linear"]
    spec = _register()
    try:  # after: the codemod reads the registry when it runs
        result = rewrite_source(PLUGIN_MODEL, exclude="self.fc")
        assert [(c.callee, c.l1) for c in result.converted] == [
            ("mylib.MyConv", "mylib_l1.L1MyConv"), ("C", "mylib_l1.L1MyConv"), ("my_conv", "mylib_l1.l1_my_conv")]
        code = result.code
        assert "self.a = mylib_l1.L1MyConv(3, 4)" in code and "self.b = mylib_l1.L1MyConv(4, 4)" in code
        assert "return mylib_l1.l1_my_conv(x, self.a.weight)" in code and "torch.nn.Linear(4, 2)" in code
        assert "from mylib.layers import MyConv as C\nimport mylib_l1\n" in code  # imported once
        assert result.report().startswith("<string>: rewrote 3 calls (MyConv x2, my_conv x1); "
                                          "1 left dense by the selection: self.fc")
        # The same through libcst's own entry point (what libcst.tool calls) ...
        codemod = L1Codemod(CodemodContext(filename="net.py"), exclude=["self.fc"])
        assert codemod.transform_module(parse_module(PLUGIN_MODEL)).code == code
        # ... and the public tables are views of the registry, so they show the kind too.
        assert DENSE_TO_L1["mylib.layers.MyConv"] == "mylib_l1.L1MyConv" and "mylib_l1.l1_my_conv" in L1_NAMES
        # A second run changes nothing: the l1 names count as candidates already rewritten.
        again = rewrite_source(code, exclude="self.fc")
        assert again.code == code and sum(c.already_l1 for c in again.candidates) == 3
    finally:
        layers.unregister_layer(spec.name)
    # Unregistered, it is left alone again.
    assert "mylib.MyConv" not in DENSE_TO_L1 and "mylib_l1.l1_my_conv" not in L1_NAMES
    assert rewrite_source(PLUGIN_MODEL, exclude="self.fc").code == PLUGIN_MODEL
