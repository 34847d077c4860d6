"""Editable and non-editable installs both import every subpackage from the right place."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBPACKAGES = {"l1fx": "l1fx", "l1fx.passes": "passes", "l1fx.kernels": "kernels"}


def test_editable_install_maps_top_level_dirs():
    import l1fx
    import l1fx.kernels
    import l1fx.passes

    assert pathlib.Path(l1fx.passes.__file__).parent == ROOT / "passes"
    assert pathlib.Path(l1fx.kernels.__file__).parent == ROOT / "kernels"
    # Nothing leaks into the global namespace (checked away from the repo root,
    # which `python -m pytest` puts on sys.path).
    code = "import importlib.util as u; assert u.find_spec('passes') is None and u.find_spec('kernels') is None"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.slow
def test_non_editable_install_has_every_module(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    for pkg, src in SUBPACKAGES.items():
        installed = target.joinpath(*pkg.split("."))
        for f in (ROOT / src).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix in (".py", ".cpp", ".h", ".c", ".cu"):
                assert (installed / f.relative_to(ROOT / src)).exists(), f"{f} missing from the wheel"
    code = (
        "import l1fx, l1fx.passes, l1fx.kernels, l1fx.functional, l1fx.nn, torch;"
        "import pathlib;"
        f"assert pathlib.Path(l1fx.kernels.__file__).is_relative_to({str(target)!r});"
        "x = torch.randn(2, 3); w = torch.randn(4, 3);"
        "assert torch.allclose(l1fx.functional.l1_linear(x, w), -(x[:, None] - w).abs().sum(-1))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
