"""l1fx.ort_session: exported files run through every onnxruntime path and match PyTorch."""
from __future__ import annotations

import ctypes
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from l1fx import nn as L
from l1fx import ort_ops
from l1fx import ort_runtime as S
from l1fx.errors import KernelBuildError, UsageError
from l1fx.export import export_onnx
from l1fx.kernels import ort_build


class Net(nn.Module):
    """Every l1 node kind the exporter writes: strided, dilated, grouped, bias-free, 1-D/2-D/3-D, linear."""

    def __init__(self):
        super().__init__()
        self.c2 = L.L1Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2g = L.L1Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.c1 = L.L1Conv1d(8, 6, 1)
        self.fc = L.L1Linear(6, 5)
        self.c3 = L.L1Conv3d(3, 4, 3, padding=1)

    def forward(self, x):  # x [B, 3, 10, 10]
        y = self.c2g(self.c2(x))                      # [B, 8, 5, 5]
        y = self.fc(self.c1(y.flatten(2)).transpose(1, 2))   # [B, 25, 5]
        z = self.c3(x.reshape(x.shape[0], 3, 5, 5, 4))      # [B, 4, 5, 5, 4]
        return y, z


def _inputs(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Off-centre and spread out: the l1 kernels must stay exact far from 0.
    return torch.randn(batch, 3, 10, 10, generator=g) * 50 + 1e3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e3)  # weights near the inputs, so outputs are not dominated by the offset
    path = tmp_path_factory.mktemp("ort") / "net.onnx"
    export_onnx(model, (_inputs(2),), path)
    return model, path


@pytest.fixture(scope="session", params=[pytest.param("native", marks=pytest.mark.slow)])
def native_lib(request) -> Path:
    """The custom-op library, built once for the whole run and shared (a cold compile takes 15-30 s: slow).

    Every test whose ``ort_session`` may take the native path uses it, so the
    compile is paid here, once, and under ``-m "not slow"`` not at all.
    """
    if ort_build.find_headers() is None:
        pytest.skip("no onnxruntime headers here (test_no_headers_falls_back covers that case)")
    return ort_build.library_path()


def _run(sess, x: torch.Tensor):
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def _check(outs, model, x, rtol):
    with torch.no_grad():
        refs = model(x)
    for got, ref in zip(outs, refs):
        ref = ref.numpy()
        assert got.shape == ref.shape
        assert np.abs(got.astype(np.float64) - ref).max() <= rtol * np.abs(ref).max()


def _quiet_session(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.OrtFallbackWarning)
        return S.ort_session(path, **kw)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_plain_onnxruntime_matches_pytorch(exported, batch):
    model, path = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # no l1fx involved
    _check(_run(sess, _inputs(batch, batch)), model, _inputs(batch, batch), 1e-5)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_ort_session_matches_pytorch(exported, native_lib, batch):
    model, path = exported
    sess = _quiet_session(path)
    assert sess.l1fx_path in ("native", "python")
    # The same C++ kernel as the eager model: the numbers are the same up to float32 summation order.
    _check(_run(sess, _inputs(batch, batch)), model, _inputs(batch, batch), 1e-6)


def test_native_path_is_taken_where_the_headers_are(exported, native_lib):
    model, path = exported
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.OrtFallbackWarning)  # the fastest path: no warning
        sess = S.ort_session(path, paths=("native",), intra_op_num_threads=1)
    assert sess.l1fx_path == "native"
    _check(_run(sess, _inputs(4)), model, _inputs(4), 1e-6)


def test_no_headers_falls_back(exported, monkeypatch, tmp_path):
    monkeypatch.setattr(ort_build, "header_dirs", lambda: [tmp_path / "no-headers"])
    with pytest.raises(KernelBuildError, match="headers"):
        ort_build.library_path()
    with pytest.warns(S.OrtFallbackWarning, match="native: KernelBuildError.*headers"):
        sess = S.ort_session(exported[1])
    assert sess.l1fx_path != "native"


