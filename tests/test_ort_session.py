"""l1fx.ort_session: exported files run through every onnxruntime path and match PyTorch."""
from __future__ import annotations

import hashlib
import warnings

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
def test_ort_session_matches_pytorch(exported, batch):
    model, path = exported
    sess = _quiet_session(path)
    assert sess.l1fx_path in ("native", "python")
    # The same C++ kernel as the eager model: the numbers are the same up to float32 summation order.
    _check(_run(sess, _inputs(batch, batch)), model, _inputs(batch, batch), 1e-6)


def test_native_path_is_taken_where_the_headers_are(exported):
    model, path = exported
    if ort_build.find_headers() is None:
        with pytest.raises(KernelBuildError, match="headers"):
            ort_build.library_path()
        with pytest.warns(S.OrtFallbackWarning, match="native: KernelBuildError.*headers"):
            sess = S.ort_session(path)
        assert sess.l1fx_path != "native"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.OrtFallbackWarning)  # the fastest path: no warning
        sess = S.ort_session(path, paths=("native",), intra_op_num_threads=1)
    assert sess.l1fx_path == "native"
    _check(_run(sess, _inputs(4)), model, _inputs(4), 1e-6)


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


def test_file_and_options_are_left_alone(exported):
    _, path = exported
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = _quiet_session(path, sess_options=opts)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sess.get_session_options().intra_op_num_threads == 1
    with pytest.raises(Exception):  # the caller's options got no l1fx config entry
        opts.get_session_config_entry(S.SPIN_KEY)
    if sess.l1fx_path != "portable":
        got = sess.get_session_options()
        assert got.get_session_config_entry(S.SPIN_KEY) == "0"
        assert got.get_session_config_entry(S.THREADS_KEY) == "1"  # the kernels follow intra_op_num_threads


def test_asymmetric_pads_fall_back_to_the_function_body(exported, tmp_path):
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
