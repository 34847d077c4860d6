"""Rewrite model *source files* so their dense layers become l1 layers.

``python -m l1fx.rewrite PATH... [-o OUT | --in-place | --diff | --check]
[--ratio R] [--include PAT] [--exclude PAT]`` (see docs/rewrite.md).

A libcst codemod: constructor calls of ``nn.Conv1d/2d/3d`` and ``nn.Linear``
become ``l1fx.nn.L1Conv1d/2d/3d`` and ``l1fx.nn.L1Linear`` with the same
arguments; calls of ``F.conv1d/2d/3d`` and ``F.linear`` become
``l1fx.functional.l1_conv1d/2d/3d`` and ``l1fx.functional.l1_linear``.
Names are resolved with libcst's QualifiedNameProvider, so every import style
is recognised and a local variable that shadows ``nn`` or ``F`` is not touched.
Only the callee of a converted call changes (plus the keyword ``input=`` of a
functional call, which the l1 functions call ``x``); ``import l1fx.nn`` /
``import l1fx.functional`` is added once; every other byte stays as it was.

Library use::

    from l1fx.rewrite import rewrite_source
    result = rewrite_source(code, ratio=1.0, include=None, exclude=["self.fc*"])
    result.code, result.changed, result.candidates, result.notes, result.report(), result.diff()
"""
from __future__ import annotations

import argparse
import ast
import difflib
import numbers
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import libcst as cst
from libcst.metadata import (
    ImportAssignment,
    MetadataWrapper,
    PositionProvider,
    QualifiedNameProvider,
    ScopeProvider,
)

# Selection follows l1fx.convert's rules, with its helpers (docs/rewrite.md).
from l1fx.passes.select import Matcher, nearest_count

__all__ = [
    "Candidate", "Note", "RewriteResult", "RewriteError", "rewrite_source", "rewrite_file", "select", "main",
]

# ----------------------------------------------------------------- what is rewritten


def _dense_names() -> dict[str, str]:
    """Qualified dense name -> qualified l1 replacement (every public spelling torch exposes)."""
    table = {}
    for cls, home in (("Conv1d", "conv"), ("Conv2d", "conv"), ("Conv3d", "conv"), ("Linear", "linear")):
        for prefix in ("torch.nn", "torch.nn.modules", f"torch.nn.modules.{home}"):
            table[f"{prefix}.{cls}"] = f"l1fx.nn.L1{cls}"
    for fn in ("conv1d", "conv2d", "conv3d", "linear"):
        table[f"torch.nn.functional.{fn}"] = f"l1fx.functional.l1_{fn}"
    for fn in ("conv1d", "conv2d", "conv3d"):  # F.conv*d *is* torch.conv*d
        table[f"torch.{fn}"] = f"l1fx.functional.l1_{fn}"
    return table


DENSE_TO_L1: dict[str, str] = _dense_names()

# Calls that are already l1: they count as candidates (so selection, and hence a
# second run with the same options, sees the same list) but are never changed.
L1_NAMES: frozenset[str] = frozenset(
    set(DENSE_TO_L1.values())
    | {f"l1fx.L1{c}" for c in ("Conv1d", "Conv2d", "Conv3d", "Linear")}
)

_LEAF_NAMES = frozenset(n.rsplit(".", 1)[1] for n in DENSE_TO_L1.keys() | L1_NAMES)

# The dense functionals call their first argument ``input``; the l1 ones ``x``.
_FUNCTIONAL_KEYWORDS = {"input": "x"}


def _short(qualified: str) -> str:
    """``torch.nn.modules.conv.Conv1d`` -> ``nn.Conv1d``; ``torch.nn.functional.linear`` -> ``F.linear``."""
    leaf = qualified.rsplit(".", 1)[1]
    return f"nn.{leaf}" if leaf[0].isupper() else f"F.{leaf}"


# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class Candidate:
    """One call site of a dense (or already l1) layer, in source order."""

    line: int
    column: int  # 1-based, as editors show it
    callee: str  # the call's function as written, e.g. "nn.Conv1d"
    dense: str  # qualified dense name, e.g. "torch.nn.Conv1d" ("" when already_l1)
    l1: str  # qualified replacement, e.g. "l1fx.nn.L1Conv1d"
    targets: tuple[str, ...]  # assignment target(s) of the enclosing statement, e.g. ("self.conv1",)
    scope: str  # enclosing class/function path, e.g. "PointNet.__init__" ("" at module level)
    selected: bool
    already_l1: bool

    @property
    def converted(self) -> bool:
        return self.selected and not self.already_l1

    @property
    def names(self) -> tuple[str, ...]:
        """What include/exclude patterns are matched against."""
        return _names(self.targets, self.scope)

    @property
    def label(self) -> str:
        where = self.targets[0] if self.targets else (self.scope or "<module>")
        return f"{where} ({self.callee}, line {self.line})"


@dataclass(frozen=True)
class Note:
    """Something the user should know that did not stop the rewrite."""

    line: int
    column: int
    message: str


@dataclass
class RewriteResult:
    """What :func:`rewrite_source` did to one module; ``code`` is the rewritten source."""

    original: Union[str, bytes]
    code: Union[str, bytes]  # same type as ``original``
    candidates: list[Candidate]
    notes: list[Note] = field(default_factory=list)
    unmatched_include: list[str] = field(default_factory=list)
    unmatched_exclude: list[str] = field(default_factory=list)
    path: str = "<string>"
    encoding: str = "utf-8"  # of the source (libcst reads PEP 263 cookies); bytes ``code`` keeps it

    @property
    def changed(self) -> bool:
        return self.code != self.original

    @property
    def converted(self) -> list[Candidate]:
        return [c for c in self.candidates if c.converted]

    def text(self, which: str = "code") -> str:
        """``code`` (or ``original``) as str."""
        value = getattr(self, which)
        return value if isinstance(value, str) else value.decode(self.encoding)

    def diff(self) -> str:
        """Unified diff original -> rewritten (empty when unchanged)."""
        a, b = self.text("original").splitlines(True), self.text("code").splitlines(True)
        lines = difflib.unified_diff(a, b, f"{self.path}\t(original)", f"{self.path}\t(rewritten)")
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)

    def report(self) -> str:
        """One summary line, then a line per note (``file:line:col: note: ...``)."""
        lines = [f"{self.path}: {self._summary()}"]
        lines += [f"{self.path}:{n.line}:{n.column}: note: {n.message}" for n in self.notes]
        return "\n".join(lines)

    def _summary(self) -> str:
        if not self.candidates:
            return "no candidates (no nn.Conv1d/2d/3d, nn.Linear, F.conv1d/2d/3d or F.linear calls); left unchanged"
        done = self.converted
        already = sum(c.already_l1 for c in self.candidates)
        kept = [c for c in self.candidates if not c.selected and not c.already_l1]
        if done:
            counts: dict[str, int] = {}
            for c in done:
                counts[_short(c.dense)] = counts.get(_short(c.dense), 0) + 1
            what = ", ".join(f"{k} x{v}" for k, v in counts.items())
            text = f"rewrote {len(done)} call{'s' * (len(done) != 1)} ({what})"
        else:
            text = "nothing to rewrite"
        if already:
            text += f"; {already} already l1fx"
        if kept:
            shown = ", ".join(c.label for c in kept[:8]) + (", ..." if len(kept) > 8 else "")
            text += f"; {len(kept)} left dense by the selection: {shown}"
        return text


class RewriteError(ValueError):
    """A file that cannot be rewritten; ``str()`` is ``file:line:col: message``."""

    def __init__(self, path: str, line: Optional[int], column: Optional[int], message: str):
        self.path, self.line, self.column, self.message = path, line, column, message
        where = path if line is None else f"{path}:{line}:{column}"
        super().__init__(f"{where}: {message}")


# ----------------------------------------------------------------- selection

Patterns = Union[None, str, Sequence[str]]


