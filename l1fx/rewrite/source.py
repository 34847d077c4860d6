"""One module's source in, its rewrite out: decoding (PEP 263), parsing, errors; nothing is written."""
from __future__ import annotations

import ast
import io
import os
import tokenize
import warnings
from pathlib import Path
from typing import Union

import libcst as cst
from libcst.codemod import CodemodContext

from .codemod import L1Codemod, Patterns
from .results import RewriteError, RewriteResult, named_like

__all__ = ["rewrite_source", "rewrite_file"]


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


def _check_decodes(source: bytes, path: str) -> None:
    """Refuse, as a per-file error, bytes that do not decode as the file declares (PEP 263).

    libcst would raise a bare ``UnicodeDecodeError``/``SyntaxError``; this says which byte and what to do.
    """
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
    except SyntaxError as e:  # an unknown codec in the cookie, a cookie contradicting a BOM, bad UTF-8 in line 1-2
        raise RewriteError(path, None, None, f"{e.msg if hasattr(e, 'msg') else e}; give the file's real encoding "
                           "in a coding cookie (e.g. '# -*- coding: latin-1 -*-' as line 1 or 2) or convert it "
                           "to UTF-8") from None
    try:
        source.decode(encoding)
    except UnicodeDecodeError as e:
        line = source.count(b"\n", 0, e.start) + 1
        column = e.start - (source.rfind(b"\n", 0, e.start) + 1) + 1
        declared = f"declared {encoding}" if _has_cookie(source) else f"{encoding} (no coding cookie)"
        raise RewriteError(path, line, column, f"byte 0x{source[e.start]:02x} is not valid {declared}; add a "
                           "coding cookie with the file's real encoding (e.g. '# -*- coding: latin-1 -*-' as line "
                           "1 or 2) or convert the file to UTF-8") from None


def _has_cookie(source: bytes) -> bool:
    return any(tokenize.cookie_re.match(line.decode("latin-1")) for line in source.splitlines()[:2])


def _rewrite(source: Union[str, bytes], ratio: float, include: Patterns, exclude: Patterns,
             path: str, p: float = 1.0) -> RewriteResult:
    if isinstance(source, bytes):
        _check_decodes(source, path)
    try:
        return _rewrite_decoded(source, ratio, include, exclude, path, p)
    except RecursionError:  # libcst parses and visits recursively
        raise RewriteError(path, None, None, "nested too deeply for libcst; split the most deeply nested "
                           "expression") from None


def _rewrite_decoded(source: Union[str, bytes], ratio: float, include: Patterns, exclude: Patterns,
                     path: str, p: float = 1.0) -> RewriteResult:
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as e:
        raise _syntax_error(source, path, e) from None
    codemod = L1Codemod(CodemodContext(filename=path), ratio=ratio, include=include, exclude=exclude, p=p)
    # ``rewrite``, not libcst's ``transform_module``, which deep-copies the tree for its metadata first.
    text = source if isinstance(source, str) else source.decode(module.encoding, "replace")
    outcome = codemod.rewrite(module, text)
    code = source
    if outcome.module is not module:
        code = outcome.module.bytes if isinstance(source, bytes) else outcome.module.code
    return RewriteResult(source, code, outcome.candidates, outcome.notes, outcome.unmatched_include,
                         outcome.unmatched_exclude, path, module.encoding)


def rewrite_source(code: Union[str, bytes], *, ratio: float = 1.0, include: Patterns = None,
                   exclude: Patterns = None, path: str = "<string>", p: float = 1.0) -> RewriteResult:
    """Rewrite one module's source; returns the new code and what was done. Writes nothing.

    ``ratio``, ``include`` and ``exclude`` select call sites as :func:`~.codemod.select_sites`
    describes; patterns that match no call site are warned about. Raises
    :class:`RewriteError` (``path:line:col: ...``) for code that does not parse. ``p`` other than 1
    (a number >= 1 or inf) writes the ℓp layers instead (``l1fx.nn.LpLinear(..., p=2.0)`` ...).
    """
    result = _rewrite(code, ratio, include, exclude, path, **({"p": p} if p != 1.0 else {}))
    unmatched = result.unmatched_include + result.unmatched_exclude
    if unmatched:
        warnings.warn(f"{path}: include/exclude pattern(s) {', '.join(map(repr, unmatched))} match no call site "
                      f"({named_like(result.candidates)})", stacklevel=2)
    return result


def rewrite_file(path: Union[str, os.PathLike], *, ratio: float = 1.0, include: Patterns = None,
                 exclude: Patterns = None, p: float = 1.0) -> RewriteResult:
    """Rewrite a file's source in memory (bytes in, bytes out: encoding and newlines kept). Writes nothing.

    ``p`` as :func:`rewrite_source`'s."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RewriteError(str(path), None, None, "no such file") from None
    except IsADirectoryError:
        raise RewriteError(str(path), None, None, "is a directory (the CLI walks directories; this function "
                                                  "takes one file)") from None
    return rewrite_source(data, ratio=ratio, include=include, exclude=exclude, path=str(path), p=p)
