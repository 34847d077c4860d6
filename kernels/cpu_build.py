"""Build a C++ source into a shared library once, cache it across runs, load it.

The l1 CPU kernels are plain C++ with a C ABI (no PyTorch headers), so one
``c++ -O3 -fopenmp -shared`` call of a few seconds builds them. The library is
cached under ``$L1FX_CACHE_DIR`` (default ``$XDG_CACHE_HOME/l1fx`` or
``~/.cache/l1fx``) in a folder named by a hash of everything that affects the
binary: the source text, the compiler and its version, the flags and the CPU
(``-march=native`` code must not be reused on another CPU). Later processes,
and every shape, reuse it; only a change of one of those rebuilds.

Several processes (pytest-xdist workers) may build at once: each compiles into
its own temporary file and renames it into place atomically.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE_ENV = "L1FX_CACHE_DIR"
COMPILER_ENV = "CXX"
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
# Tried in order: the best code for this CPU first, then portable code.
ARCH_FLAGS = (["-march=native"], [])
OPENMP_FLAGS = (["-fopenmp"], [])


class BuildError(RuntimeError):
    """The library could not be built (no compiler, or it failed)."""


def cache_dir() -> Path:
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


def build(source: Path, name: str) -> Path:
    """Compile ``source`` into ``lib<name>.so`` in the cache (if not there) and return its path."""
    cxx = find_compiler()
    text = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [text, cxx.encode(), _compiler_version(cxx).encode(), repr((BASE_FLAGS, ARCH_FLAGS, OPENMP_FLAGS)).encode(),
             _cpu_fingerprint().encode(), platform.machine().encode()]
        )
    ).hexdigest()[:16]
    out_dir = cache_dir() / f"{name}-{key}"
    lib = out_dir / f"lib{name}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[list[str], str]] = []  # (command, what went wrong)
    for arch in ARCH_FLAGS:
        for omp in OPENMP_FLAGS:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            cmd = [cxx, *BASE_FLAGS, *arch, *omp, str(source), "-o", tmp]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                failures.append((cmd, str(e)))
            else:
                if res.returncode == 0:
                    os.replace(tmp, lib)  # atomic: concurrent builders all succeed
                    return lib
                failures.append((cmd, res.stderr.strip()))
            Path(tmp).unlink(missing_ok=True)
    lines = [line for _, err in failures for line in err.splitlines()]
    first = next((line for line in lines if "error" in line), lines[-1] if lines else "unknown failure")
    details = "\n".join(f"$ {' '.join(cmd)}\n{err[-2000:]}" for cmd, err in failures)
    # The first line says what went wrong (it goes into a one-line warning); details follow.
    raise BuildError(f"{Path(cxx).name} could not build {source.name}: {first.strip()[:300]}\n{details}")


def load(source: Path, name: str) -> ctypes.CDLL:
    """Build (or reuse) and load the library; raises :class:`BuildError`."""
    path = build(source, name)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"cannot load the l1fx CPU kernels from {path}: {e}") from None