def _ort_api_base():
    """onnxruntime's own ``OrtGetApiBase()`` (the wheel's C library, loaded beside the Python module)."""
    capi = Path(ort.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    if not libs:
        pytest.skip("the onnxruntime wheel has no libonnxruntime.so to take the C API from")
    lib = ctypes.CDLL(str(libs[0]))
    lib.OrtGetApiBase.restype = ctypes.c_void_p
    return lib.OrtGetApiBase()


def test_registration_fails_on_a_runtime_older_than_the_headers(native_lib):
    """A runtime that does not serve the headers' API version gets an error status, not a silent success."""
    lib = ctypes.CDLL(str(native_lib))
    built_for = lib.l1fx_ort_api_version()
    get_api_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_t = ctypes.CFUNCTYPE(ctypes.c_void_p)  # const char* (not c_char_p: ctypes cannot return that safely)
    real = ctypes.cast(_ort_api_base(), ctypes.POINTER(ctypes.c_void_p))  # struct OrtApiBase {GetApi, GetVersionString}
    real_get_api = get_api_t(real[0])

    @get_api_t
    def older_get_api(version):  # an "older runtime": serves up to one version below the headers
        return real_get_api(version) if version < built_for else None

    version = ctypes.create_string_buffer(b"1.0-test")

    @version_t
    def version_string():
        return ctypes.addressof(version)

    fake_base = (ctypes.c_void_p * 2)(ctypes.cast(older_get_api, ctypes.c_void_p),
                                       ctypes.cast(version_string, ctypes.c_void_p))
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    status = lib.RegisterCustomOps(None, ctypes.addressof(fake_base))
    assert status, "registration must fail, not succeed with no ops registered"
    # OrtApi starts CreateStatus, GetErrorCode, GetErrorMessage.
    api = ctypes.cast(real_get_api(1), ctypes.POINTER(ctypes.c_void_p))
    message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(api[2])(status).decode()
    assert f"API version {built_for}" in message and "1.0-test" in message, message


def test_python_path_matches_pytorch(exported):
    pytest.importorskip("onnxruntime_extensions")
    model, path = exported
    sess = S.ort_session(path, paths=("python",))
    assert sess.l1fx_path == "python"
    _check(_run(sess, _inputs(5)), model, _inputs(5), 1e-6)


def test_python_ops_return_arrays_not_lists():
    # The extensions' hook calls rv.flatten().tolist(); a list of Python floats was 17x the kernel's time.
    y = ort_ops._result(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    flat = y.flatten().tolist()
    assert type(flat) is np.ndarray and flat.dtype == np.float32 and flat.flags.c_contiguous
    assert np.shares_memory(flat, y) and flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_fallback_to_portable_warns_once(exported, monkeypatch):
    model, path = exported

    def no_native():
        raise KernelBuildError("simulated: no headers")

    def no_python():
        raise ort_ops.BackendUnavailable("simulated: no onnxruntime-extensions")

    monkeypatch.setattr(S, "native_library", no_native)
    monkeypatch.setattr(ort_ops, "_register_ops", no_python)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sess = S.ort_session(path)
    fallbacks = [w for w in caught if issubclass(w.category, S.OrtFallbackWarning)]
    assert len(fallbacks) == 1
    msg = str(fallbacks[0].message)
    assert "'portable'" in msg and "simulated: no headers" in msg and "simulated: no onnxruntime-extensions" in msg
    assert sess.l1fx_path == "portable"
    _check(_run(sess, _inputs(3)), model, _inputs(3), 1e-5)


def test_native_unavailable_falls_back_to_python_with_one_warning(exported, monkeypatch):
    pytest.importorskip("onnxruntime_extensions")
    _, path = exported
    monkeypatch.setattr(S, "native_library", lambda: (_ for _ in ()).throw(KernelBuildError("simulated")))
    with pytest.warns(S.OrtFallbackWarning, match="'python' path.*native: KernelBuildError: simulated") as rec:
        sess = S.ort_session(path)
    assert sess.l1fx_path == "python" and len(rec) == 1


def test_only_unavailable_paths_asked_for_is_a_clear_error(exported, monkeypatch):
    """paths without "portable", none of them working: an error naming each failure (was AssertionError)."""
    from l1fx.errors import BackendUnavailable

    _, path = exported
    monkeypatch.setattr(S, "native_library", lambda: (_ for _ in ()).throw(KernelBuildError("simulated")))
    with pytest.raises(BackendUnavailable, match="no path of 'native' works here: native: KernelBuildError: simulated"):
        S.ort_session(path, paths=("native",))


def test_file_and_options_are_left_alone(exported, native_lib):
    _, path = exported
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    with pytest.warns(S.OrtOptionsWarning, match="cannot copy a SessionOptions"):
        sess = _quiet_session(path, sess_options=opts)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sess.get_session_options().intra_op_num_threads == 1
    with pytest.raises(Exception):  # the caller's options got no l1fx config entry
        opts.get_session_config_entry(S.SPIN_KEY)
    if sess.l1fx_path != "portable":
        got = sess.get_session_options()
        assert got.get_session_config_entry(S.SPIN_KEY) == "0"
        assert got.get_session_config_entry(S.THREADS_KEY) == "1"  # the kernels follow intra_op_num_threads


def test_asymmetric_pads_fall_back_to_the_function_body(exported, native_lib, tmp_path):
    model, path = exported
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        if node.op_type == "L1Conv":
            for a in node.attribute:
                if a.name == "pads" and list(a.ints) == [1, 1, 1, 1]:
                    a.ints[:] = [1, 1, 0, 0]  # the kernels take symmetric padding only
    bad = tmp_path / "asym.onnx"
    onnx.save(proto, str(bad))
    with pytest.warns(S.OrtFallbackWarning, match="asymmetric pads"):
        sess = S.ort_session(bad)
    assert sess.l1fx_path == "portable"
    plain = ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    x = _inputs(2)
    for got, want in zip(_run(sess, x), _run(plain, x)):
        np.testing.assert_array_equal(got, want)


def test_user_errors(exported, tmp_path):
    _, path = exported
    with pytest.raises(UsageError, match="no such ONNX file"):
        S.ort_session(tmp_path / "missing.onnx")
    with pytest.raises(UsageError, match="'intra_op_threads' is not an onnxruntime.SessionOptions attribute"):
        S.ort_session(path, intra_op_threads=2)
    with pytest.raises(UsageError, match="paths must be"):
        S.ort_session(path, paths=("fast",))


# ---------------------------------------------------------------- SessionOptions are never silently cut short
def _batch_dim(path) -> str:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_options_from_a_factory_keep_everything(exported):
    _, path = exported
    made = []

    def factory():
        opts = ort.SessionOptions()
        opts.add_free_dimension_override_by_name(_batch_dim(path), 3)  # not readable back from a SessionOptions
        opts.add_session_config_entry("session.l1fx_test_entry", "kept")
        opts.add_session_config_entry(S.SPIN_KEY, "1")  # the caller's choice beats l1fx's default
        made.append(opts)
        return opts

    with warnings.catch_warnings():
        warnings.simplefilter("error", S.OrtOptionsWarning)
        sess = S.ort_session(path, sess_options=factory, paths=("portable",))
    assert sess.get_inputs()[0].shape[0] == 3  # the override reached the session
    got = S._options(factory, {"intra_op_num_threads": 2}, "native")
    assert got.get_session_config_entry("session.l1fx_test_entry") == "kept"
    assert got.get_session_config_entry(S.SPIN_KEY) == "1" and got.get_session_config_entry(S.THREADS_KEY) == "2"
    assert len({id(o) for o in made}) == len(made) >= 2  # a fresh object each time: nothing is shared or reused


def test_an_options_object_that_cannot_be_copied_warns(exported):
    _, path = exported
    opts = ort.SessionOptions()
    opts.add_free_dimension_override_by_name(_batch_dim(path), 3)
    with pytest.warns(S.OrtOptionsWarning, match="free-dimension overrides.*function returning a new SessionOptions"):
        sess = S.ort_session(path, sess_options=opts, paths=("portable",))
    assert sess.get_inputs()[0].shape[0] != 3  # what the warning said: the override could not be carried over


def test_bad_sess_options_are_usage_errors(exported):
    _, path = exported
    with pytest.raises(UsageError, match="sess_options must be"):
        S.ort_session(path, sess_options={"intra_op_num_threads": 1})
    with pytest.raises(UsageError, match="returned dict"):
        S.ort_session(path, sess_options=lambda: {})


# ---------------------------------------------------------------- fetching the headers, the command line
FAKE_APT = """#!/bin/sh
case "$FAKE_APT" in
  hang) exec sleep 60 ;;
  offline) echo "W: Failed to fetch http://deb.debian.org/debian/dists/trixie/InRelease" >&2
           echo "E: Unable to locate package libonnxruntime-dev" >&2; exit 100 ;;
esac
"""


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "dpkg-deb"):
        (bin_dir / tool).write_text(FAKE_APT)
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "dest"


def test_fetch_headers_gives_up_on_a_hanging_apt(fake_apt, monkeypatch):
    monkeypatch.setenv("FAKE_APT", "hang")
    monkeypatch.setattr(ort_build, "COMMAND_TIMEOUT", 1)
    with pytest.raises(KernelBuildError, match=r"`apt-get update` did not finish within 1 s"):
        ort_build.fetch_headers(fake_apt)
    assert not fake_apt.exists()


def test_fetch_headers_cli_says_what_failed_in_one_line(fake_apt, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_APT", "offline")
    assert ort_build.main(["--fetch-headers", "--dest", str(fake_apt)]) == 1
    out, err = capsys.readouterr()
    assert "fetching the onnxruntime headers" in out
    assert err.count("\n") == 1 and "Unable to locate package libonnxruntime-dev" in err and "Traceback" not in err
    assert ort_build.main(["--bogus"]) == 2 and capsys.readouterr().err.count("\n") == 1
    assert ort_build.main(["--dest", str(fake_apt)]) == 2  # --dest without --fetch-headers


# ---------------------------------------------------------------- the generated wrapper source
def test_wrapper_source_is_not_put_in_a_shared_predictable_dir(monkeypatch, tmp_path):
    include = ort_build.find_headers()
    if include is None:
        pytest.skip("no onnxruntime headers here")
    shared = tmp_path / "tmp"
    shared.mkdir()
    monkeypatch.setattr(ort_build.tempfile, "tempdir", str(shared))
    monkeypatch.setenv("L1FX_CACHE_DIR", "/proc/l1fx")  # unusable cache
    # Another user's directory where the old code wrote (it only did mkdir(exist_ok=True)), and where the
    # per-user cache would be: both must be refused.
    for name in (f"l1fx-ort-src-{os.getuid()}", f"l1fx-cache-{os.getuid()}"):
        (shared / name).mkdir()
        (shared / name).chmod(0o777)
    monkeypatch.setattr(ort_build, "_private_src", None)
    src = ort_build._wrapper(include)
    assert not src.is_relative_to(shared / f"l1fx-ort-src-{os.getuid()}")
    assert not src.is_relative_to(shared / f"l1fx-cache-{os.getuid()}")
    assert (src.parent.stat().st_mode & 0o077) == 0 and src.read_text().startswith("// generated by l1fx")


def test_wrapper_write_failure_leaves_no_temp_file(monkeypatch, tmp_path):
    include = ort_build.find_headers()
    if include is None:
        pytest.skip("no onnxruntime headers here")
    monkeypatch.setenv("L1FX_CACHE_DIR", str(tmp_path))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ort_build.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        ort_build._wrapper(include)
    assert [p.name for p in (tmp_path / "ort-src").iterdir()] == []
