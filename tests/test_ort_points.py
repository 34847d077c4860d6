"""l1fx.points.FarthestPointSample in the native custom-op library (kernels/csrc/ort_ops.cpp) against
l1fx.onnx_pointops.fps_reference and the file's own function body (plain onnxruntime)."""
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from l1fx import onnx_pointops
from l1fx.kernels import ort_build
from l1fx.ort_runtime import OrtFallbackWarning, ort_session

pytestmark = pytest.mark.slow  # builds the custom-op library (shared with test_ort_session's fixture)

OPSET = 20


@pytest.fixture(scope="module")
def native():
    if ort_build.find_headers() is None:
        pytest.skip("no onnxruntime headers here")
    ort_build.library_path()


def _fps_model(npoint: int):
    node = helper.make_node(onnx_pointops.FPS, ["xyz", "start"], ["idx"], domain=onnx_pointops.DOMAIN, npoint=npoint)
    graph = helper.make_graph(
        [node], "fps", [helper.make_tensor_value_info("xyz", TensorProto.FLOAT, ["b", "n", "c"]),
                        helper.make_tensor_value_info("start", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["b", npoint])])
    return helper.make_model(graph, functions=[onnx_pointops.fps_function(OPSET)], opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid(onnx_pointops.DOMAIN, onnx_pointops.DOMAIN_VERSION)])


def _sessions(npoint: int, threads: int):
    model = _fps_model(npoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OrtFallbackWarning)  # the native path must be taken
        fast = ort_session(model, paths=("native",), intra_op_num_threads=threads)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return fast, plain


def _points(b, n, c, offset, spread, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, c, generator=g, dtype=torch.float64) * 2 - 1).mul(spread).add(offset).float()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("c", [2, 3, 4])
@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (1e3, 3.0), (-1e6, 1e6), (5e5, 1e-1)])
def test_native_fps_is_the_reference(native, threads, c, offset, spread):
    fast, plain = _sessions(npoint=24, threads=threads)
    for seed, (b, n) in enumerate([(3, 50), (1, 24), (5, 7)]):
        xyz = _points(b, n, c, offset, spread, seed)
        start = torch.randint(0, n, (b,), generator=torch.Generator().manual_seed(seed))
        want = onnx_pointops.fps_reference(xyz, start, 24).numpy()
        got = fast.run(None, {"xyz": xyz.numpy(), "start": start.numpy()})[0]
        np.testing.assert_array_equal(got, want)
        if n >= 24:  # the function body agrees where every step has a distinct farthest point
            np.testing.assert_array_equal(plain.run(None, {"xyz": xyz.numpy(), "start": start.numpy()})[0], want)


def test_ties_and_nan_follow_torch(native):
    fast, _ = _sessions(npoint=6, threads=2)
    xyz = torch.zeros(3, 8, 3)
    xyz[0, 3] = xyz[0, 5] = 1.0          # two points equally far: the first index
    xyz[1, 2, 1] = float("nan")          # NaN wins torch.argmax and stays in torch.minimum
    xyz[1, 6] = 9.0
    xyz[2, :, 0] = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1.0])  # duplicates everywhere
    start = torch.tensor([0, 0, 4])
    want = onnx_pointops.fps_reference(xyz, start, 6).numpy()
    got = fast.run(None, {"xyz": xyz.numpy(), "start": start.numpy()})[0]
    np.testing.assert_array_equal(got, want)


def test_bad_start_is_a_clear_error(native):
    fast, _ = _sessions(npoint=2, threads=1)
    with pytest.raises(Exception, match=r"FarthestPointSample.*START\[1\] = 9 is not a point index in \[0, 4\)"):
        fast.run(None, {"xyz": np.zeros((2, 4, 3), np.float32), "start": np.array([0, 9], np.int64)})
