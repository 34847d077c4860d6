"""Build a C++ source into a shared library once, cache it across runs, load it.

The l1 CPU kernels are plain C++ with a C ABI (no PyTorch headers), so one
``c++ -O3 -fopenmp -shared`` call of a few seconds builds them. The library is
cached under ``$L1FX_CACHE_DIR`` (default ``$XDG_CACHE_HOME/l1fx`` or
``~/.cache/l1fx``) in a folder named by a hash of everything that affects the
binary: the source text, the compiler and its version, the flags and the CPU
(``-march=native`` code must not be reused on another CPU). Later processes,
and every shape, reuse it; only a change of one of those rebuilds.

The cache cannot break the ops (docs/kernel_cache.md):

* Verified before loading: the build records the library's size and sha256
  next to it (``lib<name>.so.json``); a library that does not match (truncated,
  half written, tampered with) is rebuilt, never loaded, since mapping a
  truncated library kills the process with SIGBUS.
* Atomic: the compiler writes a temporary file (``.lib<name>.so.<pid>.*.tmp``);
  the record and then the library are renamed into place. Builds hold an
  exclusive lock (``lib<name>.lock``, ``fcntl.flock``) so concurrent processes
  compile once; a build that was killed leaves a temporary file that the next
  build removes (its process is gone, or it is older than an hour).
* An unusable cache directory (read-only, ``HOME=/proc``, a file in the way)
  falls back, with one warning, to a temporary directory of this process,
  removed at exit. If even that fails, :class:`BuildError` says why, and the
  ``auto`` backend falls back to the reference kernel.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

from ..errors import KernelBuildError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the atomic renames still keep the cache consistent
    fcntl = None

CACHE_ENV = "L1FX_CACHE_DIR"
COMPILER_ENV = "CXX"
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
# Tried in order: the best code for this CPU first, then portable code.
ARCH_FLAGS = (["-march=native"], [])
OPENMP_FLAGS = (["-fopenmp"], [])
# A temporary file of a process that still runs is left alone for this long
# (a build is 4 compiler calls of at most 300 s each at worst).
STALE_SECONDS = 3600
# ".<final name>.<pid>.<random>.tmp", as made by _temp_file.
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


class BuildError(KernelBuildError):
    """The library could not be built or loaded (no compiler, a failed compile, no usable directory)."""


class _Unwritable(Exception):
    """A directory cannot hold the build (internal: triggers the temporary-directory fallback)."""


def _why(path: Path, e: OSError) -> str:
    return f"{path}: {e.strerror or e}"


def cache_dir() -> Path:
    """The configured cache root (it may not exist or be writable; :func:`build` copes)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "l1fx"


def find_compiler() -> str:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on PATH."""
    env = os.environ.get(COMPILER_ENV)
    candidates = [env] if env else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError(
        f"no C++ compiler found (looked for {', '.join(candidates)}); install g++ or clang++, or set ${COMPILER_ENV}"
    )


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"C++ compiler {cxx} does not run: {e}") from None
    if out.returncode != 0:
        raise BuildError(f"C++ compiler {cxx} does not run: {out.stderr.strip()[:200]}")
    return out.stdout.splitlines()[0] if out.stdout else ""


def _cpu_fingerprint() -> str:
    # -march=native output is specific to the CPU's feature set.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(text: bytes, cxx: str) -> str:
    return hashlib.sha256(
        b"\0".join(
            [text, cxx.encode(), _compiler_version(cxx).encode(), repr((BASE_FLAGS, ARCH_FLAGS, OPENMP_FLAGS)).encode(),
             _cpu_fingerprint().encode(), platform.machine().encode()]
        )
    ).hexdigest()[:16]


# ------------------------------------------------------------------ verification

def record_path(lib: Path) -> Path:
    """Where the size and sha256 of ``lib`` are recorded."""
    return lib.with_name(lib.name + ".json")


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verified(lib: Path) -> bool:
    """``lib`` exists and matches the size and sha256 recorded when it was built."""
    try:
        record = json.loads(record_path(lib).read_text())
        if not isinstance(record, dict) or record.get("size") != lib.stat().st_size:
            return False  # cheap check first: a truncated file never gets hashed
        return _digest(lib) == {"size": record["size"], "sha256": record.get("sha256")}
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------ files

def _temp_file(final: Path) -> Path:
    """An empty temporary file next to ``final``, named so a later build can tell whose it is."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _write_atomic(path: Path, text: str) -> None:
    tmp = _temp_file(path)
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, it is someone else's
        return True
    return True


def remove_stale_temps(out_dir: Path, now: Optional[float] = None) -> list[Path]:
    """Delete temporary files left by killed builds (process gone, or older than ``STALE_SECONDS``)."""
    now = time.time() if now is None else now
    removed = []
    for path in out_dir.iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match:
            continue
        try:
            stale = not _pid_alive(int(match.group(1))) or now - path.stat().st_mtime > STALE_SECONDS
            if stale:
                path.unlink()
                removed.append(path)
        except OSError:
            pass  # gone meanwhile, or not ours to delete: harmless
    return removed


