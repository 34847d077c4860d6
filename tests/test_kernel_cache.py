"""The CPU kernel cache cannot break the l1 ops (docs/kernel_cache.md).

Unusable cache directories fall back, with one warning, to a per-user cache in
the temporary directory (built once, like the cache), else to a per-process
temporary directory (or, under ``auto``, to the reference kernel); a truncated or
half-written library is rebuilt, never loaded; a killed build's temporary file
is removed by the next build; concurrent builds compile once.

A compile of the real kernels takes seconds, so it happens once (the
``prebuilt`` fixture, normally a cache hit). Every other "build" runs a fake
compiler that copies that library to its ``-o`` path: the cache logic sees a
real compiler run and loads real kernels, at no compile cost. What could kill
the process (loading a truncated library) or must see a process exit runs in
a child process. Killed and concurrent builds are subprocesses too (no fork of
a process with torch's threads) that import only the stdlib-only cache module,
not torch (``BUILD_CHILD``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from l1fx import errors
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

# One build of the kernels in a fresh process that imports the cache module but not torch (fast to start):
# l1fx's packages are stood in for by empty ones, so that only errors.py and cpu_build.py (stdlib only) run.
BUILD_CHILD = '''\
import sys, types
for name, folder in {packages!r}:
    pkg = types.ModuleType(name)
    pkg.__path__ = [folder]
    sys.modules[name] = pkg
from l1fx.kernels import cpu_build
print("building", flush=True)
cpu_build.build(cpu_build.Path({source!r}), {name!r})
'''.format(packages=(("l1fx", os.path.dirname(errors.__file__)), ("l1fx.kernels", os.path.dirname(cpu_build.__file__))),
           source=str(cpu.SOURCE), name=cpu.LIB_NAME)


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
    tmp = tmp_path / "tmp"  # this test's own temporary directory (the per-user fallback cache goes there)
    tmp.mkdir()
    env = {"CXX": str(fake_cxx), "FAKECXX_LIB": str(prebuilt), "FAKECXX_LOG": str(tmp_path / "compiles.log"),
           cpu_build.CACHE_ENV: str(tmp_path / "cache"), "TMPDIR": str(tmp)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
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
    monkeypatch.setattr(cpu_build, "_fallback_used", None)
    yield
    cpu.reset()  # the next test loads the real cached library again


def _l1_op_works() -> str:
    x, w = torch.randn(5, 7), torch.randn(3, 7)
    for _ in range(2):
        torch.testing.assert_close(L.l1_linear(x, w), reference.linear_forward(x, w, None))
    return get_backend(x).name


def _setenv(monkeypatch, changes: dict) -> None:
    for k, v in changes.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)


@pytest.fixture
def removers(monkeypatch) -> list:
    """The per-process directories registered for removal at exit (recorded, not registered)."""
    found = []
    register = cpu_build.atexit.register
    monkeypatch.setattr(cpu_build.atexit, "register",
                        lambda fn, *a: found.append(a) if fn is cpu_build._remove_tree else register(fn, *a))
    return found


def _ops_and_warnings() -> tuple[str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = _l1_op_works()
    return backend, [str(c.message) for c in caught if str(c.message).startswith("l1fx")]


@pytest.mark.parametrize("kind", ["read-only mount", "HOME=/proc", "a file", "chmod 555"])
def test_unusable_cache_dir_falls_back_to_the_user_cache(kind, tmp_path, fake_env, fresh, monkeypatch, removers):
    _setenv(monkeypatch, _unusable(kind, tmp_path))
    try:
        backend, messages = _ops_and_warnings()
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)  # so that pytest can clean up
    path = cpu.build_info()["path"]
    assert backend == "cpu" and cpu_build.verified(Path(path))
    if kind == "chmod 555" and IS_ROOT:
        # root writes through the mode bits: the directory is usable, nothing falls back.
        assert messages == [] and cpu_build.fallback_dir() is None and path.startswith(str(tmp_path / "ro"))
        return
    assert len(messages) == 1, messages
    assert "\n" not in messages[0] and "not usable" in messages[0] and "L1FX_CACHE_DIR" in messages[0]
    user = Path(fake_env["TMPDIR"]) / f"l1fx-cache-{os.getuid()}"
    assert cpu_build.fallback_dir() == user and path.startswith(str(user)) and str(user) in messages[0]
    assert (user.stat().st_mode & 0o777) == 0o700 and removers == []  # private, and kept for later processes
    # Another process (here: this one, reset) reuses that build instead of compiling again.
    cpu.reset()
    monkeypatch.setattr(cpu_build, "_fallback_used", None)
    assert _ops_and_warnings()[0] == "cpu" and cpu.build_info()["path"] == path and compiles(fake_env) == 1


def _untrusted(kind: str, user: Path) -> None:
    if kind == "group/world-writable":
        user.mkdir()
        user.chmod(0o777)
    elif kind == "a symlink":
        (user.parent / "elsewhere").mkdir(mode=0o700)
        user.symlink_to(user.parent / "elsewhere")
    else:
        if not IS_ROOT:
            pytest.skip("making a directory owned by another user needs root")
        user.mkdir(mode=0o700)
        os.chown(user, 65534, -1)


@pytest.mark.parametrize("kind", ["group/world-writable", "a symlink", "owned by another user"])
def test_untrusted_user_cache_is_not_used(kind, tmp_path, fake_env, fresh, monkeypatch, removers):
    """Someone else could swap the library in a directory they can write: the build goes to a private one."""
    _setenv(monkeypatch, _unusable("HOME=/proc", tmp_path))
    user = Path(fake_env["TMPDIR"]) / f"l1fx-cache-{os.getuid()}"
    _untrusted(kind, user)
    backend, messages = _ops_and_warnings()
    root = cpu_build.fallback_dir()
    assert backend == "cpu" and len(messages) == 1 and str(user) in messages[0], messages
    assert root is not None and root.name.startswith("l1fx-kernels-") and cpu.build_info()["path"].startswith(str(root))
    assert list(user.iterdir()) == [] and len(removers) == 1  # nothing written there; the private one goes at exit
    cpu_build._remove_tree(*removers[0])  # what runs at exit
    assert not root.exists()


def test_per_process_dir_when_the_user_cache_is_unusable(tmp_path, fake_env, fresh, monkeypatch, removers):
    _setenv(monkeypatch, _unusable("HOME=/proc", tmp_path))
    (Path(fake_env["TMPDIR"]) / f"l1fx-cache-{os.getuid()}").write_text("a file in the way")
    backend, messages = _ops_and_warnings()
    root = cpu_build.fallback_dir()
    assert backend == "cpu" and len(messages) == 1 and "for this process only" in messages[0], messages
    assert root.name.startswith("l1fx-kernels-") and len(removers) == 1


def test_unusable_home_in_fresh_processes(tmp_path, fake_env):
    """End to end in children (DDP ranks, say): ops work, one warning each, and only the first one compiles."""
    env = child_env(fake_env, **_unusable("HOME=/proc", tmp_path))
    first, second = run_child(env), run_child(env)
    user = str(Path(fake_env["TMPDIR"]) / f"l1fx-cache-{os.getuid()}")
    for out in (first, second):
        assert out["ok"] and out["backend"] == "cpu" and len(out["warnings"]) == 1, out
        assert out["fallback"] == user and out["info"]["path"].startswith(user), out
    assert compiles(fake_env) == 1 and Path(first["info"]["path"]).exists()


def test_no_directory_at_all_falls_back_to_reference_under_auto(tmp_path, fake_env, fresh, monkeypatch):
    _setenv(monkeypatch, _unusable("HOME=/proc", tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", "/proc")  # no user cache and no per-process directory either
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

def _start_build(**popen) -> subprocess.Popen:
    """A build of the kernels in a fresh process, with this process's environment."""
    return subprocess.Popen([sys.executable, "-c", BUILD_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.l1fx-tmp-*"))


def test_stale_temporary_files_are_removed_by_the_next_build(fake_env):
    """One policy with l1fx._atomicfile: a temporary file that no live writer holds (flock) is stale."""
    import fcntl

    folder = lib_path().parent
    folder.mkdir(parents=True)
    dead = folder / f".{LIB}.l1fx-tmp-{_dead_pid()}.abc123"  # a build that was killed
    # Its pid runs (this process; in a container a restarted job is PID 1 again), but nobody holds it.
    unheld = folder / f".{LIB}.json.l1fx-tmp-{os.getpid()}.def456"
    live = folder / f".{LIB}.l1fx-tmp-{os.getpid()}.0789ab"  # a writer still at work: it holds the lock
    for path in (dead, unheld, live):
        path.write_bytes(b"\x7fELF half")
    with open(live, "rb+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        lib = cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)
    assert lib.parent == folder and cpu_build.verified(lib)
    assert not dead.exists() and not unheld.exists() and live.exists()
    assert _temps(folder) == [live]  # the build's own temporary files are gone too


def _temp_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place or removed between the listing and the stat
        return 0


def test_killed_build_leaves_nothing_that_breaks_the_next(fake_env, monkeypatch):
    folder = lib_path().parent
    monkeypatch.setenv("FAKECXX_SLEEP", "60")
    child = _start_build(start_new_session=True)  # its own process group, so the compiler dies with it
    try:
        deadline = time.time() + 60
        while not any(_temp_size(p) for p in _temps(folder)):
            assert child.poll() is None, f"the build ended early: {child.communicate()}"
            assert time.time() < deadline, "the build did not start"
            time.sleep(0.02)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the build and its compiler, mid-write
        child.communicate()
    assert _temps(folder) and not (folder / LIB).exists()
    monkeypatch.setenv("FAKECXX_SLEEP", "0")
    lib = cpu_build.build(cpu.SOURCE, cpu.LIB_NAME)  # the lock died with the build: no wait, one rebuild
    assert cpu_build.verified(lib) and not _temps(folder) and compiles(fake_env) == 2


def _lock_waiters(lock: Path) -> int:
    """How many processes wait for the flock on ``lock`` (Linux /proc/locks: blocked requests have "->")."""
    ino = lock.stat().st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and line.split()[-3].endswith(f":{ino}"))


def test_concurrent_builds_compile_once(fake_env):
    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see that both builds wait for the lock")
    lib = lib_path()
    with cpu_build._exclusive(lib):  # held by the test: both builds must wait for it, then meet at it
        children = [_start_build() for _ in range(2)]
        deadline = time.time() + 60
        while _lock_waiters(lib.with_suffix(".lock")) < 2:
            assert all(c.poll() is None for c in children), [c.communicate() for c in children]
            assert time.time() < deadline, "the builds did not reach the lock"
            time.sleep(0.02)
        assert compiles(fake_env) == 0
    results = [c.communicate(timeout=120) + (c.returncode,) for c in children]
    assert all(rc == 0 for *_, rc in results), results
    assert compiles(fake_env) == 1  # the second found the first one's library when it got the lock
    assert cpu_build.verified(lib)


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
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".l1fx-tmp-" in p.name or p.name.endswith(".so")]
