"""``python -m l1fx.rewrite``: the command line (argparse, modes, messages, exit status); see docs/rewrite.md.

Exit status: 0 ok; 2 a usage or input error or a failed write (one line per
problem); 1 only ``--check`` finding a file to rewrite; 3 an internal error
under ``--check``; 130 Ctrl-C; 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from l1fx import _atomicfile
from l1fx._cli import EXIT_OK, EXIT_USAGE, ArgumentParser, add_output_argument, run_cli

from .codemod import L1Codemod
from .files import Input, atomic_write, collect_inputs, output_paths, write_stdout
from .results import RewriteError, RewriteResult, named_like

__all__ = ["main", "PROG", "EXIT_WOULD_REWRITE", "EXIT_INTERNAL", "EXIT_TERMINATED"]

PROG = "python -m l1fx.rewrite"
# Exit status (docs/rewrite.md, "Exit status"). ``--check`` answers "would rewrite" with 1, as black and ruff
# do; no error ever exits 1 (errors exit 2, a bug under --check 3), so the two cannot be confused.
EXIT_WOULD_REWRITE = 1
EXIT_INTERNAL = 3
EXIT_TERMINATED = 128 + 15  # SIGTERM, as a shell reports a process it ended


def _parser() -> argparse.ArgumentParser:
    # l1fx._cli's parser: a bad option is one line and exit 2, like every l1fx command line.
    p = ArgumentParser(
        prog=PROG,
        description="Rewrite the layer calls of every registered kind (nn.Linear, nn.Conv1d/2d/3d, "
                    "nn.ConvTranspose1d/2d/3d and their F.* functions) in Python source to their l1fx "
                    "equivalents. With one input file and no output option the rewritten code "
                    "goes to stdout; the input is only changed with --in-place. See docs/rewrite.md.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="Python files, or directories walked for *.py")
    mode = p.add_mutually_exclusive_group()
    add_output_argument(mode, required=False,
                        help="write to OUT: a file for one input file, else a directory mirroring the inputs")
    mode.add_argument("--in-place", action="store_true", help="overwrite the files that change (atomically)")
    mode.add_argument("--diff", action="store_true", help="print a unified diff; write nothing")
    mode.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if any file would change (errors exit 2, never 1)")
    L1Codemod.add_args(p)  # --ratio, --include, --exclude: the same options under libcst.tool
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and warnings on stderr")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; returns the exit status: 0 ok; 2 a usage or input error, or a write that failed (one line per
    problem); 1 only ``--check`` finding a file to rewrite; 3 a bug under ``--check``; 143 SIGTERM."""
    parsed: list[argparse.Namespace] = []

    def body(argv: Optional[Sequence[str]]) -> int:
        parsed.append(_parser().parse_args(argv))
        return _run(parsed[0])

    # SIGTERM becomes an exception for the run, so a write in progress removes its temp file (see
    # _atomicfile); the previous handler is back when main returns.
    with _atomicfile.terminate_as_exception():
        try:
            return run_cli(PROG, body, argv)
        except _atomicfile.Terminated:
            print(f"{PROG}: terminated (SIGTERM) before writing anything; nothing was written", file=sys.stderr)
            return EXIT_TERMINATED
        except Exception:  # noqa: BLE001  (a bug in l1fx or libcst)
            if not (parsed and parsed[0].check):
                raise
            traceback.print_exc()
            print(f"{PROG}: internal error (a bug; please report it): exit status {EXIT_INTERNAL}, which is not "
                  f"--check's 'would rewrite'", file=sys.stderr)
            return EXIT_INTERNAL


