"""Every l1fx command line, run as a user would (subprocess), with bad input: the exit status of the shared
convention (2 for usage/input errors), a one-line message on stderr naming what is wrong, no traceback,
and nothing left behind. The cases are started together (each costs an interpreter start and a torch import,
~3 s CPU); the other error cases run in-process in test_onnx.py / test_report.py."""
import os
import subprocess
import sys

import pytest

MODEL = """
import torch
from torch import nn
from cli_test_blocks import width          # a sibling file: must stay importable

class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv1d(3, width(), 1)
        self.fc = nn.Linear(width(), classes)

    def forward(self, x):
        return self.fc(nn.functional.leaky_relu(self.c1(x), 0.1).amax(2))
"""

# A sibling named like an installed package: loading the model must not import it instead of onnx.
SHADOW = "raise SystemExit('the sibling onnx.py was imported instead of the onnx package')\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("project")
    (d / "net.py").write_text(MODEL)
    (d / "cli_test_blocks.py").write_text("def width():\n    return 6\n")
    (d / "onnx.py").write_text(SHADOW)
    (d / "out").mkdir()
    (d / "rewrite_me.py").write_text("import torch.nn as nn\nlayer = nn.Linear(3, 4)\n")
    return d


def _cases(d):
    net = f"{d / 'net.py'}:Net"
    good = ["--input-shape", "2,3,8"]
    return {
        # name: (argv, expected exit status, text the one stderr line must contain)
        "export ok despite a sibling onnx.py": (["l1fx.export", net, *good, "-o", str(d / "out" / "ok.onnx")], 0, None),
        "export zero batch": (["l1fx.export", net, "--input-shape", "0,3,8", "-o", str(d / "out" / "z.onnx")], 2,
                              "zero-size dimension"),
        "export shape rejected": (["l1fx.export", net, "--input-shape", "2,5,8", "-o", str(d / "out" / "s.onnx")],
                                  2, "Net rejects --input-shape (2, 5, 8)"),
        "export missing directory": (["l1fx.export", net, *good, "-o", str(d / "nowhere" / "m.onnx")], 2,
                                     f"directory {d / 'nowhere'} does not exist"),
        "export bad option": (["l1fx.export", net, *good, "-o", str(d / "out" / "x.onnx"), "--bogus"], 2,
                              "unrecognized arguments: --bogus"),
        "report shape rejected": (["l1fx.report", net, "--input-shape", "2,5,8"], 2, "Net rejects --input-shape"),
        "report bad option": (["l1fx.report", "--demo", "--bogus"], 2, "unrecognized arguments: --bogus"),
        "report unwritable output": (["l1fx.report", net, *good, "-o", str(d / "nowhere" / "r.txt")], 2,
                                     f"directory {d / 'nowhere'} does not exist"),
        "rewrite missing file": (["l1fx.rewrite", str(d / "none.py")], 2, "none.py"),
        "rewrite bad option": (["l1fx.rewrite", "--bogus", str(d / "rewrite_me.py")], 2, "--bogus"),
    }


@pytest.fixture(scope="module")
def runs(project):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    procs = {name: (subprocess.Popen([sys.executable, "-m", *argv], cwd=project / "out", env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE), code, text)
             for name, (argv, code, text) in _cases(project).items()}
    return {name: (p, *p.communicate(timeout=300), code, text) for name, (p, code, text) in procs.items()}


@pytest.mark.parametrize("name", list(_cases(__import__("pathlib").Path("/p"))))
def test_cli_exit_status_and_one_line_message(name, runs):
    proc, out, err, code, text = runs[name]
    assert "Traceback" not in err, err
    assert proc.returncode == code, (proc.returncode, err)
    if code == 0:
        assert "verified in onnxruntime at batch sizes [2, 3]" in out, out
        return
    lines = [ln for ln in err.splitlines() if "warning:" not in ln]  # deprecation/convert warnings may precede
    assert len(lines) == 1, err
    assert text in lines[0] and "error:" in lines[0], lines[0]


def test_nothing_left_behind(runs, project):
    assert all(p.returncode is not None for p, *_ in runs.values())
    assert sorted(os.listdir(project / "out")) == ["ok.onnx"]  # no temporary, no partial file
    assert sorted(os.listdir(project)) == ["cli_test_blocks.py", "net.py", "onnx.py", "out", "rewrite_me.py"]


def test_model_file_loads_without_touching_sys_path(tmp_path):
    """In-process: the file imports its siblings, the onnx package is not shadowed, sys.path is restored,
    and the model (class defined in the file) still pickles with torch.save."""
    import io

    import torch

    from l1fx._cli import build_model

    (tmp_path / "net.py").write_text(MODEL + "\nimport onnx\nONNX_FILE = onnx.__file__\n"
                                     "import sys\nsys.path.insert(0, 'junk-the-file-added')\n")
    (tmp_path / "cli_test_blocks.py").write_text("def width():\n    return 6\n")
    (tmp_path / "onnx.py").write_text(SHADOW)
    before = list(sys.path)
    model = build_model(f"{tmp_path / 'net.py'}:Net", {"classes": 2})
    assert sys.path == before
    module = sys.modules[type(model).__module__]
    assert "site-packages" in module.ONNX_FILE
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is type(model)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_unwritable_stdout_and_unsupported_opset_are_one_line_usage_errors(tmp_path):
    # A full stdout used to end in an OSError traceback with exit 1 (rewrite's "would rewrite" code), and an
    # opset the exporter cannot target was silently replaced by another one.
    model = tmp_path / "m.py"
    model.write_text("import torch\n\n\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                     "        self.fc = torch.nn.Linear(4, 3)\n\n    def forward(self, x):\n        return self.fc(x)\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    runs = {
        "report": (["l1fx.report", "--demo"], "/dev/full"),
        "rewrite": (["l1fx.rewrite", "--diff", str(model)], "/dev/full"),
        "opset": (["l1fx.export", f"{model}:M", "--input-shape", "2,4", "--opset", "3", "-o", str(tmp_path / "o.onnx")],
                  os.devnull),
    }
    procs = {}
    for name, (argv, out) in runs.items():
        with open(out, "w") as stdout:
            procs[name] = subprocess.Popen([sys.executable, "-m", *argv], stdout=stdout, stderr=subprocess.PIPE,
                                           text=True, cwd=tmp_path, env=env)
    for name, p in procs.items():
        err = p.communicate(timeout=300)[1]
        lines = [ln for ln in err.splitlines() if "rewrote" not in ln]
        assert p.returncode == 2, (name, err)
        assert "Traceback" not in err and len(lines) == 1, (name, err)
        assert ("opset 3 was asked for" if name == "opset" else "cannot write to stdout") in lines[0], (name, err)
    assert not (tmp_path / "o.onnx").exists()


def test_export_and_report_keep_the_models_weights_unless_init_is_given():
    """The CLIs export/report the model they are given (a loaded dense checkpoint, say): convert's default
    init='auto' would replace its weights, so they pass init='dense' unless --init says otherwise."""
    from types import SimpleNamespace

    import torch

    from l1fx import _cli

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = (torch.randn(5, 4),)
    args = SimpleNamespace(ratio=None, include=None, exclude=None, init="dense")
    kept = _cli.convert_model(model, args, x)
    assert torch.equal(kept.get_submodule("0").weight, model[0].weight)
    args.init = "data"
    assert not torch.equal(_cli.convert_model(model, args, x).get_submodule("0").weight, model[0].weight)
    assert _cli.init_type("auto") == "auto"
