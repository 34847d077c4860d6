"""Shared pieces of the l1fx command lines (export, report): finding the user's model and inputs."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

from torch import nn

from .errors import L1fxError, UsageError


class CLIError(UsageError):
    """A user-facing command-line error: printed as one line, no traceback, exit 2."""


# The exit codes every l1fx command line uses.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def run_cli(prog: str, body, argv) -> int:
    """Run ``body(argv) -> int`` with the shared convention of the l1fx command lines.

    A :class:`~l1fx.errors.UsageError` (bad option, file, shape) prints one line and exits 2; any other
    :class:`~l1fx.errors.L1fxError` (the work itself failed) prints one line and exits 1. Anything else is a
    bug in l1fx and keeps its traceback.
    """
    try:
        return body(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except L1fxError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def load_object(spec: str):
    """``path/to/file.py:Name`` or ``package.module:Name`` (``Name`` may be dotted) -> the object."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise CLIError(f"model must be 'file.py:ClassName' or 'package.module:ClassName', got {spec!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise CLIError(f"model file {target!r} not found")
        mod_name = f"_l1fx_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        # Let the file import its siblings, as when run from its own directory; it stays
        # importable afterwards because pickling the model may need it.
        sys.path.insert(0, str(path.resolve().parent))
        sys.modules[mod_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001  (user code: report it in one line)
            sys.modules.pop(mod_name, None)
            raise CLIError(f"importing {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise CLIError(f"cannot import module {target!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{what} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise CLIError(f"{what} must be a JSON object, e.g. '{{\"num_classes\": 10}}', got {text!r}")
    return value


def build_model(spec: str, kwargs: dict) -> nn.Module:
    """The model named by ``spec``: a class or factory called with ``kwargs``, or a module instance."""
    obj = load_object(spec)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise CLIError(f"{spec!r} is a module instance; constructor keyword arguments only apply to "
                           f"classes and factories")
        return obj
    if not callable(obj):
        raise CLIError(f"{spec!r} is neither an nn.Module class, a factory nor a module instance")
    try:
        model = obj(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"constructing {spec}(**{kwargs}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,1024"`` (or ``2x3x1024``) -> ``(2, 3, 1024)``."""
    try:
        shape = tuple(int(v) for v in text.split("," if "," in text else "x"))
    except ValueError:
        raise CLIError(f"--input-shape must be comma-separated integers like 2,3,1024, got {text!r}") from None
    if not shape or any(d < 0 for d in shape):
        raise CLIError(f"--input-shape must be non-empty non-negative integers, got {text!r}")
    return shape