def _run(args: argparse.Namespace) -> int:
    err = sys.stderr

    def fail(messages: Sequence[str]) -> int:
        if len(messages) == 1:
            print(f"{PROG}: error: {messages[0]} (nothing was written)", file=err)
        else:
            for m in messages:
                print(f"{PROG}: error: {m}", file=err)
            print(f"{PROG}: error: {len(messages)} errors; nothing was written", file=err)
        return EXIT_USAGE

    ratio = 1.0 if args.ratio is None else args.ratio
    if args.include and args.ratio is not None:
        print("warning: --ratio is ignored with --include (exactly the matching call sites are converted)",
              file=err)
    inputs, errors = collect_inputs(args.paths)
    if errors:
        return fail(errors)
    to_stdout = not (args.output or args.in_place or args.diff or args.check)
    if to_stdout and (len(inputs) != 1 or inputs[0].from_directory):
        return fail([f"{len(inputs)} files to rewrite: choose -o DIR, --in-place, --diff or --check "
                     "(stdout takes a single file)"])
    mapping: dict[Path, Path] = {}
    if args.output:
        mapping, errors = output_paths(inputs, args.output)
        if errors:
            return fail(errors)

    # Everything is rewritten in memory first, so one bad file means nothing is written at all.
    results: list[tuple[Input, RewriteResult]] = []
    for item in inputs:
        try:
            results.append((item, _rewrite_one(item, ratio, args.include, args.exclude, args.p)))
        except RewriteError as e:
            errors.append(str(e))
        except OSError as e:
            errors.append(f"{item.path}: cannot read: {e.strerror or e}")
    if errors:
        return fail(errors)

    # A pattern is a typo only if it matches in no file (a directory's files each match a few).
    unmatched = [p for p in args.include + args.exclude
                 if all(p in r.unmatched_include + r.unmatched_exclude for _, r in results)]
    if unmatched:
        print(f"warning: --include/--exclude pattern(s) {', '.join(map(repr, unmatched))} match no call site in "
              f"any file ({named_like([c for _, r in results for c in r.candidates])})", file=err)
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
        return EXIT_WOULD_REWRITE if changed else EXIT_OK
    if args.diff:
        # Each file's diff in that file's own encoding, so `patch` applies it (as `git diff` does).
        write_stdout(b"".join(r.diff_bytes() for r in changed), "".join(r.diff() for r in changed))
        return EXIT_OK
    if to_stdout:
        result = results[0][1]
        write_stdout(result.code, result.text())
        return EXIT_OK
    return _write_all(args, results, mapping)


def _rewrite_one(item: Input, ratio: float, include: list[str], exclude: list[str],
                 p: Optional[float] = None) -> RewriteResult:
    # Looked up on the package when called: ``l1fx.rewrite._rewrite`` is the one seam (tests replace it there).
    from l1fx import rewrite as package

    lp = {} if p is None or p == 1.0 else {"p": p}  # (the l1 call keeps the seam's old signature)
    return package._rewrite(item.path.read_bytes(), ratio, include, exclude, str(item.path), **lp)


def _write_all(args: argparse.Namespace, results: list[tuple[Input, RewriteResult]],
               mapping: dict[Path, Path]) -> int:
    # --in-place writes through a symlink to the real file, so the link survives.
    targets = [(mapping[item.path] if args.output else Path(os.path.realpath(item.path)), item, result)
               for item, result in results]
    # Leftovers of a run that was killed (SIGKILL cannot be caught) are removed once per directory.
    for directory in dict.fromkeys(t.parent for t, _, _ in targets):
        _atomicfile.remove_stale_temps(directory)
    written: list[Path] = []

    def done_so_far() -> str:
        return f"{len(written)} file(s) were written before it: {', '.join(map(str, written)) or 'none'}"

    target = None
    try:
        for target, item, result in targets:
            if args.in_place and not result.changed:
                continue  # left alone: not even its timestamp changes
            try:
                atomic_write(target, result.code, mode_from=item.path, clean_stale=False)
            except OSError as e:
                # An output that cannot be written is the user's to fix (as for export/report): exit 2.
                print(f"{PROG}: error: cannot write {target}: {e.strerror or e}; it is unchanged; "
                      f"{done_so_far()}", file=sys.stderr)
                return EXIT_USAGE
            written.append(target)
    except _atomicfile.Terminated:
        where = "" if target is None or target in written else f" while writing {target}, which is unchanged"
        print(f"{PROG}: terminated (SIGTERM){where}; no temporary file is left; {done_so_far()}", file=sys.stderr)
        return EXIT_TERMINATED
    if not args.quiet:
        print(f"wrote {len(written)} file(s)" + (f" under {args.output}" if args.output else ""), file=sys.stderr)
    return EXIT_OK
