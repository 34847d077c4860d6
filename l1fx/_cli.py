"""Shared pieces of the l1fx command lines (rewrite, export, report).

One convention for all of them (see :func:`run_cli`): a usage or input error (bad option, missing file, a shape
the model rejects, an output path that cannot be written) prints one line on stderr and exits 2; any other
:class:`~l1fx.errors.L1fxError` (the work itself failed) prints one line and exits 1; a traceback means a bug
in l1fx. The option builders (:func:`add_model_arguments`, :func:`add_input_arguments`,
:func:`add_selection_arguments`, :func:`add_output_argument`) give the same options the same names everywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

from . import _atomicfile
from ._util import evaluating
from .errors import ConversionError, L1fxError, UsageError

T = TypeVar("T")


class CLIError(UsageError):
    """A user-facing command-line error: printed as one line, no traceback, exit 2."""


# The exit codes every l1fx command line uses.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def write_stdout(text: str = "", data: Optional[bytes] = None) -> None:
    """Write the command's result to stdout (``data`` as bytes where stdout has a byte stream), flushed now.

    A stdout that cannot be written (a full disk, a closed pipe) is a :class:`CLIError` (one line, exit 2),
    not a traceback at interpreter exit.
    """
    try:
        if data is not None and hasattr(sys.stdout, "buffer"):
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except OSError as e:
        try:  # nothing more can reach this stdout: don't let the interpreter's final flush fail again
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        raise CLIError(f"cannot write to stdout: {e.strerror or e}") from None


def run_cli(prog: str, body, argv) -> int:
    """Run ``body(argv) -> int`` with the shared convention of the l1fx command lines.

    A :class:`~l1fx.errors.UsageError` (bad option, file, shape) prints one line and exits 2; any other
    :class:`~l1fx.errors.L1fxError` (the work itself failed) prints one line and exits 1. Anything else is a
    bug in l1fx and keeps its traceback.
    """
    try:
        return body(argv)
    except UsageError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except L1fxError as e:
        print(f"{prog}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    # Some messages carry indented detail lines (e.g. the exporter's summary); the convention is one line.
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`CLIError`: under :func:`run_cli` one line on stderr and exit 2
    (no usage block), and ``main(argv)`` returns 2 instead of raising ``SystemExit``."""

    def error(self, message: str):
        raise CLIError(f"{message} (see --help)")


# ---------------------------------------------------------------- shared options
class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: still works, says once on stderr what to use instead."""

    canonical = ""

    def __call__(self, parser, namespace, values, option_string=None):
        name = parser.prog[len("python -m "):] if parser.prog.startswith("python -m ") else parser.prog
        print(f"{name}: warning: {option_string} is deprecated, use {self.canonical}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _alias_of(canonical: str) -> type:
    return type("DeprecatedAlias", (_DeprecatedAlias,), {"canonical": canonical})


def add_model_arguments(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """``MODULE:NAME`` and ``--model-kwargs JSON`` (old spelling ``--kwargs``, hidden, still accepted)."""
    parser.add_argument("model", nargs="?" if optional else None, metavar="MODULE:NAME",
                        help="a .py file or importable module, and a class, factory function or module instance "
                             "in it (e.g. models/pointnet.py:PointNetCls)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="keyword arguments for NAME, as a JSON object (e.g. '{\"num_classes\": 10}')")
    parser.add_argument("--kwargs", dest="model_kwargs", action=_alias_of("--model-kwargs"), help=argparse.SUPPRESS)


def add_input_arguments(parser, *, required: bool = False) -> None:
    """``--input-shape B,C,...`` (repeatable: one per positional input of forward)."""
    parser.add_argument("--input-shape", action="append", default=None if required else [], required=required,
                        metavar="B,C,...", help="shape of one forward input (random normal float32); repeat for "
                                                "several positional inputs")


def ratio_type(text: str) -> float:
    """argparse type of ``--ratio``: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def init_type(text: str):
    """argparse type of ``--init`` (``l1fx.convert``'s ``init``): 'dense', 'data', 'auto' or a positive number."""
    if text in ("dense", "data", "auto"):
        return text
    try:
        factor = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'dense', 'data', 'auto' or a number, got {text!r}") from None
    if not factor > 0:
        raise argparse.ArgumentTypeError(f"the factor must be positive, got {text!r}")
    return factor


def add_selection_arguments(parser, *, what: str = "layers") -> None:
    """``--ratio R`` (default None, meaning 1), ``--include PAT``, ``--exclude PAT`` (repeatable)."""
    parser.add_argument("--ratio", type=ratio_type, default=None, metavar="R",
                        help=f"fraction of {what} to convert, in [0, 1] (default 1); ignored with --include")
    parser.add_argument("--include", action="append", default=[], metavar="PAT",
                        help=f"fnmatch pattern over {what}: exactly the matching ones are converted. Repeatable")
    parser.add_argument("--exclude", action="append", default=[], metavar="PAT",
                        help=f"fnmatch pattern over {what} that stay dense. Repeatable")
    # These commands export/report the model they are given (often a trained checkpoint): its weights are
    # kept unless asked otherwise, unlike l1fx.convert's default init='auto' for training from scratch.
    parser.add_argument("--init", type=init_type, default="dense", metavar="INIT",
                        help="weights of the l1 layers: 'dense' keeps the model's (default), 'auto', 'data' "
                             "(from the inputs) or a scale factor; see docs/convert.md")