def _names(targets: tuple[str, ...], scope: str) -> tuple[str, ...]:
    """A call site's names for include/exclude: its assignment targets, then its enclosing class/function path."""
    return targets + ((scope,) if scope else ())


def select(names: Sequence[Sequence[str]], ratio: float = 1.0, include: Patterns = None,
           exclude: Patterns = None) -> tuple[list[bool], list[str], list[str]]:
    """Choose call sites, given each one's names, in source order: convert's rules.

    ``ratio`` selects the first ``round(ratio * n)`` call sites (halves round
    up, as :func:`l1fx.passes.select.nearest_count`). ``include``/``exclude``
    are fnmatch patterns (case-sensitive; a pattern also matches what lies
    below a dotted name, ``"PointNet"`` matches ``"PointNet.__init__"``) and
    override the ratio: with ``include`` exactly the matching call sites are
    selected; ``exclude`` removes matching ones, and the ratio then counts
    only the call sites left. Returns the flags and the include/exclude
    patterns that matched nothing.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be a number in [0, 1] (fraction of call sites to convert), got {ratio!r}")
    inc, exc = Matcher(_patterns(include, "include"), "include"), Matcher(_patterns(exclude, "exclude"), "exclude")

    def matches(matcher: Matcher, ns: Sequence[str]) -> bool:
        return bool(matcher) and any([matcher(n, None) for n in ns])  # a list: every pattern counts its hits

    excluded = [matches(exc, ns) for ns in names]
    if inc:
        flags = [matches(inc, ns) and not x for ns, x in zip(names, excluded)]
    else:
        left = [i for i, x in enumerate(excluded) if not x]
        chosen = set(left[: nearest_count(float(ratio), len(left))])
        flags = [i in chosen for i in range(len(names))]
    return flags, inc.unmatched(), exc.unmatched()


def _patterns(spec: Patterns, what: str) -> Optional[list[str]]:
    if spec is None or isinstance(spec, str):
        return None if not spec else [spec]
    if callable(spec):
        raise TypeError(f"{what}: source rewriting takes fnmatch patterns, not a function")
    return list(spec) or None


# ----------------------------------------------------------------- the codemod


@dataclass
class _Site:
    node: cst.Call
    line: int
    column: int
    callee: str
    dense: str
    l1: str
    targets: tuple[str, ...]
    scope: str
    l1fx_clash: Optional[tuple[int, int]]  # where ``l1fx`` is bound to something else, seen from here


class _Collector(cst.CSTVisitor):
    """Finds candidate calls (source order), their targets and scopes, and notes."""

    METADATA_DEPENDENCIES = (QualifiedNameProvider, PositionProvider, ScopeProvider)

    def __init__(self, module: cst.Module):
        super().__init__()
        self.module = module
        self.sites: list[_Site] = []
        self.notes: list[Note] = []
        self._scope: list[str] = []
        self._targets: list[tuple[str, ...]] = []
        self._callees: set[int] = set()
        self._paired: dict[int, str] = {}  # id(value element) -> its target in a tuple assignment

    # --- context
    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._scope.append(node.name.value)

    def leave_ClassDef(self, node: cst.ClassDef) -> None:
        self._scope.pop()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._scope.append(node.name.value)

    def leave_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._scope.pop()

    def _push_targets(self, exprs: Iterable[cst.BaseExpression]) -> None:
        names: list[str] = []
        for e in exprs:
            elements = e.elements if isinstance(e, (cst.Tuple, cst.List)) else None
            for t in ([el.value for el in elements] if elements is not None else [e]):
                names.append(self.module.code_for_node(t).strip())
        self._targets.append(tuple(names))

    def visit_Assign(self, node: cst.Assign) -> None:
        self._push_targets(t.target for t in node.targets)
        # ``self.a, self.b = nn.Linear(..), nn.Linear(..)``: each element gets its own target.
        target = node.targets[0].target if len(node.targets) == 1 else None
        if isinstance(target, (cst.Tuple, cst.List)) and isinstance(node.value, (cst.Tuple, cst.List)) \
                and len(target.elements) == len(node.value.elements):
            for t, v in zip(target.elements, node.value.elements):
                self._paired[id(v)] = self.module.code_for_node(t.value).strip()

    def leave_Assign(self, node: cst.Assign) -> None:
        self._targets.pop()

    def visit_Element(self, node: cst.Element) -> None:
        if id(node) in self._paired:
            self._targets.append((self._paired[id(node)],))

    def leave_Element(self, node: cst.Element) -> None:
        if id(node) in self._paired:
            self._targets.pop()

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        self._push_targets([node.target])

    def leave_AnnAssign(self, node: cst.AnnAssign) -> None:
        self._targets.pop()

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        self._push_targets([node.target])

    def leave_AugAssign(self, node: cst.AugAssign) -> None:
        self._targets.pop()

    def visit_NamedExpr(self, node: cst.NamedExpr) -> None:
        self._push_targets([node.target])

    def leave_NamedExpr(self, node: cst.NamedExpr) -> None:
        self._targets.pop()

    # Imports and annotations mention the classes without using them.
    def visit_Import(self, node: cst.Import) -> bool:
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        source = self.module.code_for_node(node.module) if node.module is not None else ""
        if isinstance(node.names, cst.ImportStar) and source.split(".")[0] == "torch":
            line, col = self._where(node)
            self.notes.append(Note(line, col, f"'from {source} import *' hides where names come from; calls "
                                              "through it are not rewritten (import the names you use instead)"))
        return False

    def visit_Annotation(self, node: cst.Annotation) -> bool:
        return False

    # --- calls and references
    def _qualified(self, node: cst.CSTNode) -> set[str]:
        return {q.name for q in self.get_metadata(QualifiedNameProvider, node, set())}

    def _where(self, node: cst.CSTNode) -> tuple[int, int]:
        start = self.get_metadata(PositionProvider, node).start
        return start.line, start.column + 1

    def visit_Call(self, node: cst.Call) -> None:
        names = self._qualified(node.func)
        known = names & (DENSE_TO_L1.keys() | L1_NAMES)
        if not known:
            return
        self._callees.add(id(node.func))
        line, col = self._where(node)
        callee = self.module.code_for_node(node.func)
        if known != names:
            self.notes.append(Note(line, col, f"{callee} may be {sorted(known)[0]} or something else "
                                              f"(it is bound more than once); left alone"))
            return
        if known <= L1_NAMES:
            dense, l1 = "", sorted(known)[0]
        else:
            l1s = {DENSE_TO_L1.get(n) for n in known}
            if len(l1s) != 1 or None in l1s:
                self.notes.append(Note(line, col, f"{callee} may be any of {sorted(known)}; left alone"))
                return
            dense, l1 = sorted(known)[0], l1s.pop()
        targets = self._targets[-1] if self._targets else ()
        self.sites.append(_Site(node, line, col, callee, dense, l1, targets, ".".join(self._scope),
                                self._l1fx_clash(node)))

    def _l1fx_clash(self, node: cst.Call) -> Optional[tuple[int, int]]:
        """The rewritten call says ``l1fx.…``: find a binding that makes ``l1fx`` mean something else."""
        for assignment in self.get_metadata(ScopeProvider, node)["l1fx"]:
            binder = getattr(assignment, "node", None)
            if isinstance(assignment, ImportAssignment) and isinstance(binder, cst.Import) and not any(
                    alias.asname is not None and alias.evaluated_alias == "l1fx" for alias in binder.names):
                continue  # ``import l1fx`` / ``import l1fx.nn``
            return self._where(binder) if binder is not None else (0, 0)
        return None

    def _reference(self, node: Union[cst.Name, cst.Attribute]) -> Optional[bool]:
        if id(node) in self._callees:
            return None
        dense = self._qualified(node) & DENSE_TO_L1.keys()
        if dense:
            line, col = self._where(node)
            name = sorted(dense)[0]
            written = self.module.code_for_node(node)
            if name.rsplit(".", 1)[1][0].isupper():  # a class
                why = "used but not called (base class, isinstance check, factory argument...); left as is, " \
                      "and isinstance checks against it do not match l1fx layers"
            else:
                why = "used but not called (passed as a function...); left as is"
            self.notes.append(Note(line, col, f"{written} ({name}) {why}"))
            return False
        return None

    def visit_Name(self, node: cst.Name) -> Optional[bool]:
        return self._reference(node)

    def visit_Attribute(self, node: cst.Attribute) -> Optional[bool]:
        return self._reference(node)


def _dotted(qualified: str) -> cst.BaseExpression:
    return cst.parse_expression(qualified)


class _Replacer(cst.CSTTransformer):
    def __init__(self, chosen: dict[int, str]):
        super().__init__()
        self.chosen = chosen  # id(original Call) -> qualified l1 name

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        l1 = self.chosen.get(id(original_node))
        if l1 is None:
            return updated_node
        args = updated_node.args
        if l1.startswith("l1fx.functional."):
            args = [a.with_changes(keyword=cst.Name(_FUNCTIONAL_KEYWORDS[a.keyword.value]))
                    if a.keyword is not None and a.keyword.value in _FUNCTIONAL_KEYWORDS else a for a in args]
        return updated_node.with_changes(func=_dotted(l1), args=args)


def _add_imports(module: cst.Module, names: Sequence[str]) -> cst.Module:
    """Add ``import NAME`` for each name not imported so at module level.

    They go right after the module's leading docstring/import block (so after
    any ``from __future__`` import). libcst's AddImportsVisitor does the same
    but costs a second full pass with metadata (about as long as the rewrite
    itself), and only top-level statements need looking at here.
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


