"""Atomic file replacement, shared by ``l1fx.rewrite`` and ``l1fx.checkpoint``.

A file is written to a temporary file next to it (same directory, so the final
``os.replace`` is a rename within one file system), flushed and fsynced, then
renamed over the target, and the directory is fsynced so the rename itself
survives a power loss. A reader sees the old file or the new one, never half.

Temporary files are named ``.{name}.l1fx-tmp-{pid}.{token}``: hidden, never
``*.py`` (so a directory walk does not take them for sources) and carrying the
writer's pid. An exception (including ``KeyboardInterrupt``, and SIGTERM where
the caller turns it into one, see :func:`terminate_as_exception`) removes the
temporary file. SIGKILL cannot be caught: it may leave one behind, which
:func:`remove_stale_temps` deletes at the next write into that directory once
its writer is no longer running.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.l1fx-tmp-(?P<pid>\d+)\.[0-9a-f]+$")


def temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.l1fx-tmp-{os.getpid()}.{secrets.token_hex(4)}"


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or a platform without kill(pid, 0)
        return True
    return True


def remove_stale_temps(directory: Path, name: Optional[str] = None) -> list[Path]:
    """Delete l1fx temporary files in ``directory`` (for target ``name`` only, if given) whose writer has died.

    A pid can be reused, so a leftover whose pid now belongs to another
    process is kept (it stays hidden and ignored) until a later run.
    """
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry)
        if m is None or (name is not None and m["name"] != name) or _running(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(directory / entry)
            removed.append(directory / entry)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[BinaryIO], None], mode_from: Optional[Path] = None,
                 clean_stale: bool = True) -> None:
    """Replace ``path`` by what ``write(file)`` writes, atomically; a failure leaves the old file and no temp.

    The new file gets the permissions of the file it replaces, else those of
    ``mode_from``, else the usual ``0o666 & ~umask`` of a new file. With
    ``clean_stale`` the leftovers of killed writers of ``path`` are removed
    first (a caller writing many files into one directory does that once).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temps(path.parent, path.name)
    tmp = temp_path(path)
    # Everything after choosing the name is inside the try, so an exception
    # raised anywhere (a signal turned into one included) removes the file.
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        source_of_mode = path if path.exists() else mode_from
        if source_of_mode is not None and source_of_mode.exists():
            os.chmod(tmp, source_of_mode.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode_from: Optional[Path] = None, clean_stale: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), mode_from, clean_stale)


class Terminated(BaseException):
    """SIGTERM arrived; raised in the main thread so ``finally``/``except`` clean-ups run."""


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` instead of killing the process outright.

    Only installed where SIGTERM would otherwise kill the process without any
    clean-up (the default handler, in the main thread); a handler the program
    installed itself is left alone. The previous handler is restored on exit.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