def add_output_argument(parser, *, required: bool, help: str) -> None:
    parser.add_argument("-o", "--output", required=required, metavar="OUT", help=help)


# ---------------------------------------------------------------- loading the user's model
@contextlib.contextmanager
def _importable_siblings(directory: Path):
    """While the user's file runs, its directory is on ``sys.path`` *after* site-packages, so it can import
    its sibling files but a sibling named like an installed package (``onnx.py``, ``torch.py``) does not
    shadow it. ``sys.path`` is restored afterwards (also undoing whatever the file itself did to it); the
    modules imported stay in ``sys.modules``, so pickling the model keeps working in this process."""
    saved = list(sys.path)
    entry = str(directory)
    if entry not in sys.path:
        sys.path.append(entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved


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
        # Registered under its own name (not a package's) so pickle finds the model's class in this process.
        sys.modules[mod_name] = module
        try:
            with _importable_siblings(path.resolve().parent):
                mod_spec.loader.exec_module(module)
        except BaseException as e:  # noqa: BLE001  (user code, even sys.exit: report it in one line)
            sys.modules.pop(mod_name, None)
            if isinstance(e, KeyboardInterrupt):
                raise
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


def check_inputs(model: nn.Module, inputs: Sequence[torch.Tensor], source: str) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, no grad, the caller's RNG untouched): a model that
    rejects them is the user's input error (exit 2), named by the option ``source`` they came from."""
    try:
        with evaluating(model), torch.random.fork_rng(devices=[]):
            model(*inputs)
    except Exception as e:  # noqa: BLE001  (user code)
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise CLIError(f"{type(model).__name__} rejects {source} {shapes}: {type(e).__name__}: "
                       f"{_one_line(e)}") from e


def convert_model(model: nn.Module, args, inputs) -> nn.Module:
    """``l1fx.convert`` with the options of :func:`add_selection_arguments`; a failure is one line, exit 1."""
    from .convert import convert

    ratio = 1.0 if args.ratio is None else args.ratio
    try:
        return convert(model, ratio, include=args.include or None, exclude=args.exclude or None,
                       example_inputs=tuple(inputs), init=getattr(args, "init", "dense"))
    except L1fxError:
        raise
    except Exception as e:  # noqa: BLE001  (mostly the user's forward failing under tracing)
        raise ConversionError(f"l1fx.convert failed on {type(model).__name__}: {type(e).__name__}: "
                              f"{_one_line(e)}") from e


# ---------------------------------------------------------------- writing output files
class OutputPathError(UsageError):
    """The output path cannot be written (missing or non-directory parent, not writable, not a file)."""


def check_output_path(path: Path, what: str = "output", error: type = OutputPathError) -> Path:
    """The file to replace (a symlink's target), or :class:`OutputPathError` naming ``path`` and why.

    Checked before any slow work, so a wrong path fails at once. Only a regular file (or a new name) is
    replaced: renaming over a device or a fifo (``-o /dev/null`` as root) would destroy it.
    """
    try:
        target = Path(os.path.realpath(path)) if path.is_symlink() else path
        if target.is_dir():
            raise error(f"{what} {path} is a directory; pass a file path inside it")
        if target.exists() and not target.is_file():
            raise error(f"{what} {path} exists and is not a regular file; choose another path")
        parent = target.parent
        if not parent.exists():
            raise error(f"{what} {path}: directory {parent} does not exist; create it or choose "
                                  f"another path")
        if not parent.is_dir():
            raise error(f"{what} {path}: {parent} is not a directory; choose another path")
    except OSError as e:  # e.g. a parent that cannot be searched
        raise error(f"{what} {path} cannot be checked ({e.strerror or e}); choose another path") from e
    return target


def write_atomically(target: Path, work: Callable[[BinaryIO], T], what: str = "output",
                     error: type = OutputPathError) -> T:
    """``work(file)`` writes ``target``'s new content into a temporary file next to it; then it replaces ``target``.

    One implementation of atomic replacement, :func:`l1fx._atomicfile.atomic_write` (temp file in the same
    directory, fsync, rename, leftovers of killed writers removed); this adds the messages. The temporary file
    is created before ``work`` runs, so an unwritable directory fails before the (slow) work; anything
    ``work`` raises propagates and leaves ``target`` as it was, with no temporary file. Returns what ``work``
    returns. ``target`` should come from :func:`check_output_path`. The new file keeps the permissions of the
    file it replaces, else gets those ``open()`` would give.
    """
    phase = "create"
    result: list = []

    def write(f: BinaryIO) -> None:
        nonlocal phase
        phase = "work"
        result.append(work(f))
        phase = "write"
        f.flush()
        os.fsync(f.fileno())
        phase = "replace"

    try:
        _atomicfile.atomic_write(target, write)
    except OSError as e:
        why = e.strerror or e
        if phase == "create":
            raise error(f"{what} {target}: cannot create a file in {target.parent} ({why}); choose a writable "
                        f"directory") from e
        if phase == "write":
            raise error(f"{what} {target}: cannot write it ({why}); nothing was written there") from e
        if phase == "replace":
            raise error(f"{what} {target}: cannot replace it ({why}); nothing was written there") from e
        raise  # an OSError of the work itself is not about the output path
    return result[0]


def write_text_atomic(path: str, text: str, what: str = "output") -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: never a half-written file (:func:`write_atomically`)."""
    target = check_output_path(Path(path), what)
    write_atomically(target, lambda f: f.write(text.encode("utf-8")), what)