def _syntax_error(source: Union[str, bytes], path: str, error: cst.ParserSyntaxError) -> RewriteError:
    """Python's own message and position where it has one (libcst's can be a line off)."""
    try:
        compile(source, path, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    except SyntaxError as e:
        if e.lineno is not None:
            return RewriteError(path, e.lineno, e.offset or 1, f"syntax error: {e.msg}")
    except ValueError:  # e.g. null bytes
        pass
    else:  # valid Python that libcst's grammar does not know
        return RewriteError(path, error.editor_line, error.editor_column,
                            f"libcst cannot parse this (valid Python newer than libcst?): {error.message}")
    return RewriteError(path, error.editor_line, error.editor_column, f"syntax error: {error.message}")


def _rewrite(source: Union[str, bytes], ratio: float, include: Patterns, exclude: Patterns,
             path: str) -> RewriteResult:
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as e:
        raise _syntax_error(source, path, e) from None
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)  # the module is ours: no defensive copy
    collector = _Collector(wrapper.module)
    # Name resolution is the slow part; a file that never spells a candidate's
    # leaf name (every import style spells it somewhere) cannot have one.
    text = source if isinstance(source, str) else source.decode(module.encoding, "replace")
    if any(leaf in text for leaf in _LEAF_NAMES):
        wrapper.visit(collector)

    flags, unmatched_inc, unmatched_exc = select(
        [_names(s.targets, s.scope) for s in collector.sites], ratio, include, exclude)
    candidates = [
        Candidate(s.line, s.column, s.callee, s.dense, s.l1, s.targets, s.scope, f, already_l1=not s.dense)
        for s, f in zip(collector.sites, flags)
    ]
    chosen = {id(s.node): s.l1 for s, c in zip(collector.sites, candidates) if c.converted}
    for s, c in zip(collector.sites, candidates):
        if c.converted and s.l1fx_clash:
            raise RewriteError(path, *s.l1fx_clash, "the name 'l1fx' is bound here to something other than "
                               f"the l1fx package, and the call rewritten at line {s.line} needs it; rename it")

    code = source
    if chosen:
        new = wrapper.module.visit(_Replacer(chosen))
        new = _add_imports(new, sorted({l1.rsplit(".", 1)[0] for l1 in chosen.values()}))
        code = new.bytes if isinstance(source, bytes) else new.code
    return RewriteResult(source, code, candidates, collector.notes, unmatched_inc, unmatched_exc, path,
                         module.encoding)


