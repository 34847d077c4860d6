"""Rewrite model *source files* so their dense layers become l1 layers.

``python -m l1fx.rewrite PATH... [-o OUT | --in-place | --diff | --check]
[--ratio R] [--include PAT] [--exclude PAT]`` (see docs/rewrite.md). Exit
status: 0 ok; 2 a usage or input error or a failed write (one line per
problem); 1 only ``--check`` finding a file to rewrite; 3 an internal error
under ``--check``; 143 SIGTERM.

A libcst codemod (:class:`~l1fx.rewrite.codemod.L1Codemod`, which also runs
under ``python -m libcst.tool codemod``): constructor calls of
``nn.Conv1d/2d/3d`` and ``nn.Linear`` become ``l1fx.nn.L1Conv1d/2d/3d`` and
``l1fx.nn.L1Linear`` with the same arguments; calls of ``F.conv1d/2d/3d`` and
``F.linear`` become ``l1fx.functional.l1_conv1d/2d/3d`` and
``l1fx.functional.l1_linear`` (the kinds of the layer registry,
:mod:`l1fx.layers`). Names are resolved with libcst's QualifiedNameProvider,
so every import style is recognised and a local variable that shadows ``nn``
or ``F`` is not touched. Only the callee of a converted call changes (plus the
keyword ``input=`` of a functional call, which the l1 functions call ``x``);
``import l1fx.nn`` / ``import l1fx.functional`` is added once; every other
byte stays as it was.

Library use::

    from l1fx.rewrite import rewrite_source
    result = rewrite_source(code, ratio=1.0, include=None, exclude=["self.fc*"])
    result.code, result.changed, result.candidates, result.notes, result.report(), result.diff()

Modules: ``codemod`` (the codemod, selection, the registry's name tables),
``collect`` (the visitor finding call sites), ``results`` (what a rewrite
reports), ``source`` (decode, parse, rewrite one module), ``files`` (inputs,
outputs, atomic writes), ``cli`` (the command line; ``__main__`` runs it).
"""
from __future__ import annotations

from .cli import EXIT_INTERNAL, EXIT_TERMINATED, EXIT_WOULD_REWRITE, PROG, main
from .codemod import DENSE_TO_L1, L1_NAMES, L1Codemod, Patterns, select, select_sites
from .files import atomic_write
from .results import CallSite, Candidate, Note, RewriteError, RewriteResult
from .source import _rewrite, rewrite_file, rewrite_source  # noqa: F401  (_rewrite: the CLI's seam)

__all__ = [
    "Candidate", "CallSite", "Note", "RewriteResult", "RewriteError", "rewrite_source", "rewrite_file", "select",
    "select_sites", "main", "L1Codemod", "DENSE_TO_L1", "L1_NAMES",
]
