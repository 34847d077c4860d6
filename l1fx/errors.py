"""The exceptions every public l1fx function raises.

One hierarchy so a caller can catch ``l1fx.L1fxError`` for anything l1fx
reports on purpose. Each class also derives from the builtin a Python user
would expect (``ValueError`` for bad arguments, ``RuntimeError`` for things
that failed), so ``except ValueError`` keeps working.

The command lines (``python -m l1fx.rewrite|export|report``) print an
``L1fxError`` as one line and exit 2 when it is a :class:`UsageError` (bad
arguments or input files), 1 otherwise; see :mod:`l1fx._cli`.
"""
from __future__ import annotations

__all__ = [
    "L1fxError", "UsageError", "ConversionError", "ConversionFailed", "ConversionTypeError", "BackendUnavailable", "KernelBuildError", "KernelError",
    "ExportError", "VerificationError", "RewriteError", "TrainingError", "CheckpointError",
]


class L1fxError(Exception):
    """Base class of every error l1fx raises on purpose; the message says what to do."""


class UsageError(L1fxError, ValueError):
    """Bad arguments or input (a file, an option, a shape): the user can fix it."""


class ConversionError(L1fxError, ValueError):
    """``l1fx.convert`` cannot convert the model as asked."""


class ConversionFailed(ConversionError, RuntimeError):
    """Converting failed part-way (a layer, the converted model on example_inputs)."""


class ConversionTypeError(ConversionError, TypeError):
    """An argument of ``l1fx.convert`` has the wrong type."""


class BackendUnavailable(L1fxError, RuntimeError):
    """A kernel backend asked for by name cannot run here."""


class KernelBuildError(L1fxError, RuntimeError):
    """A compiled kernel library could not be built or loaded."""


class KernelError(L1fxError, RuntimeError):
    """A compiled kernel reported an error while running (not while being built)."""


class ExportError(L1fxError, RuntimeError):
    """The model could not be exported; the message says what failed and what to do."""


class VerificationError(ExportError):
    """An exported model's outputs do not match PyTorch's (or prove nothing)."""


class RewriteError(UsageError):
    """A source file cannot be rewritten (an input error: the CLI exits 2)."""


class TrainingError(L1fxError, ValueError):
    """``TrainingWrapper`` was given something it cannot train."""


class CheckpointError(L1fxError, RuntimeError):
    """A checkpoint cannot be written or read."""