def rewrite_source(code: Union[str, bytes], *, ratio: float = 1.0, include: Patterns = None,
                   exclude: Patterns = None, path: str = "<string>") -> RewriteResult:
    """Rewrite one module's source; returns the new code and what was done. Writes nothing.

    ``ratio``, ``include`` and ``exclude`` select call sites as :func:`select`
    describes; patterns that match no call site are warned about. Raises
    :class:`RewriteError` (``path:line:col: ...``) for code that does not parse.
    """
    result = _rewrite(code, ratio, include, exclude, path)
    unmatched = result.unmatched_include + result.unmatched_exclude
    if unmatched:
        warnings.warn(f"{path}: include/exclude pattern(s) {', '.join(map(repr, unmatched))} match no call site "
                      f"({_named_like(result.candidates)})", stacklevel=2)
    return result


def _named_like(candidates: Sequence[Candidate]) -> str:
    names = list(dict.fromkeys(n for c in candidates for n in c.names))
    if not names:
        return "there are no call sites to convert"
    return "call sites are named like: " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def rewrite_file(path: Union[str, os.PathLike], *, ratio: float = 1.0, include: Patterns = None,
                 exclude: Patterns = None) -> RewriteResult:
    """Rewrite a file's source in memory (bytes in, bytes out: encoding and newlines kept). Writes nothing."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise RewriteError(str(path), None, None, "no such file") from None
    except IsADirectoryError:
        raise RewriteError(str(path), None, None, "is a directory (the CLI walks directories; this function "
                                                  "takes one file)") from None
    return rewrite_source(data, ratio=ratio, include=include, exclude=exclude, path=str(path))


# ----------------------------------------------------------------- files


def atomic_write(path: Path, data: bytes, mode_from: Optional[Path] = None) -> None:
    """Write via a temp file in the same directory and ``os.replace``: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        source_of_mode = path if path.exists() else mode_from
        if source_of_mode is not None and source_of_mode.exists():
            os.chmod(tmp, source_of_mode.stat().st_mode & 0o7777)
        else:  # mkstemp creates 0600; give a new file the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}


