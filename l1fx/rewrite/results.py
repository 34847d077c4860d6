"""What a source rewrite reports: :class:`CallSite`, :class:`Note`, :class:`RewriteResult`, :class:`RewriteError`."""
from __future__ import annotations

import difflib
import io
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from l1fx import errors as _errors

__all__ = ["CallSite", "Candidate", "Note", "RewriteResult", "RewriteError", "NOT_VISIBLE"]


def site_names(targets: tuple[str, ...], scope: str) -> tuple[str, ...]:
    """A call site's names for include/exclude: its assignment targets, then its enclosing class/function path."""
    return targets + ((scope,) if scope else ())


def short_name(qualified: str) -> str:
    """``torch.nn.modules.conv.Conv1d`` -> ``nn.Conv1d``; ``torch.nn.functional.linear`` -> ``F.linear``.

    A name outside torch (a plug-in's layer kind) is its last part: ``mylib.layers.MyConv`` -> ``MyConv``.
    """
    leaf = qualified.rsplit(".", 1)[1]
    if not qualified.startswith("torch."):
        return leaf
    return f"nn.{leaf}" if leaf[0].isupper() else f"F.{leaf}"


@dataclass(frozen=True)
class CallSite:
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
        return site_names(self.targets, self.scope)

    @property
    def label(self) -> str:
        where = self.targets[0] if self.targets else (self.scope or "<module>")
        return f"{where} ({self.callee}, line {self.line})"


Candidate = CallSite  # the old name (passes.state.Candidate is convert's, a different thing)


@dataclass(frozen=True)
class Note:
    """Something the user should know that did not stop the rewrite."""

    line: int
    column: int
    message: str
    kind: str = ""  # NOT_VISIBLE for a layer built where the source does not say which (a factory)


NOT_VISIBLE = "not visible in source"


@dataclass
class RewriteResult:
    """What :func:`~l1fx.rewrite.rewrite_source` did to one module; ``code`` is the rewritten source."""

    original: Union[str, bytes]
    code: Union[str, bytes]  # same type as ``original``
    candidates: list[CallSite]
    notes: list[Note] = field(default_factory=list)
    unmatched_include: list[str] = field(default_factory=list)
    unmatched_exclude: list[str] = field(default_factory=list)
    path: str = "<string>"
    encoding: str = "utf-8"  # of the source (libcst reads PEP 263 cookies); bytes ``code`` keeps it

    @property
    def changed(self) -> bool:
        return self.code != self.original

    @property
    def converted(self) -> list[CallSite]:
        return [c for c in self.candidates if c.converted]

    def text(self, which: str = "code") -> str:
        """``code`` (or ``original``) as str."""
        value = getattr(self, which)
        return value if isinstance(value, str) else value.decode(self.encoding)

    def diff(self) -> str:
        """Unified diff original -> rewritten (empty when unchanged)."""
        return "".join(self._diff_lines())

    def diff_bytes(self) -> bytes:
        """:meth:`diff` encoded as the source file is (its PEP 263 encoding), so ``patch`` applies it.

        The ``---``/``+++`` headers hold the path, encoded as the file system encodes names; a UTF-8
        BOM stays part of the first line, as it is in the file.
        """
        bom = "\ufeff" if self.encoding == "utf-8-sig" else ""
        encoding = "utf-8" if bom else self.encoding
        lines = self._diff_lines(bom)
        return b"".join(os.fsencode(line) if i < 2 else line.encode(encoding) for i, line in enumerate(lines))

    def _diff_lines(self, prefix: str = "") -> list[str]:
        a, b = _lines(prefix + self.text("original")), _lines(prefix + self.text("code"))
        lines = difflib.unified_diff(a, b, f"{self.path}\t(original)", f"{self.path}\t(rewritten)")
        return [line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines]

    def report(self) -> str:
        """One summary line, then a line per note (``file:line:col: note: ...``)."""
        lines = [f"{self.path}: {self._summary()}"]
        lines += [f"{self.path}:{n.line}:{n.column}: note: {n.message}" for n in self.notes]
        return "\n".join(lines)

    @property
    def not_visible(self) -> list[Note]:
        """Notes on layers built through factories, which a source rewrite cannot see (use l1fx.convert)."""
        return [n for n in self.notes if n.kind == NOT_VISIBLE]

    def _summary(self) -> str:
        hidden = len(self.not_visible)
        hint = (f"; {hidden} factory-built layer site{'s' * (hidden != 1)} not visible in source (notes below): "
                "convert those with l1fx.convert(model)") if hidden else ""
        if not self.candidates:
            return ("no candidates (no nn.Conv1d/2d/3d, nn.Linear, F.conv1d/2d/3d or F.linear calls); "
                    "left unchanged") + hint
        return self._calls_summary() + hint

    def _calls_summary(self) -> str:
        done = self.converted
        already = sum(c.already_l1 for c in self.candidates)
        kept = [c for c in self.candidates if not c.selected and not c.already_l1]
        if done:
            counts: dict[str, int] = {}
            for c in done:
                counts[short_name(c.dense)] = counts.get(short_name(c.dense), 0) + 1
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


def _lines(text: str) -> list[str]:
    """Lines as Python (and ``patch``) count them: ``str.splitlines`` would also split at form feeds, and at
    U+0085, which is the latin-1 byte 0x85."""
    return io.StringIO(text, newline="").readlines()


class RewriteError(_errors.RewriteError, _errors.UsageError):
    """A file that cannot be rewritten; ``str()`` is ``file:line:col: message``.

    An input error (the user fixes the file), hence also a ``UsageError``: the CLI exits 2.
    """

    def __init__(self, path: str, line: Optional[int], column: Optional[int], message: str):
        self.path, self.line, self.column, self.message = path, line, column, message
        where = path if line is None else f"{path}:{line}:{column}"
        super().__init__(f"{where}: {message}")


def named_like(candidates) -> str:
    """Examples of the names call sites have, for a warning about a pattern that matched none."""
    names = list(dict.fromkeys(n for c in candidates for n in c.names))
    if not names:
        return "there are no call sites to convert"
    return "call sites are named like: " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
