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
from l1fx import onnx_ops, onnx_pointops  # noqa: E402
from l1fx.convert import convert  # noqa: E402
from l1fx.onnx_export import _float64_reference  # noqa: E402
from l1fx.errors import ExportError, UsageError, VerificationError  # noqa: E402
from l1fx.export import (ConstantOutputWarning, NondeterministicModelError, OnnxExportError,  # noqa: E402
                         OnnxInputError, OnnxPathError, OnnxVerificationError, compare_outputs, export_onnx, main)

# A model whose outputs do not depend on its inputs verifies nothing; the tests' models must not be one.
pytestmark = pytest.mark.filterwarnings("error::l1fx.export.ConstantOutputWarning")

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
    want64 = None
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.isfinite(g).all()
        if _rel_err(g, w) > RTOL:  # the tolerance model of export_onnx: float32 may be ill-conditioned here
            # (the FPS helpers replaced as export_onnx does: the zoo's FPS hard-codes float32 buffers)
            want64 = want64 or _float64_reference(onnx_pointops.substitute(model, inputs).model)(inputs)
            assert want64 is not None, f"relative error {_rel_err(g, w):.2e} and no float64 reference"
            own = _rel_err(w.double().numpy(), want64[i])
            assert _rel_err(g, want64[i]) <= max(RTOL, 4 * own)


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantOutputWarning)
        result = export_onnx(model, x, path)
    assert result.verified_batches == (2, 3) and result.max_rel_error <= max(RTOL, result.tolerance)
    # The input-dependence check ran (with convert's default init="auto" every zoo model now depends on its
    # input; a constant one is covered by test_input_independent_model_says_verification_proved_nothing).
    assert result.input_dependent is True
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


def _random_subsample(xyz, npoint):
    """Random sampling that is not farthest point sampling: nothing export_onnx can feed, so refused."""
    b, n = xyz.shape[0], xyz.shape[1]
    idx = torch.zeros(b, npoint, dtype=torch.long)
    for i in range(b):  # a Python loop over the batch keeps it one helper call
        idx[i] = torch.randperm(n)[:npoint]
    return idx


def test_zoo_random_sampling_model_is_refused_not_misverified(tmp_path, monkeypatch):
    import zoo

    # (PointNet++ with its torch.randint FPS start now exports: tests/test_export_pointnets.py)
    monkeypatch.setattr(zoo, "farthest_point_sample", _random_subsample)
    ctor, make_inputs = ZOO["pointnet2_ssg"]
    x = make_inputs(batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _calibrate(convert(_small("pointnet2_ssg", ctor), 1.0, example_inputs=x), make_inputs(batch=4))
    path = tmp_path / "p2.onnx"  # refused before the (slow) export, also unverified, naming the call
    for verify in (True, False):
        with pytest.raises(NondeterministicModelError, match=r"(?s)PointNet2ClsSSG is not deterministic.*largest "
                           r"difference.*torch.randperm in module 'l1fx_helpers.random_subsample'.*test_onnx.py:\d+"
                           r".*allow_nondeterministic=True") as info:
            export_onnx(model, x, path, verify=verify)
        assert len(info.value.random_calls) == 1
    assert os.listdir(tmp_path) == []


class Noisy(nn.Module):
    """Random in eval mode twice over: F.dropout's default training=True, and Tensor.uniform_."""

    def __init__(self):
        super().__init__()
        self.fc = L.L1Linear(4, 3)

    def forward(self, x):
        return nn.functional.dropout(self.fc(x)) + torch.rand_like(x[:, :3]) + x[:, :3].clone().uniform_()


def test_nondeterminism_is_named_in_eager_modules_and_fx_graphs(tmp_path):
    x = torch.randn(2, 4)
    eager = Noisy()
    graph = torch.fx.symbolic_trace(Noisy())
    for model in (eager, graph):
        state = torch.get_rng_state()
        with pytest.raises(NondeterministicModelError, match=r"(?s)not deterministic.*random calls in forward") as e:
            export_onnx(model, x, tmp_path / "n.onnx", verify=False)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream did not move
        calls = " ".join(e.value.random_calls)
        for name in ("torch.nn.functional.dropout", "torch.rand_like", "Tensor.uniform_"):
            assert name in calls, calls
        assert calls.count("test_onnx.py:") == 3  # the fx graph names the source line it was traced from
    assert os.listdir(tmp_path) == []
    # Asked for: exported (ONNX Random* ops), output shapes checked, values not claimed to be verified.
    class Jitter(nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)

    result = export_onnx(Jitter(), x, tmp_path / "n.onnx", allow_nondeterministic=True)
    assert result.deterministic is False and result.max_rel_error is None and result.verified_batches == (2, 3)
    assert "NOT verified" in result.summary()


def test_state_dependent_model_is_refused_without_a_random_call(tmp_path):
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.calls = L.L1Linear(4, 3), 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x) * self.calls

    with pytest.raises(NondeterministicModelError, match="no random torch call was seen"):
        export_onnx(Counter(), torch.randn(2, 4), tmp_path / "c.onnx")


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

    def forward(self, x):  # no ReLU: it would cut every (negative) l1 output and make the output constant
        return self.d(self.c(self.b(self.a(x))))


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
    model = nn.Sequential(L.L1Linear(5, 7), nn.LeakyReLU(0.1), L.L1Linear(7, 3, bias=False)).eval()
    x = torch.randn(2, 5, 5)  # [batch, points, features]
    for chunk in (200, 0):
        path = tmp_path / f"lin{chunk}.onnx"
        export_onnx(model, x, path, chunk_bytes=chunk)
        scans = [n for f in onnx.load(str(path)).functions for n in f.node if n.op_type == "Scan"]
        assert bool(scans) == (chunk != 0)
        _ort_check(path, model, (torch.randn(3, 5, 5),))


