"""ONNX export of int8 ℓ1 models: QuantizeLinear -> integer l1fx node -> DequantizeLinear, run in plain onnxruntime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import l1fx
from l1fx import onnx_int8
from l1fx.errors import ExportError


def _quantised_model():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2, groups=2),
                          nn.ReLU(), nn.Conv1d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 7, 5))
    model = l1fx.convert(dense)
    batches = [(torch.randn(8, 3, 16),) for _ in range(3)]
    for m in model.modules():  # calibrate the output norms (cumulative statistics) so the ReLUs cut not all
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    model.eval()
    return l1fx.quantize(model, batches)


def test_int8_export_round_trip_in_onnxruntime(tmp_path):
    q = _quantised_model()
    x = torch.randn(4, 3, 16)
    path = tmp_path / "q.onnx"
    result = l1fx.export_onnx(q, (x,), path)
    assert result.max_rel_error <= 1e-6 and result.input_dependent  # the float BatchNorms round differently
    assert result.l1_nodes == {onnx_int8.CONV: 3, onnx_int8.LINEAR: 1}
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 4
    assert {f.name for f in proto.functions} >= {onnx_int8.CONV, onnx_int8.LINEAR}


def test_int8_layers_exact_in_onnxruntime(tmp_path):
    # int8 layers only (no float norms): plain onnxruntime gives torch's bits, at another batch size too
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv1d(3, 8, 3, padding=2, dilation=2), nn.Conv1d(8, 4, 3, stride=2, groups=2),
                          nn.Flatten(), nn.Linear(4 * 7, 5))
    model = l1fx.convert(dense, normalize=None).eval()
    q = l1fx.quantize(model, [(torch.randn(8, 3, 16) * 3,)])
    path = tmp_path / "q.onnx"
    assert l1fx.export_onnx(q, (torch.randn(2, 3, 16),), path).max_rel_error == 0.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 3, 16) * 4  # saturates some codes
    got = session.run(None, {session.get_inputs()[0].name: x2.numpy()})[0]
    with torch.no_grad():
        want = q(x2).numpy()
    np.testing.assert_array_equal(got, want)


def test_int8_export_standard_ops_only(tmp_path):
    q = _quantised_model()
    result = l1fx.export_onnx(q, (torch.randn(2, 3, 16),), tmp_path / "s.onnx", custom_op=False)
    proto = onnx.load(str(tmp_path / "s.onnx"))
    assert result.max_rel_error <= 1e-6 and not proto.functions
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)


def test_fp32_export_carries_no_int8_functions(tmp_path):
    model = l1fx.convert(nn.Sequential(nn.Linear(4, 3))).eval()
    l1fx.export_onnx(model, (torch.randn(2, 4),), tmp_path / "f.onnx", verify=False)
    names = {f.name for f in onnx.load(str(tmp_path / "f.onnx")).functions}
    assert onnx_int8.LINEAR not in names and onnx_int8.CONV not in names


def test_int8_export_refuses_k_beyond_the_exact_bound(tmp_path):
    k = onnx_int8.EXACT_MAX_K + 1
    model = l1fx.convert(nn.Sequential(nn.Linear(k, 1)), normalize=None).eval()
    q = l1fx.quantize(model, [(torch.randn(1, k),)])
    with pytest.raises(ExportError, match="exact only up to K = 65793"):
        l1fx.export_onnx(q, (torch.randn(1, k),), tmp_path / "big.onnx")
    assert not (tmp_path / "big.onnx").exists()
