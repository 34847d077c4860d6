"""``python -m l1fx.rewrite``: the libcst codemod that rewrites model source files."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import l1fx.nn
from l1fx.rewrite import RewriteError, main, rewrite_file, rewrite_source, select

import example_loader  # tests/example_loader.py

ZOO_PATH = Path(__file__).with_name("zoo.py")
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def run_code(code):
    """Execute rewritten source as a module namespace."""
    ns = {"__name__": "rewritten"}
    exec(compile(code, "<rewritten>", "exec"), ns)
    return ns


def load_module(path, name):
    return example_loader.load_file(path, name)


DENSE_ATEN = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d", "mkldnn_convolution",
              "mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}


class DenseOpsOnParams(TorchDispatchMode):
    """Counts convolution/matmul kernels that read a model parameter."""

    def __init__(self, model):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aten" and func.overloadpacket.__name__ in DENSE_ATEN and any(
                isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.params
                for t in tree_leaves((args, kwargs))):
            self.count += 1
        return func(*args, **kwargs)


def dense_calls_on_params(model, inputs):
    with torch.no_grad(), DenseOpsOnParams(model) as mode:
        out = model(*inputs)
    return mode.count, out


def shapes(out):
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in tree_leaves(out)]


ZOO_NAMES = list(load_module(ZOO_PATH, "zoo_names_for_rewrite").ZOO)


@pytest.fixture(scope="module")
def zoo_pair(tmp_path_factory):
    """The test zoo and its rewritten copy, imported side by side."""
    out = tmp_path_factory.mktemp("zoo_l1") / "zoo_l1.py"
    assert main([str(ZOO_PATH), "-o", str(out), "-q"]) == 0
    return load_module(ZOO_PATH, "zoo_original_for_rewrite"), load_module(out, "zoo_rewritten_l1"), out


# --------------------------------------------------------------------------- the zoo, rewritten
def test_zoo_source_rewritten_and_idempotent(zoo_pair):
    _, _, out = zoo_pair
    dense = ("nn.Conv1d(", "nn.Conv2d(", "nn.Conv3d(", "nn.Linear(", "F.conv1d(", "F.linear(")
    # The code after the module docstring (which itself mentions ``nn.Conv1d(...)``).
    original = ZOO_PATH.read_text().split("\nimport ", 1)[1]
    rewritten = out.read_text().split("\nimport ", 1)[1]
    dense_sites = sum(original.count(s) for s in dense)
    assert dense_sites > 30
    assert not any(s in rewritten for s in dense)
    assert rewritten.count("import l1fx.nn\n") == 1 and rewritten.count("import l1fx.functional\n") == 1
    # Rewriting the output again changes nothing.
    again = rewrite_source(out.read_text())
    assert not again.changed
    assert len(again.candidates) == dense_sites and all(c.already_l1 for c in again.candidates)


def test_zoo_everything_else_byte_identical(zoo_pair):
    """Undo the callee renames and the added imports: the original file comes back exactly."""
    _, _, out = zoo_pair
    undone = out.read_text().replace("import l1fx.functional\nimport l1fx.nn\n", "", 1)
    for dense, l1 in (("nn.Conv", "l1fx.nn.L1Conv"), ("nn.Linear", "l1fx.nn.L1Linear"),
                      ("F.conv1d", "l1fx.functional.l1_conv1d"), ("F.linear", "l1fx.functional.l1_linear")):
        undone = undone.replace(l1, dense)
    assert undone == ZOO_PATH.read_text()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_model_rewritten(zoo_pair, name):
    original_zoo, l1_zoo, _ = zoo_pair
    assert set(l1_zoo.ZOO) == set(original_zoo.ZOO)
    build, make_inputs = original_zoo.ZOO[name]
    build_l1, _ = l1_zoo.ZOO[name]
    dense, l1 = build().eval(), build_l1().eval()

    # Same parameter/buffer names and shapes; the dense weights load strictly.
    assert {k: v.shape for k, v in l1.state_dict().items()} == {k: v.shape for k, v in dense.state_dict().items()}
    l1.load_state_dict(dense.state_dict(), strict=True)
    # Every dense layer became the l1 layer of the same kind, under the same name.
    for qualname, m in dense.named_modules():
        if type(m) in l1fx.nn.DENSE_TO_L1:
            assert type(l1.get_submodule(qualname)) is l1fx.nn.DENSE_TO_L1[type(m)], qualname

    inputs = make_inputs(batch=2)
    dense_count, dense_out = dense_calls_on_params(dense, inputs)
    l1_count, l1_out = dense_calls_on_params(l1, inputs)
    assert dense_count > 0  # the counter does see the original's convolutions/matmuls
    assert l1_count == 0, f"{name}: {l1_count} convolution/matmul calls still read a weight"
    assert shapes(l1_out) == shapes(dense_out)
    assert all(torch.isfinite(t).all() for t in tree_leaves(l1_out) if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- import styles and shadowing
IMPORT_STYLES = {
    "import torch.nn as nn": ("import torch.nn as nn\nm = nn.Conv1d(3, 4, 1)\n", "l1fx.nn.L1Conv1d(3, 4, 1)"),
    "from torch import nn": ("from torch import nn\nm = nn.Conv2d(3, 4, 1)\n", "l1fx.nn.L1Conv2d(3, 4, 1)"),
    "import torch": ("import torch\nm = torch.nn.Conv3d(3, 4, 1)\n", "l1fx.nn.L1Conv3d(3, 4, 1)"),
    "import torch.nn": ("import torch.nn\nm = torch.nn.Linear(3, 4)\n", "l1fx.nn.L1Linear(3, 4)"),
    "import torch as th": ("import torch as th\nm = th.nn.Linear(3, 4)\n", "l1fx.nn.L1Linear(3, 4)"),
    "from torch.nn import Conv1d as C": ("from torch.nn import Conv1d as C\nm = C(3, 4, 1)\n",
                                         "l1fx.nn.L1Conv1d(3, 4, 1)"),
    "from torch.nn import Linear": ("from torch.nn import Linear\nm = Linear(3, 4)\n", "l1fx.nn.L1Linear(3, 4)"),
    "torch.nn.modules.conv": ("import torch.nn.modules.conv\nm = torch.nn.modules.conv.Conv2d(3, 4, 1)\n",
                              "l1fx.nn.L1Conv2d(3, 4, 1)"),
    "import torch.nn.functional as F": (
        "import torch\nimport torch.nn.functional as F\nw = torch.randn(4, 3)\nm = F.linear(torch.randn(2, 3), w)\n",
        "l1fx.functional.l1_linear(torch.randn(2, 3), w)"),
    "from torch.nn import functional as G": (
        "import torch\nfrom torch.nn import functional as G\nw = torch.randn(4, 3, 1)\n"
        "m = G.conv1d(torch.randn(2, 3, 5), w)\n", "l1fx.functional.l1_conv1d(torch.randn(2, 3, 5), w)"),
    "from torch.nn.functional import linear": (
        "import torch\nfrom torch.nn.functional import linear\nw = torch.randn(4, 3)\n"
        "m = linear(torch.randn(2, 3), w)\n", "l1fx.functional.l1_linear(torch.randn(2, 3), w)"),
    "torch.nn.functional.conv2d": (
        "import torch\nw = torch.randn(4, 3, 1, 1)\nm = torch.nn.functional.conv2d(torch.randn(2, 3, 5, 5), w)\n",
        "l1fx.functional.l1_conv2d(torch.randn(2, 3, 5, 5), w)"),
    "torch.conv3d": ("import torch\nw = torch.randn(4, 3, 1, 1, 1)\nm = torch.conv3d(torch.randn(1, 3, 2, 2, 2), w)\n",
                     "l1fx.functional.l1_conv3d(torch.randn(1, 3, 2, 2, 2), w)"),
}


@pytest.mark.parametrize("style", list(IMPORT_STYLES))
def test_every_import_style(style):
    source, expected = IMPORT_STYLES[style]
    result = rewrite_source(source)
    assert result.changed and expected in result.code
    assert len(result.converted) == 1
    ns = run_code(result.code)
    m = ns["m"]
    if expected.startswith("l1fx.nn."):
        assert isinstance(m, l1fx.nn.L1Module)
    else:  # the functional result is the negative l1 distance: all <= 0 without bias
        assert isinstance(m, torch.Tensor) and (m <= 0).all()
    assert not rewrite_source(result.code).changed


def test_functional_input_keyword_renamed():
    source = ("import torch\nimport torch.nn.functional as F\nw = torch.randn(4, 3)\n"
              "y = F.linear(input=torch.ones(2, 3), weight=w, bias=None)\n")
    result = rewrite_source(source)
    assert "l1fx.functional.l1_linear(x=torch.ones(2, 3), weight=w, bias=None)" in result.code
    ns = run_code(result.code)
    assert torch.allclose(ns["y"], -(torch.ones(2, 1, 3) - ns["w"]).abs().sum(-1))


SHADOWED = '''import torch.nn as nn
import torch.nn.functional as F
from torch.nn import Linear


def uses_parameter(nn):
    return nn.Linear(3, 4)


def uses_local(x):
    F = make_something()
    return F.linear(x)


def uses_local_class():
    Linear = lambda *a: None
    return Linear(3)


class Holder:
    nn = None


real = nn.Linear(3, 4)
'''


def test_shadowing_local_names_left_alone():
    result = rewrite_source(SHADOWED)
    assert [(c.line, c.callee) for c in result.converted] == [(24, "nn.Linear")]
    assert result.code.count("l1fx.nn.L1Linear(3, 4)") == 1
    assert "return nn.Linear(3, 4)" in result.code and "return F.linear(x)" in result.code
    assert "return Linear(3)" in result.code


def test_ambiguous_binding_noted_and_left_alone():
    source = ("try:\n    from torch.nn import Conv2d as K\nexcept ImportError:\n    K = None\n"
              "m = K(1, 2, 3)\n")
    result = rewrite_source(source)
    assert not result.changed and not result.candidates
    assert any("bound more than once" in n.message and n.line == 5 for n in result.notes)


def test_uncalled_reference_is_noted():
    source = ("import torch.nn as nn\n\n\nclass MyConv(nn.Conv2d):\n    pass\n\n\n"
              "def init(m: nn.Linear):\n    if isinstance(m, nn.Linear):\n        pass\n")
    result = rewrite_source(source)
    assert not result.changed
    assert [(n.line, n.column) for n in result.notes] == [(4, 14), (9, 22)]  # the annotation is not a use
    assert "isinstance" in result.notes[0].message and "nn.Conv2d" in result.notes[0].message
    assert "test.py:9:22: note:" in rewrite_source(source, path="test.py").report()


def test_star_import_noted():
    result = rewrite_source("from torch.nn import *\nm = Conv1d(1, 2, 3)\n", path="s.py")
    assert not result.changed
    assert "s.py:1:1: note: 'from torch.nn import *' hides where names come from" in result.report()


def test_name_l1fx_bound_to_something_else_is_refused():
    with pytest.raises(RewriteError, match=r"model\.py:3:1: the name 'l1fx' is bound"):
        rewrite_source("import torch\n\nl1fx = 3\nm = torch.nn.Linear(1, 2)\n", path="model.py")
    # ...but an existing ``import l1fx`` is fine, and not repeated.
    ok = rewrite_source("import l1fx.nn\nimport torch\nm = torch.nn.Linear(1, 2)\n")
    assert ok.code == "import l1fx.nn\nimport torch\nm = l1fx.nn.L1Linear(1, 2)\n"


# --------------------------------------------------------------------------- formatting preserved
def test_bytes_crlf_comments_quotes_and_encoding_preserved():
    original = ('#!/usr/bin/env python\r\n# -*- coding: latin-1 -*-\r\n"""Mod\xe8le."""\r\n'
                "from __future__ import annotations\r\n\r\nimport torch.nn as nn  # the usual\r\n\r\n\r\n"
                "class Net(nn.Module):\r\n    '''single quotes'''\r\n\r\n    def __init__(self):\r\n"
                "        super().__init__()\r\n        # keep me\r\n"
                "        self.conv1 = nn.Conv2d( 3,16 , kernel_size = (1, 1) ,\r\n"
                "                               bias=False )   # odd spacing\r\n"
                "        self.name = 'conv'  ;  self.other = \"x\"\r\n").encode("latin-1")
    result = rewrite_source(original)
    assert isinstance(result.code, bytes) and result.encoding == "iso-8859-1"
    expected = original.replace(b"import torch.nn as nn  # the usual\r\n",
                                b"import torch.nn as nn  # the usual\r\nimport l1fx.nn\r\n")
    expected = expected.replace(b"nn.Conv2d( 3", b"l1fx.nn.L1Conv2d( 3")
    assert result.code == expected
    assert "L1Conv2d" in result.text() and "Mod\xe8le" in result.text()


def test_import_goes_after_docstring_and_future_import():
    result = rewrite_source('"""Doc."""\nfrom __future__ import annotations\n\nx = 1\n'
                            "def f(torch):\n    return 1\nimport torch\nm = torch.nn.Linear(1, 2)\n")
    assert result.code.startswith('"""Doc."""\nfrom __future__ import annotations\nimport l1fx.nn\n\nx = 1\n')


# --------------------------------------------------------------------------- selection
def test_select_semantics_match_convert():
    names = [("self.conv1", "A.__init__"), ("self.conv2", "A.__init__"), ("self.fc", "B.__init__")]
    assert select(names)[0] == [True, True, True]  # default ratio 1
    assert select(names, 0.0)[0] == [False, False, False]
    assert select(names, 1 / 3)[0] == [True, False, False]
    assert select(names, 0.5)[0] == [True, True, False]  # 1.5 rounds up
    assert select(names, 2 / 3)[0] == [True, True, False]
    assert select(names, include="B")[0] == [False, False, True]  # "B" matches below it: "B.__init__"
    assert select(names, 1 / 3, include=["self.fc"])[0] == [False, False, True]  # include: exactly those
    assert select(names, include=["self"])[0] == [True, True, True]
    assert select(names, exclude=["self.conv1"])[0] == [False, True, True]
    assert select(names, 0.5, exclude=["self.conv1"])[0] == [False, True, False]  # ratio counts what is left
    assert select(names, include=["A"], exclude=["*conv2"])[0] == [True, False, False]  # exclude wins
    assert select(names, include=["a"])[1] == ["a"]  # case-sensitive; unmatched reported
    assert select(names, include=["A.*"], exclude=["nope"])[1:] == ([], ["nope"])
    for bad in (-0.1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="ratio"):
            select(names, bad)
    with pytest.raises(TypeError, match="fnmatch patterns, not a function"):
        select(names, include=lambda name, module: True)


def test_ratio_on_the_zoo_is_first_in_source_order():
    result = rewrite_source(ZOO_PATH.read_text(), ratio=2 / 3)
    n = len(result.candidates)
    k = round(2 / 3 * n)
    assert n > 30 and [c.converted for c in result.candidates] == [True] * k + [False] * (n - k)
    assert [c.line for c in result.candidates] == sorted(c.line for c in result.candidates)
    # Idempotent with the same options: converted call sites still count as candidates.
    assert not rewrite_source(result.code, ratio=2 / 3).changed
    third = rewrite_source(SELECTION, ratio=1 / 3)  # 7 call sites: round(2.33) = 2, the first two
    assert [c.converted for c in third.candidates] == [True, True] + [False] * 5
    zero = rewrite_source(MODEL, ratio=0.0)
    assert not zero.changed and zero.code == MODEL and len(zero.candidates) == 2


SELECTION = """import torch.nn as nn
import torch.nn.functional as F


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 1)
        self.conv2 = nn.Conv1d(8, 16, 1)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x, w):
        return F.linear(self.conv2(self.conv1(x)), w)


