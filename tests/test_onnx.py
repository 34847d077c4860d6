"""ONNX export: l1fx custom-op nodes with function bodies, verification, errors, CLI, fast path."""
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from zoo import ZOO  # noqa: E402

from l1fx import nn as L  # noqa: E402
from l1fx import onnx_ops  # noqa: E402
from l1fx.convert import convert  # noqa: E402
from l1fx.export import OnnxExportError, OnnxVerificationError, export_onnx, main  # noqa: E402

RTOL = 1e-4
EXPORTABLE = [n for n in ZOO if n != "shape_dependent"]


def _rel_err(got, want) -> float:
    want = want.detach().numpy()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _ort_check(path, model, inputs):
    """Independent of export_onnx's own verify: checker, then onnxruntime vs PyTorch."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = [t for t in torch.utils._pytree.tree_leaves(model.eval()(*inputs)) if isinstance(t, torch.Tensor)]
    assert len(got) == len(want)
    assert want[0].std() > 0, "a test model whose output is constant tests nothing"
    for g, w in zip(got, want):
        assert np.isfinite(g).all()
        assert _rel_err(g, w) <= RTOL


def _l1_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.domain == onnx_ops.DOMAIN]


def _calibrate(model, x):
    """Batch-norm statistics from one batch, as after training: with the initial ones, the negative
    l1 outputs are all cut by the next ReLU and the network's output would not depend on its input."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(*x)
    return model.eval()


def _small(name, ctor):
    model = ctor()
    if name == "pointnet2_ssg":
        # Fewer sampled centroids and neighbours: the exporter unrolls the farthest-point-sampling
        # loop, each iteration costing export time; the code path is the same.
        model.sa1.npoint, model.sa2.npoint = 4, 2
        model.sa1.nsample = model.sa2.nsample = 4
    return model