def _walk(directory: Path) -> list[Path]:
    """``*.py`` files under ``directory``, sorted; hidden directories (``.git``, ``.venv``) are skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        found += [Path(root) / f for f in sorted(files) if f.endswith(".py")]
    return found


@dataclass
class _Input:
    path: Path
    relative: Path  # where it goes under -o DIR
    from_directory: bool


def _collect_inputs(paths: Sequence[str]) -> tuple[list[_Input], list[str]]:
    inputs, errors = [], []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = _walk(p)
            if not files:
                errors.append(f"{raw}: no *.py files in this directory")
            inputs += [_Input(f, f.relative_to(p), True) for f in files]
        elif p.is_file():
            inputs.append(_Input(p, Path(p.name), False))
        elif p.exists():
            errors.append(f"{raw}: not a regular file or directory")
        else:
            errors.append(f"{raw}: no such file or directory")
    return inputs, errors


def _output_paths(inputs: list[_Input], out: str) -> tuple[dict[Path, Path], list[str]]:
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


# ----------------------------------------------------------------- CLI


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m l1fx.rewrite",
        description="Rewrite nn.Conv1d/2d/3d, nn.Linear, F.conv1d/2d/3d and F.linear calls in Python source "
                    "to their l1fx equivalents. With one input file and no output option the rewritten code "
                    "goes to stdout; the input is only changed with --in-place. See docs/rewrite.md.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="Python files, or directories walked for *.py")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-o", "--output", metavar="OUT",
                      help="write to OUT: a file for one input file, else a directory mirroring the inputs")
    mode.add_argument("--in-place", action="store_true", help="overwrite the files that change (atomically)")
    mode.add_argument("--diff", action="store_true", help="print a unified diff; write nothing")
    mode.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file would change")
    p.add_argument("--ratio", type=_ratio, default=None, metavar="R",
                   help="fraction of call sites to convert, in source order, per file (default 1); "
                        "ignored with --include")
    p.add_argument("--include", action="append", default=[], metavar="PAT",
                   help="fnmatch pattern over assignment targets (self.conv1) and the enclosing class/function "
                        "(PointNet, PointNet.__init__); exactly the matching call sites are converted. Repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="PAT",
                   help="like --include, but matching call sites stay dense; --ratio counts the others. "
                        "Repeatable")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and warnings on stderr")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; returns the exit status: 0 ok, 1 ``--check`` found changes, 2 error (nothing written)."""
    args = _parser().parse_args(argv)
    err = sys.stderr

    def fail(messages: Iterable[str]) -> int:
        for m in messages:
            print(f"error: {m}", file=err)
        print("error: nothing was written", file=err)
        return 2

    ratio = 1.0 if args.ratio is None else args.ratio
    if args.include and args.ratio is not None:
        print("warning: --ratio is ignored with --include (exactly the matching call sites are converted)",
              file=err)
    inputs, errors = _collect_inputs(args.paths)
    if errors:
        return fail(errors)
    to_stdout = not (args.output or args.in_place or args.diff or args.check)
    if to_stdout and (len(inputs) != 1 or inputs[0].from_directory):
        return fail([f"{len(inputs)} files to rewrite: choose -o DIR, --in-place, --diff or --check "
                     "(stdout takes a single file)"])
    mapping: dict[Path, Path] = {}
    if args.output:
        mapping, errors = _output_paths(inputs, args.output)
        if errors:
            return fail(errors)

    # Everything is rewritten in memory first, so one bad file means nothing is written at all.
    results: list[tuple[_Input, RewriteResult]] = []
    for item in inputs:
        try:
            results.append((item, _rewrite(item.path.read_bytes(), ratio, args.include, args.exclude,
                                           str(item.path))))
        except RewriteError as e:
            errors.append(str(e))
        except OSError as e:
            errors.append(f"{item.path}: {e.strerror or e}")
    if errors:
        return fail(errors)

    # A pattern is a typo only if it matches in no file (a directory's files each match a few).
    unmatched = [p for p in args.include + args.exclude
                 if all(p in r.unmatched_include + r.unmatched_exclude for _, r in results)]
    if unmatched:
        print(f"warning: --include/--exclude pattern(s) {', '.join(map(repr, unmatched))} match no call site in "
              f"any file ({_named_like([c for _, r in results for c in r.candidates])})", file=err)
    for _, result in results:
        lines = result.report().splitlines()
        for line in lines[1:] if args.quiet else lines:
            print(line, file=err)

    changed = [r for _, r in results if r.changed]
    if args.check:
        for r in changed:
            print(f"would rewrite {r.path}", file=err)
        if not args.quiet:
            print(f"{len(changed)} of {len(results)} file(s) would be rewritten", file=err)
        return 1 if changed else 0
    if args.diff:
        sys.stdout.write("".join(r.diff() for r in changed))
        return 0
    if to_stdout:
        _write_stdout(results[0][1].code)
        return 0

    written: list[Path] = []
    for item, result in results:
        # --in-place writes through a symlink to the real file, so the link survives.
        target = mapping[item.path] if args.output else Path(os.path.realpath(item.path))
        if args.in_place and not result.changed:
            continue  # left alone: not even its timestamp changes
        try:
            atomic_write(target, result.code, mode_from=item.path)
        except OSError as e:
            print(f"error: cannot write {target}: {e.strerror or e}", file=err)
            print(f"error: {len(written)} file(s) were written before this one: "
                  f"{', '.join(map(str, written)) or 'none'}", file=err)
            return 2
        written.append(target)
    if not args.quiet:
        print(f"wrote {len(written)} file(s)" + (f" under {args.output}" if args.output else ""), file=err)
    return 0


def _write_stdout(code: Union[str, bytes]) -> None:
    if isinstance(code, bytes) and hasattr(sys.stdout, "buffer"):
        sys.stdout.flush()
        sys.stdout.buffer.write(code)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(code if isinstance(code, str) else code.decode())


if __name__ == "__main__":
    sys.exit(main())