def test_standard_ops_only(tmp_path):
    model = nn.Sequential(L.L1Conv1d(3, 8, 3, padding=1), nn.LeakyReLU(0.1), L.L1Conv1d(8, 4, 1)).eval()
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


def test_nonfinite_entries_must_match_in_place():
    want = [torch.tensor([1.0, float("inf"), float("nan"), -float("inf")])]
    compare_outputs([want[0].numpy().copy()], want, RTOL, batch=1, where="here")  # identical: fine
    for got, match in (([1.0, 5.0, float("nan"), -float("inf")], "PyTorch output 0 has 1 NaN/inf"),
                       ([1.0, -float("inf"), float("nan"), -float("inf")], "a different NaN/inf"),
                       ([1.0, float("inf"), float("inf"), -float("inf")], "a different NaN/inf"),
                       ([float("nan"), float("inf"), float("nan"), -float("inf")], "onnxruntime output 0 has 1")):
        with pytest.raises(OnnxVerificationError, match=match):
            compare_outputs([np.array(got, dtype=np.float32)], want, RTOL, batch=1, where="here")


def test_all_nonfinite_reference_is_refused(tmp_path):
    model = nn.Sequential(L.L1Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    with pytest.raises(OnnxVerificationError, match=r"every output of Sequential.*is NaN.*prove nothing") as e:
        export_onnx(model, torch.randn(2, 4), tmp_path / "nan.onnx")
    assert isinstance(e.value, VerificationError) and isinstance(e.value, ExportError)
    assert os.listdir(tmp_path) == []
    assert export_onnx(model, torch.randn(2, 4), tmp_path / "nan.onnx", verify=False).max_rel_error is None


def test_input_independent_model_says_verification_proved_nothing(tmp_path):
    model = nn.Sequential(L.L1Linear(4, 3), nn.ReLU()).eval()  # l1 outputs <= 0 with zero bias: always 0
    with torch.no_grad():
        model[0].bias.zero_()
    with pytest.warns(ConstantOutputWarning, match="same for two different inputs"):
        result = export_onnx(model, torch.randn(2, 4), tmp_path / "c.onnx")
    assert result.input_dependent is False
    assert "only shows that the exported constants are right" in result.summary()
    model[1] = nn.LeakyReLU(0.1)
    assert export_onnx(model, torch.randn(2, 4), tmp_path / "c.onnx").input_dependent is True


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
    with pytest.raises(OnnxInputError, match=r"example input 0 has shape \(0, 3, 5\), with a zero-size dim"):
        export_onnx(model, torch.randn(0, 3, 5), tmp_path / "a.onnx")
    assert os.listdir(tmp_path) == []
    assert model.training  # the user's mode is restored


def test_unreplaceable_output_is_one_clear_error(tmp_path, monkeypatch):
    model = nn.Sequential(L.L1Linear(4, 3), nn.LeakyReLU(0.1)).eval()
    os.mkfifo(tmp_path / "fifo")  # renaming over it would destroy it (as over /dev/null when root)
    with pytest.raises(OnnxPathError, match=r"fifo exists and is not a regular file"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "fifo")
    (tmp_path / "old.onnx").write_bytes(b"old")

    def denied(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(OnnxPathError, match=r"output .*old.onnx: cannot replace it \(Permission denied\)") as e:
        export_onnx(model, torch.randn(2, 4), tmp_path / "old.onnx")
    assert isinstance(e.value, UsageError)  # the CLI's exit 2: the user's path is wrong
    from l1fx import _atomicfile  # a read-only directory (root ignores chmod, so simulated): the temp file

    monkeypatch.setattr(_atomicfile, "open", lambda *a, **kw: denied(None, None), raising=False)  # cannot be made
    with pytest.raises(OnnxPathError, match=r"old.onnx: cannot create a file in .* \(Permission denied\)"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "old.onnx")
    assert sorted(os.listdir(tmp_path)) == ["fifo", "old.onnx"] and (tmp_path / "old.onnx").read_bytes() == b"old"


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
        act = torch.nn.functional.leaky_relu  # a ReLU would cut all l1 outputs: a constant model
        return self.fc(act(self.c2(act(self.c1(x)))).max(2)[0])
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

    assert main([f"{src}:Nett", "--input-shape", "2,3,16", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "has no attribute 'Nett'" in capsys.readouterr().err
    assert main([f"{src}:Net", "--input-shape", "2,4,16", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "Net rejects --input-shape (2, 4, 16)" in capsys.readouterr().err
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


# ---------------------------------------------------------------- a new layer kind exports from its own file
@torch.library.custom_op("l1fx_test_onnx::rowdist", mutates_args=())
def _rowdist(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mix: float) -> torch.Tensor:
    return torch.ops.l1fx.linear(x, weight, bias, mix)  # the math of a real new op would be its own


@_rowdist.register_fake
def _(x, weight, bias, mix):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _RowDist(nn.Module):
    """A layer of the test's own kind (stands for a plug-in's new l1 layer)."""

    def __init__(self, k, m):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(m, k))
        self.bias = nn.Parameter(torch.randn(m))

    def forward(self, x):
        return _rowdist(x, self.weight, self.bias, 1.0)


@pytest.fixture
def rowdist_kind(monkeypatch):
    """The kind, its ONNX op, translation and function body, all declared here: no l1fx file edited."""
    from onnx import helper

    from l1fx import layers

    spec = layers.register_layer(layers.LayerSpec(
        name="rowdist_test", module=_RowDist, l1_op="l1fx_test_onnx::rowdist",
        onnx=layers.OnnxSchema("L1TestRowDist", attributes=("strides", "group")), channel_dim=-1,
        features_attr="out_features"))

    def translate(l1, op):
        def rowdist(x, weight, bias, mix: float = 1.0):
            return l1.L1TestRowDist(x, weight, bias, strides=[1], group=1)

        return rowdist

    def body(opset):  # the real op's definition would go here; this one is L1Linear's
        node = helper.make_node("L1Linear", ["X", "W", "B"], ["Y"], domain=onnx_ops.DOMAIN)
        return helper.make_function(onnx_ops.DOMAIN, "L1TestRowDist", ["X", "W", "B"], ["Y"], [node],
                                    [helper.make_opsetid("", opset), helper.make_opsetid(onnx_ops.DOMAIN, 1)],
                                    attributes=["strides", "group"])

    monkeypatch.setitem(onnx_ops.TRANSLATIONS, "L1TestRowDist", translate)
    monkeypatch.setitem(onnx_ops.FUNCTION_BODIES, "L1TestRowDist", body)
    yield spec
    layers.unregister_layer("rowdist_test")


def test_a_new_kinds_onnx_op_is_generated_from_its_spec(rowdist_kind):
    schema = {s.name: s for s in onnx_ops._schemas()}["L1TestRowDist"]
    A = onnx.defs.OpSchema.AttrType
    assert (schema.domain, schema.since_version) == (onnx_ops.DOMAIN, 1)
    assert [i.name for i in schema.inputs] == ["X", "W", "B"] and [o.name for o in schema.outputs] == ["Y"]
    assert {n: a.type for n, a in schema.attributes.items()} == {"strides": A.INTS, "group": A.INT}
    assert [s.name for s in onnx_ops._schemas()][:2] == [onnx_ops.LINEAR, onnx_ops.CONV]  # built-ins unchanged
    assert torch.ops.l1fx_test_onnx.rowdist.default in onnx_ops.translation_table()
    assert onnx.defs.get_schema("L1TestRowDist", 1, onnx_ops.DOMAIN).name == "L1TestRowDist"  # registered
    names = [f.name for f in onnx_ops.functions(18, None)]  # built-ins (and other registered kinds) first
    assert names[:2] == ["L1Linear", "L1Conv"] and names[-2:] == ["L1TestRowDist", "L1Distance"]


def test_a_new_kind_exports_and_verifies(rowdist_kind, tmp_path):
    model = nn.Sequential(_RowDist(4, 3), nn.LeakyReLU(0.1), L.L1Linear(3, 2)).eval()
    result = export_onnx(model, torch.randn(2, 4), tmp_path / "r.onnx")
    assert result.l1_nodes == {"L1TestRowDist": 1, "L1Linear": 1} and result.max_rel_error <= 1e-6
    assert result.verified_batches == (2, 3)
    std = export_onnx(model, torch.randn(2, 4), tmp_path / "s.onnx", custom_op=False)
    assert std.max_rel_error <= 1e-6 and not onnx.load(str(tmp_path / "s.onnx")).functions


def test_conflicting_onnx_declarations_are_refused(monkeypatch):
    from l1fx import layers

    layers.register_layer(layers.LayerSpec(name="conflict_test", module=_RowDist,
                                           onnx=layers.OnnxSchema(onnx_ops.CONV, attributes=("group",))))
    try:
        with pytest.raises(ValueError, match=r"kinds 'conv1d' and 'conflict_test' declare the ONNX op l1fx.L1Conv"):
            onnx_ops._schemas()
        layers.register_layer(layers.LayerSpec(name="conflict_test", module=_RowDist,
                                               onnx=layers.OnnxSchema("L1TestOdd", attributes=("alpha",))),
                              replace=True)
        with pytest.raises(ValueError, match=r"l1fx.L1TestOdd has attribute 'alpha', which ONNX Conv/ConvTranspose"):
            onnx_ops._schemas()
    finally:
        layers.unregister_layer("conflict_test")


def test_library_and_command_line_are_apart():
    import l1fx
    import l1fx.export as cli
    import l1fx.onnx_export as lib

    assert cli.export_onnx is lib.export_onnx is l1fx.export_onnx
    for name in ("ExportResult", "OnnxExportError", "OnnxVerificationError", "NondeterministicModelError",
                 "OnnxInputError", "OnnxPathError", "ConstantOutputWarning"):
        assert getattr(cli, name) is getattr(lib, name)
    assert hasattr(cli, "main") and hasattr(cli, "_load_checkpoint")
    assert not hasattr(lib, "main") and not hasattr(lib, "_load_checkpoint") and not hasattr(lib, "argparse")
