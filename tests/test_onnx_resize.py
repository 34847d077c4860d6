"""Integer-factor nearest Resize exported as Unsqueeze + Expand + Reshape (l1fx/onnx_resize.py)."""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from l1fx.convert import convert  # noqa: E402
from l1fx.export import export_onnx  # noqa: E402
from l1fx.onnx_resize import nearest_upsample_as_expand  # noqa: E402


def _resize_model(rank: int, scales, mode="nearest", coord="asymmetric", nearest="floor", opset=20):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"] + [None] * (rank - 1))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"] + [None] * (rank - 1))
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode, coordinate_transformation_mode=coord,
                            nearest_mode=nearest)
    graph = helper.make_graph([node], "g", [x], [y],
                              [numpy_helper.from_array(np.asarray(scales, dtype=np.float32), "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("scales,shape", [
    ([1, 1, 2], (2, 3, 5)), ([1, 1, 3, 1], (1, 2, 4, 3)), ([1, 1, 2, 2, 2], (3, 4, 3, 2, 5)),
    ([1, 1, 1, 3, 2], (2, 1, 2, 3, 1)), ([1, 1, 1, 1, 1], (1, 2, 2, 2, 2))])
def test_rewrite_gives_exactly_what_resize_gives(scales, shape):
    model = _resize_model(len(shape), scales)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert nearest_upsample_as_expand(rewritten, 20) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Unsqueeze", "Expand", "Shape", "Mul", "Reshape"]
    assert "scales" not in {t.name for t in rewritten.graph.initializer}  # nothing reads it any more
    onnx.checker.check_model(rewritten, full_check=True)
    rng = np.random.default_rng(0)
    for batch in (shape[0], shape[0] + 2):  # the batch stays dynamic
        x = (rng.standard_normal((batch,) + shape[1:]) * 1e6).astype(np.float32)
        x.flat[0], x.flat[-1] = np.nan, -np.inf
        want = _run(model, x)
        got = _run(rewritten, x)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        idx = np.ix_(*[np.arange(n * int(s)) // int(s) for n, s in zip(x.shape, scales)])
        np.testing.assert_array_equal(got, x[idx])


@pytest.mark.parametrize("kwargs", [
    dict(scales=[1, 1, 1.5, 2]), dict(scales=[1, 2, 2, 2]), dict(scales=[2, 1, 2, 2]), dict(scales=[1, 1, 0.5, 1]),
    dict(scales=[1, 1, 2, 2], mode="linear"), dict(scales=[1, 1, 2, 2], coord="half_pixel"),
    dict(scales=[1, 1, 2, 2], nearest="round_prefer_floor"), dict(scales=[1, 1, 2, 2], opset=11)])
def test_other_resizes_are_left_alone(kwargs):
    model = _resize_model(4, **kwargs)
    before = model.SerializeToString()
    assert nearest_upsample_as_expand(model, kwargs.get("opset", 20)) == 0
    assert model.SerializeToString() == before


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(2, 4, 3, stride=2, padding=1)
        self.b = nn.Conv3d(6, 3, 1)

    def forward(self, x):
        up = F.interpolate(torch.relu(self.a(x)), scale_factor=2.0, mode="nearest")
        return self.b(torch.cat([x, up], 1))


@pytest.mark.parametrize("ratio", [None, 1.0])
def test_exported_model_has_no_resize_and_matches_pytorch(ratio, tmp_path):
    torch.manual_seed(0)
    model = Upsampling().eval()
    x = torch.randn(2, 2, 6, 4, 8) * 100 + 1e3
    if ratio is not None:
        model = convert(model, ratio=ratio, example_inputs=(x,)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, (x,), path)  # verifies against PyTorch at two batch sizes
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "Resize" not in ops and "Expand" in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 2, 6, 4, 8) * 100 + 1e3
    with torch.no_grad():
        want = model(x3).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
