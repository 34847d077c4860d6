"""The CPU kernel cache cannot break the l1 ops (docs/kernel_cache.md).

Unusable cache directories fall back to a per-process temporary directory with
one warning (or, under ``auto``, to the reference kernel); a truncated or
half-written library is rebuilt, never loaded; a killed build's temporary file
is removed by the next build; concurrent builds compile once.

A compile of the real kernels takes seconds, so it happens once (the
``prebuilt`` fixture, normally a cache hit). Every other "build" runs a fake
compiler that copies that library to its ``-o`` path: the cache logic sees a
real compiler run and loads real kernels, at no compile cost. What could kill
the process (loading a truncated library) or must see a process exit runs in
a child process; killed and concurrent builds are forks of this one (cheap:
no second import of torch).
"""
from __future__ import annotations

import json
import os
import traceback
import warnings
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l1fx.errors import BackendUnavailable, KernelBuildError
from l1fx import functional as L
from l1fx.kernels import cpu, cpu_build, get_backend, reference

if not cpu.available()[0]:  # pragma: no cover - only on machines without a C++ compiler
    pytest.skip(f"cpu backend unavailable here: {cpu.available()[1].splitlines()[0]}", allow_module_level=True)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
LIB = f"lib{cpu.LIB_NAME}.so"

FAKE_CXX = '''\
#!{python}
"""Stands in for a C++ compiler: copies $FAKECXX_LIB to the -o path, half of it, then a pause, then the rest."""
import os, sys, time
if sys.argv[1:] == ["--version"]:
    print("fakecxx 1.0")
    sys.exit(0)
if os.environ.get("FAKECXX_LOG"):
    with open(os.environ["FAKECXX_LOG"], "a") as log:
        log.write(f"{{os.getpid()}}\\n")
data = open(os.environ["FAKECXX_LIB"], "rb").read()
with open(sys.argv[sys.argv.index("-o") + 1], "wb") as out:
    out.write(data[: len(data) // 2])
    out.flush()
    time.sleep(float(os.environ.get("FAKECXX_SLEEP", "0")))
    out.write(data[len(data) // 2:])
'''

# Runs one l1 op twice and reports what happened, as JSON on the last line.
CHILD = '''\
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    from l1fx import functional as L
    from l1fx.kernels import cpu, cpu_build, get_backend, reference
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    ok = all(torch.allclose(L.l1_linear(x, w), reference.linear_forward(x, w, None), atol=1e-5) for _ in range(2))
    backend = get_backend(x).name
print(json.dumps(dict(
    ok=ok, backend=backend, info=cpu.build_info(),
    fallback=None if cpu_build.fallback_dir() is None else str(cpu_build.fallback_dir()),
    warnings=[str(c.message) for c in caught if str(c.message).startswith("l1fx")],
)))
'''


@pytest.fixture(scope="module")
def prebuilt() -> Path:
    """The real kernels, built once (normally already in the cache)."""
    return cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)