@contextlib.contextmanager
def _exclusive(lib: Path) -> Iterator[None]:
    """Hold ``lib<name>.lock`` next to ``lib`` exclusively: one process builds, the others wait and reuse."""
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lib.with_suffix(".lock"), "a")  # not inherited by the compiler (close-on-exec)
    except OSError as e:
        raise _Unwritable(_why(lib.parent, e)) from None
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError:
                pass  # no locks on this filesystem: concurrent builds each rename a complete file
        yield  # closing the file releases the lock


# ------------------------------------------------------------------ fallback directory

_fallback_lock = threading.Lock()
_fallback_root: Optional[Path] = None


def _remove_tree(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked child that inherited the handler
        shutil.rmtree(path, ignore_errors=True)


def _process_dir(unusable: str) -> Path:
    """This process's temporary build directory (made, and warned about, once; removed at exit)."""
    global _fallback_root
    with _fallback_lock:
        if _fallback_root is None:
            try:
                root = Path(tempfile.mkdtemp(prefix="l1fx-kernels-"))
            except OSError as e:
                raise BuildError(
                    f"no usable directory to build the l1fx CPU kernels in: the cache is not usable ({unusable}), "
                    f"nor is a temporary directory ({e}); set ${CACHE_ENV} to a writable directory"
                ) from None
            atexit.register(_remove_tree, root, os.getpid())
            _fallback_root = root
            warnings.warn(
                f"l1fx: kernel cache not usable ({unusable}); building the CPU kernels in {root} for this "
                f"process only (removed at exit); set ${CACHE_ENV} to a writable directory to build them once",
                RuntimeWarning,
                stacklevel=4,
            )
        return _fallback_root


def fallback_dir() -> Optional[Path]:
    """The temporary build directory of this process, if the cache was unusable."""
    return _fallback_root


# ------------------------------------------------------------------ build

def build(source: Path, name: str) -> Path:
    """Compile ``source`` into ``lib<name>.so`` in the cache (unless a verified one is there); return its path."""
    cxx = find_compiler()
    text = source.read_bytes()
    folder = f"{name}-{_key(text, cxx)}"
    try:
        primary: Optional[Path] = cache_dir() / folder
    except RuntimeError as e:  # Path.home(): no HOME and no password entry
        primary, unusable = None, f"no home directory: {e}"
    if primary is not None:
        lib = primary / f"lib{name}.so"
        if verified(lib):  # the common case: no write, so a read-only cache with a good build works
            return lib
        try:
            return _build_locked(source, cxx, lib)
        except _Unwritable as e:
            unusable = str(e)
    lib = _process_dir(unusable) / folder / f"lib{name}.so"
    if verified(lib):
        return lib
    try:
        return _build_locked(source, cxx, lib)
    except _Unwritable as e:
        raise BuildError(f"cannot build the l1fx CPU kernels in the temporary directory {e}") from None


def _build_locked(source: Path, cxx: str, lib: Path) -> Path:
    with _exclusive(lib):
        if verified(lib):  # built by another process while we waited for the lock
            return lib
        try:
            remove_stale_temps(lib.parent)
            for stale in (lib, record_path(lib)):  # unverified: never loaded, replaced below
                stale.unlink(missing_ok=True)
        except OSError as e:
            raise _Unwritable(_why(lib.parent, e)) from None
        return _compile(source, cxx, lib)


def _compile(source: Path, cxx: str, lib: Path) -> Path:
    failures: list[tuple[list[str], str]] = []  # (command, what went wrong)
    for arch in ARCH_FLAGS:
        for omp in OPENMP_FLAGS:
            try:
                tmp = _temp_file(lib)
            except OSError as e:
                raise _Unwritable(_why(lib.parent, e)) from None
            try:  # the temporary file goes whatever happens (a kill -9 is left to remove_stale_temps)
                cmd = [cxx, *BASE_FLAGS, *arch, *omp, str(source), "-o", str(tmp)]
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.SubprocessError) as e:
                    failures.append((cmd, str(e)))
                    continue
                if res.returncode != 0:
                    failures.append((cmd, res.stderr.strip()))
                    continue
                try:
                    # Record first, then the library: a reader never sees a library without its record.
                    _write_atomic(record_path(lib), json.dumps(_digest(tmp)))
                    os.chmod(tmp, 0o755)
                    os.replace(tmp, lib)
                except OSError as e:
                    raise _Unwritable(_why(lib.parent, e)) from None
                return lib
            finally:
                tmp.unlink(missing_ok=True)
    lines = [line for _, err in failures for line in err.splitlines()]
    first = next((line for line in lines if "error" in line), lines[-1] if lines else "unknown failure")
    details = "\n".join(f"$ {' '.join(cmd)}\n{err[-2000:]}" for cmd, err in failures)
    # The first line says what went wrong (it goes into a one-line warning); details follow.
    raise BuildError(f"{Path(cxx).name} could not build {source.name}: {first.strip()[:300]}\n{details}")


def load(source: Path, name: str) -> ctypes.CDLL:
    """Build (or reuse) and load the library; raises :class:`BuildError`."""
    try:
        path = build(source, name)
    except OSError as e:  # a filesystem error not foreseen above still must not escape from an l1 op
        raise BuildError(f"cannot build the l1fx CPU kernels: {e}") from None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"cannot load the l1fx CPU kernels from {path}: {e}") from None