@pytest.fixture
def deterministic_fps(monkeypatch):
    """PointNet++'s farthest point sampling starts at a random point (torch.randint), so two PyTorch runs
    differ and no runtime can match PyTorch. Start it at point 0, as the CUDA implementations do."""
    real = torch.randint

    def randint(*args, **kwargs):
        return torch.zeros(args[-1], dtype=kwargs.get("dtype", torch.long)) if len(args) == 3 else real(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", randint)


# ---------------------------------------------------------------- the zoo
@pytest.mark.parametrize("ratio", [1.0, 2 / 3], ids=["r1", "r2_3"])
@pytest.mark.parametrize("name", EXPORTABLE)
def test_zoo_exports_and_runs_at_another_batch(name, ratio, tmp_path, request):
    if name == "pointnet2_ssg":
        request.getfixturevalue("deterministic_fps")
    ctor, make_inputs = ZOO[name]
    x = make_inputs(batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _calibrate(convert(_small(name, ctor), ratio, example_inputs=x), make_inputs(batch=4))
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, x, path)
    assert result.verified_batches == (2, 3) and result.max_rel_error <= RTOL
    nodes = _l1_nodes(path)
    assert nodes, "converted layers must appear as l1fx nodes"
    assert sum(result.l1_nodes.values()) == len(nodes)
    _ort_check(path, model, make_inputs(batch=5))  # a batch size the export never saw


def test_zoo_data_dependent_model_gives_clear_error(tmp_path):
    ctor, make_inputs = ZOO["shape_dependent"]
    x = make_inputs(batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert(ctor(), 1.0, example_inputs=x)
    path = tmp_path / "sd.onnx"
    # `.item()` feeding an `if` in forward cannot become an ONNX graph, with or without a dynamic batch.
    for dynamic in (True, False):
        with pytest.raises(OnnxExportError, match=r"(?s)ShapeDependentNet.*data-dependent.*zoo.py:\d+.*what to do"):
            export_onnx(model, x, path, dynamic_batch=dynamic)
    assert os.listdir(tmp_path) == []


def test_zoo_random_sampling_model_is_refused_not_misverified(tmp_path):
    ctor, make_inputs = ZOO["pointnet2_ssg"]
    x = make_inputs(batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _calibrate(convert(ctor(), 1.0, example_inputs=x), make_inputs(batch=4))
    path = tmp_path / "p2.onnx"  # refused before the (slow) export
    with pytest.raises(OnnxExportError, match=r"(?s)PointNet2ClsSSG is not deterministic.*largest difference.*"
                                              r"torch.randint.*verify=False"):
        export_onnx(model, x, path)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- conv attributes and bodies
class ConvStack(nn.Module):
    """Every conv option the L1Conv body must honour, in 1d, 2d or 3d."""

    def __init__(self, nd):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        self.a = L.DENSE_TO_L1[conv].from_dense(conv(4, 6, 3, stride=2, padding=1, bias=False))
        self.b = L.DENSE_TO_L1[conv].from_dense(conv(6, 6, 2, dilation=2, groups=3, padding=1))
        self.c = L.DENSE_TO_L1[conv].from_dense(conv(6, 4, 2, padding="same"))  # asymmetric 'same'
        self.d = L.DENSE_TO_L1[conv].from_dense(conv(4, 4, 3, padding=1, padding_mode="reflect"))

    def forward(self, x):
        return self.d(self.c(torch.relu(self.b(self.a(x)))))


@pytest.mark.parametrize("nd,size", [(1, (11,)), (2, (9, 7)), (3, (7, 6, 5))])
def test_conv_options_match_pytorch(nd, size, tmp_path):
    model = ConvStack(nd).eval()
    x = torch.randn(2, 4, *size)
    path = tmp_path / "conv.onnx"
    export_onnx(model, x, path)
    convs = [n for n in _l1_nodes(path) if n.op_type == onnx_ops.CONV]
    assert len(convs) == 4
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in convs[1].attribute}
    assert attrs == {"strides": [1] * nd, "pads": [1] * 2 * nd, "dilations": [2] * nd, "group": 3}
    _ort_check(path, model, (torch.randn(4, 4, *size),))


def test_linear_leading_dims_and_tiny_blocks(tmp_path):
    """Scan blocks of a few rows (last one partial) and the unchunked body give the same numbers."""
    model = nn.Sequential(L.L1Linear(5, 7), nn.ReLU(), L.L1Linear(7, 3, bias=False)).eval()
    x = torch.randn(2, 5, 5)  # [batch, points, features]
    for chunk in (200, 0):
        path = tmp_path / f"lin{chunk}.onnx"
        export_onnx(model, x, path, chunk_bytes=chunk)
        scans = [n for f in onnx.load(str(path)).functions for n in f.node if n.op_type == "Scan"]
        assert bool(scans) == (chunk != 0)
        _ort_check(path, model, (torch.randn(3, 5, 5),))


def test_standard_ops_only(tmp_path):
    model = nn.Sequential(L.L1Conv1d(3, 8, 3, padding=1), nn.ReLU(), L.L1Conv1d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10)
    path = tmp_path / "std.onnx"
    result = export_onnx(model, x, path, custom_op=False)
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not proto.functions and all(o.domain != onnx_ops.DOMAIN for o in proto.opset_import)
    assert result.l1_nodes == {}
    _ort_check(path, model, (torch.randn(4, 3, 10),))


# ---------------------------------------------------------------- verification
def _tampered_linear(scale):
    real = onnx_ops.linear_function

    def bad(opset):
        f = real(opset)
        out = [n for n in f.node if "Y" in n.output][0]
        out.output[0] = "Y_true"
        f.node.extend([
            onnx.helper.make_node("Constant", [], ["scale"], value_float=scale),
            onnx.helper.make_node("CastLike", ["scale", "Y_true"], ["scale_t"]),
            onnx.helper.make_node("Mul", ["Y_true", "scale_t"], ["Y"]),
        ])
        return f

    return bad


@pytest.mark.parametrize("scale,match", [(float("nan"), "NaN/inf"), (1.001, "largest difference")])
def test_verify_refuses_wrong_runtime_numbers(scale, match, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_ops, "linear_function", _tampered_linear(scale))
    model = nn.Sequential(L.L1Linear(4, 3)).eval()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous file")
    with pytest.raises(OnnxVerificationError, match=match) as info:
        export_onnx(model, torch.randn(2, 4), path)
    assert info.value.batch == 2 and info.value.output == 0
    if scale == scale:
        assert 1e-4 < info.value.max_rel_diff < 2e-3
    assert path.read_bytes() == b"previous file"  # untouched, and no temporary left over
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_batch_dependent_model_needs_static_batch(tmp_path):
    class BatchBug(nn.Module):
        """Correct at the example batch only: PyTorch sees the batch as a constant in the reshape."""

        def __init__(self):
            super().__init__()
            self.fc = L.L1Linear(4, 3)

        def forward(self, x):
            return self.fc(x).reshape(2, -1)

    with pytest.raises(OnnxExportError, match="batch"):
        export_onnx(BatchBug(), torch.randn(2, 4), tmp_path / "b.onnx")
    assert os.listdir(tmp_path) == []
    export_onnx(BatchBug(), torch.randn(2, 4), tmp_path / "b.onnx", dynamic_batch=False)
    assert os.listdir(tmp_path) == ["b.onnx"]


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(tmp_path):
    model = nn.Sequential(L.L1Conv1d(3, 4, 1)).train()
    x = torch.randn(2, 3, 5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_onnx(lambda t: t, x, tmp_path / "a.onnx")
    with pytest.raises(TypeError, match=r"example_inputs\[1\] is a int"):
        export_onnx(model, (x, 3), tmp_path / "a.onnx")
    with pytest.raises(OnnxExportError, match=r"(?s)Sequential.*l1_conv1d.*\(2, 5, 5\).*example_inputs"):
        export_onnx(model, torch.randn(2, 5, 5), tmp_path / "a.onnx")
    with pytest.raises(OnnxExportError, match="does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "a.onnx")
    with pytest.raises(OnnxExportError, match="is a directory"):
        export_onnx(model, x, tmp_path)
    assert os.listdir(tmp_path) == []
    assert model.training  # the user's mode is restored


@torch.library.custom_op("l1fx_test_onnx::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_unsupported_operator_is_named(tmp_path):
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = L.L1Linear(3, 3)

        def forward(self, x):
            return _mystery(self.fc(x))

    with pytest.raises(OnnxExportError, match=r"(?s)Mystery.*l1fx_test_onnx.mystery.*no ONNX translation"):
        export_onnx(Mystery(), torch.randn(2, 3), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- CLI
MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 1)
        self.c2 = nn.Conv1d(8, 16, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).max(2)[0])
"""


def test_cli_builds_converts_and_exports(tmp_path, capsys):
    src = tmp_path / "mynet.py"
    src.write_text(MODEL_FILE)
    out = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([f"{src}:Net", "--input-shape", "2,3,16", "-o", str(out), "--model-kwargs", '{"classes": 7}'])
    assert rc == 0, capsys.readouterr().err
    assert "verified in onnxruntime at batch sizes [2, 3]" in capsys.readouterr().out
    proto = onnx.load(str(out))
    assert sorted(n.op_type for n in proto.graph.node if n.domain == onnx_ops.DOMAIN) == ["L1Conv", "L1Conv", "L1Linear"]
    assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 7

    assert main([f"{src}:Nett", "--input-shape", "2,3,16", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "has no attribute 'Nett'" in capsys.readouterr().err
    assert main([f"{src}:Net", "--input-shape", "2,4,16", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "but got 4 channels" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_loads_dense_and_converted_checkpoints(tmp_path, capsys):
    import importlib.util

    src = tmp_path / "ckptnet.py"
    src.write_text(MODEL_FILE)
    spec = importlib.util.spec_from_file_location("ckptnet", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dense = mod.Net(classes=5)
    x = torch.randn(2, 3, 16)
    converted = convert(dense, example_inputs=(x,))
    assert any(".l1fx_norm." in k for k in converted.state_dict())  # keys a dense model does not have
    for name, state in (("dense.pt", dense.state_dict()), ("l1.pt", converted.state_dict())):
        torch.save(state, tmp_path / name)
        out = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main([f"{src}:Net", "--input-shape", "2,3,16", "-o", str(out), "--model-kwargs", '{"classes": 5}',
                       "--checkpoint", str(tmp_path / name)])
        assert rc == 0, capsys.readouterr().err
        # Readable like any file the user writes (mkstemp alone would leave it 0600).
        assert out.stat().st_mode & 0o044 == 0o044 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- fast runtime path
def test_fast_session_matches_function_bodies(tmp_path):
    pytest.importorskip("onnxruntime_extensions", reason="optional fast path (pip install onnxruntime-extensions)")
    from l1fx.ort_ops import fast_session

    model = nn.Sequential(L.L1Conv2d(3, 6, 3, stride=2, padding=1, groups=3), nn.Flatten(2),
                          L.L1Linear(16, 5, bias=False)).eval()
    path = tmp_path / "f.onnx"
    export_onnx(model, torch.randn(2, 3, 8, 8), path)
    x = torch.randn(3, 3, 8, 8)
    fast = fast_session(path)
    assert {n.domain for n in onnx.load(str(path)).graph.node} >= {onnx_ops.DOMAIN}  # file unchanged
    got = fast.run(None, {fast.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert _rel_err(got, model(x)) <= 1e-6