def head():
    return nn.Linear(4, 2)
"""


@pytest.mark.parametrize("include, exclude, converted", [
    (["self.fc*"], None, [10, 10]),
    ("self.fc2", [], [10]),  # a tuple target pairs element by element
    (["self.conv2", "self.mlp"], [], [9, 11]),  # the whole value of the assignment matches
    (["Encoder"], [], [8, 9, 10, 10, 11, 14]),  # a class matches everything inside it
    (["*.forward", "head"], [], [14, 18]),
    (["Encoder.__init__"], ["self.fc2"], [8, 9, 10, 11]),
    ([], ["Encoder"], [18]),  # exclude alone: everything else (ratio 1)
    ([], ["self.*"], [14, 18]),
    (None, "Encoder.forward", [8, 9, 10]),  # with ratio 0.5: half of the 6 call sites left
])
def test_include_exclude_targets_and_scopes(include, exclude, converted):
    ratio = 0.5 if exclude == "Encoder.forward" else 1.0
    result = rewrite_source(SELECTION, ratio=ratio, include=include, exclude=exclude)
    assert [c.line for c in result.converted] == converted
    assert not rewrite_source(result.code, ratio=ratio, include=include, exclude=exclude).changed


def test_include_on_the_zoo_by_class(zoo_pair):
    result = rewrite_source(ZOO_PATH.read_text(), include=["DGCNN"], exclude=["self.linear*"])
    assert {c.scope for c in result.converted} == {"DGCNN.__init__"}
    assert [c.targets[0] for c in result.converted] == [f"self.conv{i}" for i in range(1, 6)]


def test_unmatched_patterns_warn_naming_them():
    with pytest.warns(UserWarning, match=r"pattern\(s\) 'self\.nothing' match no call site "
                                         r"\(call sites are named like: m, f\)"):
        rewrite_source("import torch\nm = torch.nn.Linear(1, 2)\ndef f():\n    return torch.nn.Linear(1, 2)\n",
                       include=["self.nothing", "m"])
    with pytest.warns(UserWarning, match="'Nope' match no call site"):
        rewrite_source("import torch\nm = torch.nn.Linear(1, 2)\n", exclude=["Nope"])


def test_no_candidates_left_alone():
    result = rewrite_source("import torch\nx = torch.relu(torch.ones(1))\n", path="util.py")
    assert not result.changed and not result.candidates
    assert result.report() == ("util.py: no candidates (no nn.Conv1d/2d/3d, nn.Linear, F.conv1d/2d/3d or F.linear "
                               "calls); left unchanged")


def test_syntax_error_names_file_line_column():
    with pytest.raises(RewriteError, match=r"^bad\.py:3:7: syntax error: invalid syntax$") as info:
        rewrite_source("import torch\nm = torch.nn.Linear(1, 2)\ndef f(:\n    pass\n", path="bad.py")
    assert (info.value.path, info.value.line) == ("bad.py", 3)


# --------------------------------------------------------------------------- CLI
MODEL = '''import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 1)  # first
        self.fc = nn.Linear(8, 2)
'''
UTIL = "import torch\n\n\ndef helper(x):\n    return torch.relu(x)\n"
BAD = "import torch.nn as nn\nm = nn.Linear(1, 2)\nif True\n    pass\n"


def make_tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / ".venv").mkdir()
    (root / "pkg" / "model.py").write_text(MODEL)
    (root / "pkg" / "sub" / "util.py").write_text(UTIL)
    (root / "pkg" / "sub" / "net2.py").write_text(MODEL.replace("Net", "Net2"))
    (root / "pkg" / ".venv" / "ignored.py").write_text(MODEL)
    (root / "pkg" / "notes.txt").write_text("not python")
    return root / "pkg"


def snapshot(root):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_single_file_prints_to_stdout_and_never_touches_input(tmp_path, capsysbinary):
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    before = snapshot(tmp_path)
    assert main([str(model)]) == 0
    out, err = capsysbinary.readouterr()
    assert out.decode() == rewrite_file(model).code.decode() and b"l1fx.nn.L1Conv1d(3, 8, 1)  # first" in out
    assert b"rewrote 2 calls (nn.Conv1d x1, nn.Linear x1)" in err
    assert snapshot(tmp_path) == before


def test_cli_several_inputs_need_an_output_mode(tmp_path, capsys):
    pkg = make_tree(tmp_path)
    assert main([str(pkg)]) == 2
    assert "choose -o DIR, --in-place, --diff or --check" in capsys.readouterr().err


def test_cli_output_file_and_directory(tmp_path, capsys):
    pkg = make_tree(tmp_path)
    before = snapshot(pkg)
    out_file = tmp_path / "new" / "model_l1.py"
    assert main([str(pkg / "model.py"), "-o", str(out_file)]) == 0
    assert out_file.read_text() == rewrite_source(MODEL).code
    assert main([str(pkg / "model.py"), "-o", str(out_file.parent)]) == 0  # an existing directory
    assert (out_file.parent / "model.py").read_text() == rewrite_source(MODEL).code

    out_dir = tmp_path / "out"
    assert main([str(pkg), "-o", str(out_dir)]) == 0
    written = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert written == ["model.py", "sub/net2.py", "sub/util.py"]  # hidden dirs and non-.py skipped
    assert (out_dir / "sub" / "util.py").read_text() == UTIL  # no candidates: copied unchanged
    assert "l1fx.nn.L1Linear" in (out_dir / "sub" / "net2.py").read_text()
    assert "no candidates" in capsys.readouterr().err
    assert snapshot(pkg) == before
    assert not [p for p in tmp_path.rglob("*.tmp")]

    # Refuses to write over an input, and two inputs with one output name.
    assert main([str(pkg / "model.py"), "-o", str(pkg / "model.py")]) == 2
    assert "use --in-place" in capsys.readouterr().err
    assert main([str(pkg / "model.py"), str(pkg / "sub"), "-o", str(tmp_path / "o2")]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.py").write_text(MODEL)
    assert main([str(pkg / "model.py"), str(tmp_path / "other" / "model.py"), "-o", str(tmp_path / "o3")]) == 2
    assert "would both be written" in capsys.readouterr().err and not (tmp_path / "o3").exists()
    assert snapshot(pkg) == before


def test_cli_in_place(tmp_path, capsys):
    pkg = make_tree(tmp_path)
    model, util = pkg / "model.py", pkg / "sub" / "util.py"
    os.chmod(model, 0o640)
    util_before = (util.read_bytes(), util.stat().st_mtime_ns)
    assert main([str(pkg), "--in-place"]) == 0
    assert model.read_text() == rewrite_source(MODEL).code
    assert (model.stat().st_mode & 0o777) == 0o640  # the file keeps its permissions
    assert (util.read_bytes(), util.stat().st_mtime_ns) == util_before  # no candidates: untouched
    assert (pkg / ".venv" / "ignored.py").read_text() == MODEL
    assert not list(pkg.rglob("*.tmp"))
    real = tmp_path / "real.py"
    real.write_text(MODEL)
    link = tmp_path / "link.py"
    link.symlink_to(real)
    assert main([str(link), "--in-place"]) == 0
    assert link.is_symlink() and real.read_text() == rewrite_source(MODEL).code  # written through the link
    capsys.readouterr()
    assert main([str(pkg), "--check"]) == 0  # idempotent
    assert main([str(pkg), "--in-place"]) == 0 and model.read_text() == rewrite_source(MODEL).code


def test_cli_diff_and_check_write_nothing(tmp_path, capsys):
    pkg = make_tree(tmp_path)
    before = snapshot(tmp_path)
    assert main([str(pkg), "--diff"]) == 0
    out = capsys.readouterr().out
    assert f"--- {pkg / 'model.py'}\t(original)" in out and f"+++ {pkg / 'sub' / 'net2.py'}\t(rewritten)" in out
    assert "-        self.conv1 = nn.Conv1d(3, 8, 1)  # first\n" in out
    assert "+        self.conv1 = l1fx.nn.L1Conv1d(3, 8, 1)  # first\n" in out
    assert "+import l1fx.nn\n" in out and "util.py" not in out
    assert main([str(pkg), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"would rewrite {pkg / 'model.py'}" in err and "2 of 3 file(s) would be rewritten" in err
    assert main([str(pkg / "sub" / "util.py"), "--check"]) == 0
    assert snapshot(tmp_path) == before


def test_cli_selection_options(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    assert main([str(model), "--ratio", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert "l1fx.nn.L1Conv1d" in out and "nn.Linear(8, 2)" in out
    assert "1 left dense by the selection: self.fc (nn.Linear, line 8)" in err
    assert main([str(model), "--include", "self.fc", "--ratio", "0"]) == 0
    out, err = capsys.readouterr()
    assert "nn.Conv1d(3, 8, 1)" in out and "l1fx.nn.L1Linear" in out
    assert "warning: --ratio is ignored with --include" in err
    assert main([str(model), "--exclude", "Net", "--include", "self.zzz"]) == 0
    out, err = capsys.readouterr()
    assert out == MODEL
    assert ("warning: --include/--exclude pattern(s) 'self.zzz' match no call site in any file "
            "(call sites are named like: self.conv1, Net.__init__, self.fc)") in err
    assert main([str(model), "--ratio", "1.5"]) == 2  # one line, no usage block (l1fx._cli.ArgumentParser)
    err = capsys.readouterr().err
    assert "must be in [0, 1]" in err and len(err.strip().splitlines()) == 1


def test_cli_syntax_error_refused_and_nothing_written(tmp_path, capsys):
    pkg = make_tree(tmp_path)
    (pkg / "bad.py").write_text(BAD)
    before = snapshot(tmp_path)
    for mode in (["-o", str(tmp_path / "out")], ["--in-place"]):
        assert main([str(pkg), *mode]) == 2
        err = capsys.readouterr().err
        assert f"error: {pkg / 'bad.py'}:3:8: syntax error" in err and "nothing was written" in err
        assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_cli_missing_file(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    assert main([str(model), str(tmp_path / "nope.py"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nope.py'}: no such file or directory" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(RewriteError, match="no such file"):
        rewrite_file(tmp_path / "nope.py")


def test_failed_write_leaves_the_file_intact(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model.py"
    model.write_text(MODEL)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    assert main([str(model), "--in-place"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert model.read_text() == MODEL and sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def test_python_dash_m_entry_point(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    proc = subprocess.run([sys.executable, "-m", "l1fx.rewrite", str(model), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"would rewrite {model}" in proc.stderr and model.read_text() == MODEL
