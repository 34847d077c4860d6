"""Atomic file replacement: the one implementation in l1fx.

Used by ``l1fx.checkpoint`` (training checkpoints), ``l1fx.rewrite`` (the
rewritten sources), ``l1fx._cli`` (the CLIs' output files) and ``l1fx.s3dis``
(the prepared data set); ``l1fx.onnx_export`` writes through ``_cli``'s helper.

A file is written to a temporary file next to it (same directory, so the final
``os.replace`` is a rename within one file system), flushed and fsynced, then
renamed over the target, and the directory is fsynced so the rename itself
survives a power loss. A reader sees the old file or the new one, never half.

Temporary files are named ``.{name}.l1fx-tmp-{pid}.{token}``: hidden, never
``*.py`` (so a directory walk does not take them for sources). The writer holds
an exclusive ``flock`` on its temporary file from creating it until the rename,
and the kernel drops that lock when the writer dies, however it dies. An
exception (including ``KeyboardInterrupt``, and SIGTERM where the caller turns
it into one, see :func:`terminate_as_exception`) removes the temporary file.
SIGKILL cannot be caught: it may leave one behind, which
:func:`remove_stale_temps` deletes at the next write into that directory once
nobody holds its lock and its pid is not running, is this process's own (in
a container the trainer is PID 1 after every restart, so a plain "is the pid
running" rule would keep every crashed save's full-size copy for good), or
the file is older than ten minutes.

The new file is created with ``open`` (mode ``0o666`` less the umask, as any
new file); the umask is never read or changed (changing it, even briefly,
applies to every thread of the process).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: the pid and age rules below
    fcntl = None

__all__ = ["atomic_write", "atomic_write_bytes", "remove_stale_temps", "terminate_as_exception", "Terminated"]

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.l1fx-tmp-(?P<pid>\d+)\.[0-9a-f]+$")
# An unlocked temporary file whose pid runs (pids are reused, and a container's trainer is PID 1
# again after a restart) is stale once this old; where files cannot be locked at all (no single
# write takes a day), once STALE_SECONDS old.
UNLOCKED_SECONDS = 600
STALE_SECONDS = 24 * 3600
_ACTIVE: set[str] = set()  # this process's temporary files being written (for the no-lock rules)
_ACTIVE_LOCK = threading.Lock()


def temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.l1fx-tmp-{os.getpid()}.{secrets.token_hex(4)}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or a platform without kill(pid, 0)
        return True
    return True


def _lock(fd: int, block: bool) -> Optional[bool]:
    """flock ``fd`` exclusively: True if locked, False if someone holds it, None if locks do not work here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EBADF on an NFS without locks, ...
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_if_stale(path: Path, pid: int, now: float) -> bool:
    """Delete ``path`` if no live writer has it; True if deleted."""
    try:
        fd = os.open(path, os.O_RDWR)  # O_RDWR: NFS emulates flock with write locks
    except OSError:  # gone meanwhile, or someone else's file: not ours to judge
        return False
    try:
        locked = _lock(fd, block=False)
        if locked is False:  # a live writer holds it
            return False
        # Nobody holds it. Every l1fx writer locks, so it is stale unless it looks like a write in
        # progress somewhere locks do not reach (an older l1fx, a file system without locks): a running
        # pid that is not this process's (ours: only our writes in progress), and not old.
        with _ACTIVE_LOCK:
            ours = str(path) in _ACTIVE
        alive = ours if pid == os.getpid() else _running(pid)
        max_age = UNLOCKED_SECONDS if locked else STALE_SECONDS
        if alive and now - os.fstat(fd).st_mtime < max_age:
            return False
        if not _same_file(fd, path):
            return False
        os.unlink(path)  # still holding the lock, so a writer that lost the race sees it (atomic_write)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, name: Optional[str] = None) -> list[Path]:
    """Delete l1fx temporary files in ``directory`` (for target ``name`` only, if given) that no writer holds.

    A temporary file is kept while a writer holds its lock. One nobody holds
    is stale when no process with its pid runs, when the pid is this
    process's own but it is none of its writes in progress (a restarted
    container's PID 1), or when it is older than :data:`UNLOCKED_SECONDS`
    (:data:`STALE_SECONDS` where files cannot be locked at all).
    """
    directory = Path(directory)
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry)
        if m is None or (name is not None and m["name"] != name):
            continue
        if _remove_if_stale(directory / entry, int(m["pid"]), now):
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


def _open_locked_temp(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file for ``path``, created and locked (kept locked until it is closed)."""
    for _ in range(8):
        tmp = temp_path(path)
        f = open(tmp, "xb")  # mode 0o666 less the umask, like any new file
        with _ACTIVE_LOCK:
            _ACTIVE.add(str(tmp))
        try:
            _lock(f.fileno(), block=True)
            # A cleaner may have taken the file for stale between its creation and our lock, and
            # deleted it: then it is no longer at ``tmp``; take another name.
            if _same_file(f.fileno(), tmp):
                return tmp, f
        except BaseException:
            _forget(tmp, f)
            raise
        _forget(tmp, f)
    raise OSError(f"cannot keep a temporary file next to {path}: it keeps being deleted")


def _forget(tmp: Path, f: Optional[BinaryIO], unlink: bool = True) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.discard(str(tmp))
    if f is not None:
        with contextlib.suppress(OSError):
            f.close()
    if unlink:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], mode_from: Optional[Path] = None,
                 clean_stale: bool = True) -> None:
    """Replace ``path`` by what ``write(file)`` writes, atomically; a failure leaves the old file and no temp.

    The new file gets the permissions of the file it replaces, else those of
    ``mode_from``, else those of any new file (``0o666`` less the umask).
    Parent directories are created. With ``clean_stale`` the leftovers of
    killed writers of ``path`` are removed first (a caller writing many files
    into one directory does that once).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temps(path.parent, path.name)
    tmp, f = _open_locked_temp(path)
    # Everything after creating the file is inside the try, so an exception
    # raised anywhere (a signal turned into one included) removes it.
    try:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        source_of_mode = path if path.exists() else mode_from
        if source_of_mode is not None and Path(source_of_mode).exists():
            os.chmod(tmp, Path(source_of_mode).stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        _forget(tmp, f)
        raise
    _forget(tmp, f, unlink=False)  # closing drops the lock, now on ``path``
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
