"""The source codemod: dense layer calls -> l1fx calls, as a libcst ``VisitorBasedCodemodCommand``.

:class:`L1Codemod` runs under libcst's own driver as well as under
``python -m l1fx.rewrite``::

    python -m libcst.tool codemod -x --no-format l1fx.rewrite.codemod.L1Codemod model.py [--ratio R]

One run (:meth:`L1Codemod.rewrite`): the :class:`~.collect.Collector` finds the
call sites the layer registry names, :func:`select_sites` picks them with
convert's selection core (:func:`l1fx.passes.select.choose_in_order`), the
chosen callees are replaced and ``import l1fx.nn`` / ``import l1fx.functional``
is added once (see :func:`add_imports` for why not libcst's AddImportsVisitor).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import libcst as cst
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand
from libcst.metadata import MetadataWrapper

from l1fx import layers
from l1fx._cli import ratio_type
from l1fx.errors import UsageError
from l1fx.passes.select import check_ratio, choose_in_order

from .collect import FACTORY_HINTS, Collector, Tables
from .results import CallSite, Note, RewriteError, named_like, site_names

__all__ = ["L1Codemod", "Outcome", "select_sites", "select", "DENSE_TO_L1", "L1_NAMES", "Patterns", "add_imports"]


# ----------------------------------------------------------------- what is rewritten (the layer registry)
class _SourceTable(Mapping):
    """Live view of :func:`l1fx.layers.source_table`: qualified dense name -> qualified l1 replacement."""

    def __getitem__(self, name: str) -> str:
        return layers.source_table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(layers.source_table())

    def __len__(self) -> int:
        return len(layers.source_table())

    def __repr__(self) -> str:
        return f"DENSE_TO_L1({layers.source_table()!r})"


class _L1Names(Set):
    """Live view of :func:`l1fx.layers.l1_source_names`: calls that are already l1."""

    def __contains__(self, name) -> bool:
        return name in layers.l1_source_names()

    def __iter__(self) -> Iterator[str]:
        return iter(layers.l1_source_names())

    def __len__(self) -> int:
        return len(layers.l1_source_names())

    def __repr__(self) -> str:
        return f"L1_NAMES({set(layers.l1_source_names())!r})"


# Views, not copies: a layer kind registered later (a plug-in's) shows here and is rewritten.
DENSE_TO_L1: Mapping[str, str] = _SourceTable()
L1_NAMES: Set[str] = _L1Names()

# The dense functionals call their first argument ``input``; the l1 ones ``x``.
_FUNCTIONAL_KEYWORDS = {"input": "x"}


# ----------------------------------------------------------------- selection
Patterns = Union[None, str, Sequence[str]]


def select_sites(names: Sequence[Sequence[str]], ratio: float = 1.0, include: Patterns = None,
                 exclude: Patterns = None) -> tuple[list[bool], list[str], list[str]]:
    """Choose call sites, given each one's names, in source order: convert's rules.

    ``ratio`` selects the first ``round(ratio * n)`` call sites (halves round
    up, as :func:`l1fx.passes.select.nearest_count`). ``include``/``exclude``
    are fnmatch patterns (case-sensitive; a pattern also matches what lies
    below a dotted name, ``"PointNet"`` matches ``"PointNet.__init__"``) and
    override the ratio: with ``include`` exactly the matching call sites are
    selected; ``exclude`` removes matching ones, and the ratio then counts
    only the call sites left. Returns the flags and the include/exclude
    patterns that matched nothing. The rules are
    :func:`l1fx.passes.select.choose_in_order`'s.
    """
    ratio = check_ratio(ratio, unit="call sites", error=UsageError)
    choice = choose_in_order(names, ratio, _patterns(include, "include"), _patterns(exclude, "exclude"),
                             unit="call sites")
    return choice.selected, choice.unmatched_include, choice.unmatched_exclude


select = select_sites  # the old name (l1fx.passes.select.select is convert's pass)


def _patterns(spec: Patterns, what: str) -> Optional[list[str]]:
    """Patterns as a list, or None; ``""`` and ``[]`` mean none. Functions are convert's, not the codemod's."""
    if spec is None or isinstance(spec, str):
        return None if not spec else [spec]
    if callable(spec):
        raise TypeError(f"{what}: source rewriting takes fnmatch patterns, not a function")
    return list(spec) or None


# ----------------------------------------------------------------- the transform
def lp_names() -> dict[str, str]:
    """Qualified l1 replacement -> its ℓp counterpart (``l1fx.nn.L1Linear`` -> ``l1fx.nn.LpLinear``), per kind."""
    from l1fx.layers import lp

    table = {}
    for spec in layers.specs():
        if spec.name in lp.KINDS:
            table[spec.l1_module] = lp.LP_MODULES[spec.name]
            table[spec.l1_function] = lp.LP_FUNCTIONS[spec.name]
    return table


def _check_p(p) -> float:
    from l1fx.kernels.lp import check_p

    return check_p(p, "p", error=UsageError)


def p_type(text: str) -> float:
    """argparse type of ``--p``: a number >= 1, or ``inf``."""
    from l1fx.kernels.lp import check_p

    return check_p(text, "--p", error=argparse.ArgumentTypeError)


def _p_literal(p: float) -> str:
    return 'float("inf")' if p == float("inf") else repr(float(p))


class _Replacer(cst.CSTTransformer):
    def __init__(self, chosen: dict[int, str], p: float = 1.0):
        super().__init__()
        self.chosen = chosen  # id(original Call) -> qualified replacement name
        self.p = p  # != 1: the call gets a trailing p=... argument (the replacement is an ℓp name)

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        l1 = self.chosen.get(id(original_node))
        if l1 is None:
            return updated_node
        args = updated_node.args
        if l1.startswith("l1fx.functional."):
            args = [a.with_changes(keyword=cst.Name(_FUNCTIONAL_KEYWORDS[a.keyword.value]))
                    if a.keyword is not None and a.keyword.value in _FUNCTIONAL_KEYWORDS else a for a in args]
        if self.p != 1.0:
            args = list(args)
            if args and args[-1].comma is cst.MaybeSentinel.DEFAULT:
                args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
            args.append(cst.Arg(value=cst.parse_expression(_p_literal(self.p)), keyword=cst.Name("p"),
                                equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                                      whitespace_after=cst.SimpleWhitespace(""))))
        return updated_node.with_changes(func=cst.parse_expression(l1), args=args)


def add_imports(module: cst.Module, names: Sequence[str]) -> cst.Module:
    """Add ``import NAME`` for each name not imported so at module level.

    They go right after the module's leading docstring/import block (so after
    any ``from __future__`` import). Not libcst's AddImportsVisitor: it also
    inserts a blank line before the first statement after the imports (a byte
    the user did not ask for), adds a duplicate of an ``import l1fx.nn`` found
    further down, and costs two more passes over the tree; only top-level
    statements need looking at here.
    """
    body = list(module.body)
    present = {
        module.code_for_node(alias.name)
        for stmt in body if isinstance(stmt, cst.SimpleStatementLine)
        for small in stmt.body if isinstance(small, cst.Import)
        for alias in small.names if alias.asname is None
    }
    missing = [n for n in names if n not in present]
    if not missing:
        return module
    at = 0
    for i, stmt in enumerate(body):
        small = stmt.body if isinstance(stmt, cst.SimpleStatementLine) else []
        if small and all(isinstance(s, (cst.Import, cst.ImportFrom)) for s in small):
            at = i + 1
        elif not (i == 0 and len(small) == 1 and isinstance(small[0], cst.Expr)
                  and isinstance(small[0].value, (cst.SimpleString, cst.ConcatenatedString))):
            break
        elif at == 0:
            at = 1  # after the docstring
    new = [cst.parse_statement(f"import {n}{module.default_newline}", module.config_for_parsing) for n in missing]
    return module.with_changes(body=body[:at] + new + body[at:])


@dataclass
class Outcome:
    """One module rewritten by :meth:`L1Codemod.rewrite` (``module`` is the input when nothing changed)."""

    module: cst.Module
    candidates: list[CallSite]
    notes: list[Note] = field(default_factory=list)
    unmatched_include: list[str] = field(default_factory=list)
    unmatched_exclude: list[str] = field(default_factory=list)


class L1Codemod(VisitorBasedCodemodCommand):
    """Rewrite dense layer calls to their l1fx equivalents (the kinds of :mod:`l1fx.layers`)."""

    DESCRIPTION = ("Rewrite nn.Conv1d/2d/3d, nn.Linear, F.conv1d/2d/3d and F.linear calls to their l1fx "
                   "equivalents (l1fx.rewrite; see docs/rewrite.md).")

    def __init__(self, context: CodemodContext, ratio: Optional[float] = None, include: Patterns = None,
                 exclude: Patterns = None, p: Optional[float] = None) -> None:
        super().__init__(context)
        self.ratio = 1.0 if ratio is None else ratio
        self.p = 1.0 if p is None else p_type(p) if isinstance(p, str) else _check_p(p)
        self.include, self.exclude = include, exclude
        self.outcome: Optional[Outcome] = None  # of the last module transformed

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        """``--ratio``, ``--include``, ``--exclude``: libcst.tool's options for this codemod, and l1fx.rewrite's."""
        arg_parser.add_argument("--ratio", type=ratio_type, default=None, metavar="R",
                                help="fraction of call sites to convert, in source order, per file (default 1); "
                                     "ignored with --include")
        arg_parser.add_argument("--include", action="append", default=[], metavar="PAT",
                                help="fnmatch pattern over assignment targets (self.conv1) and the enclosing "
                                     "class/function (PointNet, PointNet.__init__); exactly the matching call "
                                     "sites are converted. Repeatable")
        arg_parser.add_argument("--exclude", action="append", default=[], metavar="PAT",
                                help="like --include, but matching call sites stay dense; --ratio counts the "
                                     "others. Repeatable")
        arg_parser.add_argument("--p", type=p_type, default=None, metavar="P",
                                help="make ℓp layers (l1fx.nn.LpLinear(..., p=P) ...): a number >= 1 or inf "
                                     "(default 1: the l1 layers)")

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        """libcst's entry point: the rewritten module; notes and unmatched patterns become codemod warnings."""
        outcome = self.rewrite(tree)
        for n in outcome.notes:
            self.warn(f"{n.line}:{n.column}: note: {n.message}")
        unmatched = outcome.unmatched_include + outcome.unmatched_exclude
        if unmatched:
            self.warn(f"include/exclude pattern(s) {', '.join(map(repr, unmatched))} match no call site "
                      f"({named_like(outcome.candidates)})")
        return outcome.module

    def rewrite(self, tree: cst.Module, text: Optional[str] = None) -> Outcome:
        """Rewrite ``tree``: find the call sites, select, replace, add imports. ``text`` is its source, if known.

        Raises :class:`~l1fx.rewrite.RewriteError` where a chosen call would not find its package.
        """
        path = self.context.filename or "<string>"
        tables = Tables.current()
        wrapper = MetadataWrapper(tree, unsafe_skip_copy=True)  # the tree is not shared: no defensive copy
        collector = Collector(wrapper.module, tables)
        # Name resolution is the slow part; a file that never spells a candidate's
        # leaf name (every import style spells it somewhere) cannot have one.
        text = tree.code if text is None else text
        if any(leaf in text for leaf in tables.leaves) or any(h in text for h in FACTORY_HINTS):
            wrapper.visit(collector)

        flags, unmatched_inc, unmatched_exc = select_sites(
            [site_names(s.targets, s.scope) for s in collector.sites], self.ratio, self.include, self.exclude)
        candidates = [
            CallSite(s.line, s.column, s.callee, s.dense, s.l1, s.targets, s.scope, f, already_l1=not s.dense)
            for s, f in zip(collector.sites, flags)
        ]
        chosen = {id(s.node): s.l1 for s, c in zip(collector.sites, candidates) if c.converted}
        if self.p != 1.0:
            lp = lp_names()
            chosen = {k: lp.get(v, v) for k, v in chosen.items()}
        for s, c in zip(collector.sites, candidates):
            if c.converted and s.clash:
                package = s.l1.split(".", 1)[0]
                raise RewriteError(path, *s.clash, f"the name {package!r} is bound here to something other than "
                                   f"the {package} package, and the call rewritten at line {s.line} needs it; "
                                   "rename it")
        module = wrapper.module
        if chosen:
            module = module.visit(_Replacer(chosen, self.p))
            module = add_imports(module, sorted({l1.rsplit(".", 1)[0] for l1 in chosen.values()}))
        self.outcome = Outcome(module, candidates, collector.notes, unmatched_inc, unmatched_exc)
        return self.outcome
