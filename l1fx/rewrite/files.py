"""Files for ``python -m l1fx.rewrite``: the inputs (directories walked), the -o mapping, atomic writes, stdout."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from l1fx import _atomicfile, _cli

__all__ = ["atomic_write", "walk", "Input", "collect_inputs", "output_paths", "write_stdout"]


# Writes go through a hidden temp file next to the target (``.NAME.l1fx-tmp-PID.*``), then ``os.replace``:
# readers see the old file or the new one, never half; see l1fx/_atomicfile.py.
atomic_write = _atomicfile.atomic_write_bytes


_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}


def walk(directory: Path) -> list[Path]:
    """``*.py`` files under ``directory``, sorted; hidden directories (``.git``, ``.venv``) are skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        found += [Path(root) / f for f in sorted(files) if f.endswith(".py")]
    return found


@dataclass
class Input:
    path: Path
    relative: Path  # where it goes under -o DIR
    from_directory: bool


def collect_inputs(paths: Sequence[str]) -> tuple[list[Input], list[str]]:
    inputs, errors = [], []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = walk(p)
            if not files:
                errors.append(f"{raw}: no *.py files in this directory")
            inputs += [Input(f, f.relative_to(p), True) for f in files]
        elif p.is_file():
            inputs.append(Input(p, Path(p.name), False))
        elif p.exists():
            errors.append(f"{raw}: not a regular file or directory")
        else:
            errors.append(f"{raw}: no such file or directory")
    return inputs, errors


def output_paths(inputs: list[Input], out: str) -> tuple[dict[Path, Path], list[str]]:
    """Map each input to its output file under ``-o``; errors for clashes and inputs overwritten."""
    out_path = Path(out)
    single_file = len(inputs) == 1 and not inputs[0].from_directory
    if single_file and not out_path.is_dir() and not out.endswith(os.sep):
        mapping = {inputs[0].path: out_path}
    else:
        if out_path.exists() and not out_path.is_dir():
            return {}, [f"-o {out}: several files to write but this is a file; give a directory"]
        mapping = {i.path: out_path / i.relative for i in inputs}
    errors, seen = [], {}
    for src, dst in mapping.items():
        key = os.path.realpath(dst)
        if key in seen:
            errors.append(f"-o {out}: {seen[key]} and {src} would both be written to {dst}")
        seen[key] = src
        if os.path.realpath(src) == key:
            errors.append(f"-o {out}: would overwrite the input {src}; use --in-place to do that")
    return mapping, errors


def write_stdout(data: Union[str, bytes], text: str) -> None:
    """``data`` as bytes where stdout has a byte stream (the file's own encoding); else ``text``.

    A stdout that cannot be written is one line and exit 2 (``l1fx._cli.write_stdout``)."""
    _cli.write_stdout(text, data if isinstance(data, bytes) else None)