@pytest.fixture(scope="module")
def fake_cxx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fakecxx") / "fakecxx"
    path.write_text(FAKE_CXX.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_env(monkeypatch, tmp_path, prebuilt, fake_cxx) -> dict:
    """Environment (also applied to this process) building with the fake compiler into tmp_path/cache."""
    env = {"CXX": str(fake_cxx), "FAKECXX_LIB": str(prebuilt), "FAKECXX_LOG": str(tmp_path / "compiles.log"),
           cpu_build.CACHE_ENV: str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("L1FX_BACKEND", raising=False)
    return env


def compiles(env: dict) -> int:
    log = Path(env["FAKECXX_LOG"])
    return len(log.read_text().split()) if log.exists() else 0


def lib_path() -> Path:
    """Where a build with the current environment puts the library (without building)."""
    key = cpu_build._key(cpu.SOURCE.read_bytes(), cpu_build.find_compiler())
    return cpu_build.cache_dir() / f"{cpu.LIB_NAME}-{key}" / LIB


def child_env(env: dict, **changes) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("L1FX_", "FAKECXX_")) and k != "CXX"}
    out.update(env)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def run_child(env: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    # A negative code is a signal (SIGBUS from a truncated library is -7).
    assert run.returncode == 0, f"child exited with {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ unusable cache directories

def _unusable(kind: str, tmp_path: Path) -> dict:
    if kind == "read-only mount":
        return {cpu_build.CACHE_ENV: "/proc"}  # an existing directory nobody, not even root, can write in
    if kind == "HOME=/proc":
        return {cpu_build.CACHE_ENV: None, "XDG_CACHE_HOME": None, "HOME": "/proc"}
    if kind == "a file":
        (tmp_path / "file").write_text("not a directory")
        return {cpu_build.CACHE_ENV: str(tmp_path / "file")}
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return {cpu_build.CACHE_ENV: str(ro)}


@pytest.fixture
def fresh(monkeypatch):
    """This process with no kernels loaded and no fallback directory yet; restored afterwards."""
    cpu.reset()
    monkeypatch.setattr(cpu_build, "_fallback_root", None)
    yield
    cpu.reset()  # the next test loads the real cached library again


def _l1_op_works() -> str:
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    for _ in range(2):
        torch.testing.assert_close(L.l1_linear(x, w), reference.linear_forward(x, w, None))
    return get_backend(x).name


@pytest.mark.parametrize("kind", ["read-only mount", "HOME=/proc", "a file", "chmod 555"])
def test_unusable_cache_dir_falls_back_to_a_temporary_dir(kind, tmp_path, fake_env, fresh, monkeypatch):
    for k, v in _unusable(kind, tmp_path).items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    removers = []
    register = cpu_build.atexit.register
    monkeypatch.setattr(cpu_build.atexit, "register",
                        lambda fn, *a: removers.append(a) if fn is cpu_build._remove_tree else register(fn, *a))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = _l1_op_works()
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)  # so that pytest can clean up
    messages = [str(c.message) for c in caught if str(c.message).startswith("l1fx")]
    path = cpu.build_info()["path"]
    assert backend == "cpu" and cpu_build.verified(Path(path))
    if kind == "chmod 555" and IS_ROOT:
        # root writes through the mode bits: the directory is usable, nothing falls back.
        assert messages == [] and cpu_build.fallback_dir() is None and path.startswith(str(tmp_path / "ro"))
        return
    assert len(messages) == 1, messages
    assert "\n" not in messages[0] and "not usable" in messages[0] and "L1FX_CACHE_DIR" in messages[0]
    root = cpu_build.fallback_dir()
    assert root is not None and path.startswith(str(root)) and len(removers) == 1
    cpu_build._remove_tree(*removers[0])  # what runs at exit
    assert not root.exists()


def test_unusable_home_in_a_fresh_process(tmp_path, fake_env):
    """End to end in a child: ops work, one warning, and the temporary directory is gone after exit."""
    out = run_child(child_env(fake_env, **_unusable("HOME=/proc", tmp_path)))
    assert out["ok"] and out["backend"] == "cpu" and len(out["warnings"]) == 1, out
    assert out["fallback"] and out["info"]["path"].startswith(out["fallback"]), out
    assert not Path(out["fallback"]).exists(), "the per-process directory must be removed at exit"


def test_no_directory_at_all_falls_back_to_reference_under_auto(tmp_path, fake_env, fresh, monkeypatch):
    for k, v in _unusable("HOME=/proc", tmp_path).items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)

    def no_temp_dir(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cpu_build.tempfile, "mkdtemp", no_temp_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _l1_op_works() == "reference"
    messages = [str(c.message) for c in caught if str(c.message).startswith("l1fx")]
    assert len(messages) == 1 and "reference kernel" in messages[0], messages
    assert "no usable directory" in cpu.build_info()["error"] and not cpu.build_info()["loaded"]
    # Asked for by name, the cpu backend says why it cannot run (not a PermissionError).
    monkeypatch.setenv("L1FX_BACKEND", "cpu")
    with pytest.raises(BackendUnavailable, match="no usable directory"):
        L.l1_linear(torch.randn(2, 3), torch.randn(4, 3))


def test_verified_library_in_read_only_cache_is_used_without_writing(fake_env, monkeypatch):
    lib = cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)
    assert cpu_build.verified(lib) and compiles(fake_env) == 1

    def no_writes(*a):
        raise AssertionError("a verified library must be reused without touching the directory")

    monkeypatch.setattr(cpu_build, "_exclusive", no_writes)
    assert cpu_build.build(cpu.SOURCE, cpu.LIB_NAME) == lib and compiles(fake_env) == 1


# ------------------------------------------------------------------ damaged libraries

