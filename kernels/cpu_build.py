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
* Atomic: the compiler writes a temporary file (``.lib<name>.so.l1fx-tmp-<pid>.<random>``,
  the naming of :mod:`l1fx._atomicfile`); the record (written with
  :func:`l1fx._atomicfile.atomic_write_bytes`) and then the library are renamed
  into place. Builds hold an exclusive lock (``lib<name>.lock``, ``fcntl.flock``)
  so concurrent processes compile once; a build that was killed leaves a
  temporary file that the next build removes, under that lock, by the one
  stale-file policy of l1fx (:func:`l1fx._atomicfile.remove_stale_temps`).
* An unusable cache directory (read-only, ``HOME=/proc``, a file in the way)
  falls back, with one warning, to a per-user cache,
  ``<tempdir>/l1fx-cache-<uid>`` (made mode 0700; not used if it is a link,
  someone else's or writable by group or others), where the library is built
  once and reused by the user's later processes like in the cache. If that is
  unusable too, the build goes into a temporary directory of this process,
  removed at a normal exit (a process killed by a signal leaves it behind). If
  even that fails, :class:`BuildError` says why, and the ``auto`` backend falls
  back to the reference kernel.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

from .. import _atomicfile
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
    """A new, empty temporary file next to ``final``, named as :mod:`l1fx._atomicfile` names its own.

    One naming and one stale-file policy for every l1fx write: a build removes
    the leftovers with :func:`l1fx._atomicfile.remove_stale_temps`, under the
    build lock (see :func:`_build_locked`).
    """
    tmp = _atomicfile.temp_path(final)
    open(tmp, "xb").close()  # also the first write into the directory: an unwritable one shows here
    return tmp


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete temporary files left in ``out_dir`` by killed builds (:func:`l1fx._atomicfile.remove_stale_temps`).

    Called with the build lock held, so no other build of this folder is
    running: a temporary file that no live writer holds is a killed build's.
    """
    return _atomicfile.remove_stale_temps(out_dir)


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


# ------------------------------------------------------------------ fallback directories

USER_CACHE_PREFIX = "l1fx-cache-"
_fallback_lock = threading.Lock()
_fallback_root: Optional[Path] = None  # the per-process directory, once made
_fallback_used: Optional[Path] = None  # the fallback this process builds in (user cache or per-process dir)


def user_cache_dir() -> Optional[Path]:
    """The per-user fallback cache, ``<tempdir>/l1fx-cache-<uid>`` (None where there are no uids)."""
    if not hasattr(os, "getuid"):  # pragma: no cover - Windows
        return None
    return Path(tempfile.gettempdir()) / f"{USER_CACHE_PREFIX}{os.getuid()}"


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can write (made mode 0700); :class:`_Unwritable` if it is not.

    The temporary directory is shared by every local user, so a directory
    there is trusted only if it is a real directory (not a link), owned by
    this user and not writable by group or others: anyone else who could
    write in it could swap the library between its check and its load.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise _Unwritable(_why(path, e)) from None
    try:
        st = os.lstat(path)
    except OSError as e:
        raise _Unwritable(_why(path, e)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise _Unwritable(f"{path}: not a directory")
    if st.st_uid != os.getuid():
        raise _Unwritable(f"{path}: owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise _Unwritable(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
    return path


def _remove_tree(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked child that inherited the handler
        shutil.rmtree(path, ignore_errors=True)


def _process_dir(unusable: str) -> Path:
    """This process's temporary build directory (made once; removed at a normal exit)."""
    global _fallback_root
    with _fallback_lock:
        if _fallback_root is None:
            try:
                root = Path(tempfile.mkdtemp(prefix="l1fx-kernels-"))
            except OSError as e:
                raise BuildError(
                    f"no usable directory to build the l1fx CPU kernels in: {unusable}, "
                    f"nor a temporary directory ({e}); set ${CACHE_ENV} to a writable directory"
                ) from None
            atexit.register(_remove_tree, root, os.getpid())
            _fallback_root = root
        return _fallback_root


def _warn_fallback(unusable: str, root: Path, shared: bool) -> None:
    """One warning per process, naming the directory used instead of the cache."""
    global _fallback_used
    with _fallback_lock:
        if _fallback_used is not None:
            return
        _fallback_used = root
    where = ("reused by this user's later processes" if shared
             else "for this process only, removed at a normal exit")
    warnings.warn(
        f"l1fx: kernel cache not usable ({unusable}); the CPU kernels are built in {root} instead ({where}); "
        f"set ${CACHE_ENV} to a writable directory",
        RuntimeWarning,
        stacklevel=4,
    )


def fallback_dir() -> Optional[Path]:
    """The directory this process builds in because the cache was unusable (None if it was usable)."""
    return _fallback_used


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
        try:
            return _build_in(primary, source, cxx, name)
        except _Unwritable as e:
            unusable = str(e)
    # The cache is unusable: the per-user cache next (built once, like the cache), else this process's own.
    user = user_cache_dir()
    if user is not None:
        try:
            root = private_dir(user)
            lib = _build_in(root / folder, source, cxx, name)
        except _Unwritable as e:
            unusable = f"{unusable}; {e}"
        else:
            _warn_fallback(unusable, root, shared=True)
            return lib
    root = _process_dir(unusable)
    _warn_fallback(unusable, root, shared=False)
    try:
        return _build_in(root / folder, source, cxx, name)
    except _Unwritable as e:
        raise BuildError(f"cannot build the l1fx CPU kernels in the temporary directory {e}") from None


def _build_in(folder: Path, source: Path, cxx: str, name: str) -> Path:
    lib = folder / f"lib{name}.so"
    if verified(lib):  # the common case: no write, so a read-only cache with a good build works
        return lib
    return _build_locked(source, cxx, lib)


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
                    _atomicfile.atomic_write_bytes(record_path(lib), json.dumps(_digest(tmp)).encode(),
                                                   clean_stale=False)
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


def load_once(state: dict, lock: threading.Lock, source: Path, name: str,
              declare: Callable[[ctypes.CDLL], Optional[dict]]) -> Optional[ctypes.CDLL]:
    """The library of one kernel module, built and loaded on its first call, once per process.

    ``state`` (the module's, empty until first use) gets ``"lib"`` and ``"path"``, or ``"error"`` (a
    failed build is remembered, not retried on every op), and ``"build_seconds"``; ``declare(lib)`` sets
    the ctypes signatures and may return more entries (``{"isa": ...}``). Clearing ``state`` (under
    ``lock``) makes the next call try again.
    """
    with lock:
        if not state:
            t0 = time.perf_counter()
            try:
                lib = load(source, name)
            except KernelBuildError as e:  # no compiler, failed build, no usable directory
                state["error"] = str(e)
            else:
                state.update(declare(lib) or {})
                state["lib"], state["path"] = lib, lib._name
            state["build_seconds"] = time.perf_counter() - t0
        return state.get("lib")


def build_info(state: dict) -> dict:
    """What a module's first use did: ``loaded`` (and the path) or the error, and the seconds spent."""
    return {k: v for k, v in state.items() if k != "lib"} | {"loaded": "lib" in state}