def _damage(lib: Path, how: str) -> None:
    good = lib.read_bytes()
    if how == "truncated":
        with open(lib, "r+b") as f:  # in place, as a full disk or a crash would leave it
            f.truncate(len(good) // 2)
    elif how == "half written, no record":
        cpu_build.record_path(lib).unlink()
        lib.write_bytes(good[: len(good) // 3])
    else:
        lib.write_bytes(good[:-4096] + bytes(4096))
    assert not cpu_build.verified(lib)


@pytest.mark.parametrize("how", ["truncated", "half written, no record", "same size, other bytes"])
def test_damaged_library_is_rebuilt(how, fake_env):
    lib = cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)
    good = lib.read_bytes()
    _damage(lib, how)
    assert cpu_build.build(cpu.SOURCE, cpu.LIB_NAME) == lib
    assert lib.read_bytes() == good and cpu_build.verified(lib) and compiles(fake_env) == 2


def test_truncated_library_does_not_kill_a_fresh_process(fake_env):
    lib = cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)
    _damage(lib, "truncated")
    out = run_child(child_env(fake_env))  # loading the truncated file would kill it (SIGBUS) or fail
    assert out["ok"] and out["backend"] == "cpu" and out["warnings"] == [], out
    assert cpu_build.verified(lib) and compiles(fake_env) == 2


# ------------------------------------------------------------------ killed and concurrent builds

def _fork(fn, new_session: bool = False) -> int:
    """Run ``fn`` in a fork of this process; returns its pid (exit code 0 if fn returned)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if new_session:
                os.setsid()  # its own process group, so that the compiler can be killed with it
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _build():
    cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)


def _dead_pid() -> int:
    pid = _fork(lambda: None)
    os.waitpid(pid, 0)
    return pid


def test_stale_temporary_files_are_removed_by_the_next_build(fake_env):
    folder = lib_path().parent
    folder.mkdir(parents=True)
    dead = folder / f".{LIB}.{_dead_pid()}.abc123.tmp"  # a build that was killed
    old = folder / f".{LIB}.json.{os.getpid()}.def456.tmp"  # alive, but hours old
    live = folder / f".{LIB}.{os.getpid()}.ghi789.tmp"  # a build still running
    for path in (dead, old, live):
        path.write_bytes(b"\x7fELF half")
    hours_ago = time.time() - 2 * cpu_build.STALE_SECONDS
    os.utime(old, (hours_ago, hours_ago))
    lib = cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)
    assert lib.parent == folder and cpu_build.verified(lib)
    assert not dead.exists() and not old.exists() and live.exists()
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [live.name], leftovers  # the build's own temporary files are gone too


def test_killed_build_leaves_nothing_that_breaks_the_next(fake_env, monkeypatch):
    folder = lib_path().parent
    monkeypatch.setenv("FAKECXX_SLEEP", "60")
    pid = _fork(_build, new_session=True)
    try:
        deadline = time.time() + 60
        while not any(p.stat().st_size for p in folder.glob(f".{LIB}.*.tmp")):
            assert os.waitpid(pid, os.WNOHANG) == (0, 0) and time.time() < deadline, "the build did not start"
            time.sleep(0.02)
    finally:
        os.killpg(pid, signal.SIGKILL)  # the build and its compiler, mid-write
        os.waitpid(pid, 0)
    assert list(folder.glob(".*.tmp")) and not (folder / LIB).exists()
    monkeypatch.setenv("FAKECXX_SLEEP", "0")
    lib = cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)  # the lock died with the build: no wait, one rebuild
    assert cpu_build.verified(lib) and not list(folder.glob(".*.tmp")) and compiles(fake_env) == 2


def test_concurrent_builds_compile_once(fake_env, monkeypatch):
    monkeypatch.setenv("FAKECXX_SLEEP", "0.5")
    pids = [_fork(_build) for _ in range(2)]
    assert all(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in pids)
    assert compiles(fake_env) == 1  # the second waited for the lock and reused the first one's library
    assert cpu_build.verified(lib_path())


# ------------------------------------------------------------------ errors

def test_build_errors_are_kernel_build_errors(monkeypatch, tmp_path):
    assert issubclass(cpu_build.BuildError, KernelBuildError)
    monkeypatch.setenv("CXX", "no-such-compiler-l1fx")
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler"):
        cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)
    bad = tmp_path / "bad.cpp"
    bad.write_text("not C++\n")
    monkeypatch.delenv("CXX")
    monkeypatch.setenv(cpu_build.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(KernelBuildError, match="could not build bad.cpp"):
        cpu_build.build(bad, "bad")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith((".tmp", ".so"))]
