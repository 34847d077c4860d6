"""The native path's fused l1 conv: the C kernel against float64 and the graph rewrite against PyTorch.

``l1fx_conv_forward_fused`` (kernels/csrc/l1_cpu.cpp) is what onnxruntime's ``l1fx.L1FusedConv`` runs;
``l1fx.ort_fuse`` writes those nodes into the native session's copy of an exported graph.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l1fx import nn as L
from l1fx import ort_fuse
from l1fx import ort_runtime as S
from l1fx.errors import KernelError
from l1fx.export import export_onnx
from l1fx.kernels import cpu, ort_build

from brute import l1_conv_brute

EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- the kernel
def _case(gen, shape, offset, spread):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * spread + offset).float()


def _exact(xs, w, col, scale, shift, relu, stride, padding, dilation, groups):
    """float64 value of the fused formula over the float32 operands, and the scale of its rounding error."""
    x = torch.cat(xs, 1).double()
    w64 = w.double()
    acc = -l1_conv_brute(x, w64, None, stride, padding, dilation, groups)            # sum |x - w| >= 0
    shape = (x.shape[0], w.shape[0]) + (1,) * (acc.dim() - 2)
    c = col.double().reshape(shape if col.dim() == 2 else (1, -1) + (1,) * (acc.dim() - 2))
    v = c - acc
    mag = c.abs() + acc
    if scale is not None:
        s = scale.double().reshape((1, -1) + (1,) * (acc.dim() - 2))
        t = shift.double().reshape(s.shape)
        v, mag = v * s + t, mag * s.abs() + t.abs()
    return (torch.relu(v) if relu else v), mag


def _check_fused(xs, w, col, scale, shift, relu, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    got = cpu.conv_forward_fused(xs, w, col, scale, shift, relu, stride, padding, dilation, groups).double()
    exact, mag = _exact(xs, w, col, scale, shift, relu, stride, padding, dilation, groups)
    k = w[0].numel()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(got), torch.isnan(exact))
    assert torch.equal(got[~finite & ~torch.isnan(exact)], exact[~finite & ~torch.isnan(exact)])
    err = (got - exact).abs()[finite]
    bound = (k + 8) * EPS * mag[finite]
    assert (err <= bound).all(), f"max err / bound {float((err / bound.clamp_min(1e-300)).max()):.2f}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (1e4, 3.0), (-1e6, 1e6)])
def test_pointwise_fused_is_exact_far_from_zero(threads, offset, spread):
    """Several inputs read as one, per-sample offsets, a folded norm with negative scales, the ReLU."""
    gen = torch.Generator().manual_seed(int(abs(offset)) + threads)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for S_, M, chans in ((37, 7, (3, 5, 4)), (130, 13, (16,)), (81, 6, (1, 2))):
            xs = [_case(gen, (2, c, S_), offset, spread) for c in chans]
            w = _case(gen, (M, sum(chans), 1), offset, spread)
            scale = torch.randn(M, generator=gen) * 3
            shift = torch.randn(M, generator=gen) * 1e3
            for col in (torch.randn(M, generator=gen), torch.randn(2, M, generator=gen) * 1e5):
                for affine in (True, False):
                    for relu in (True, False):
                        _check_fused(xs, w, col, scale if affine else None, shift if affine else None, relu)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (1e6, 1e3)])
def test_other_geometries_fused_are_exact(offset, spread):
    """k3 convs (row-tile and packed kernels, then the epilogue over their output) and a 3-D pointwise one."""
    gen = torch.Generator().manual_seed(7)
    M = 5
    scale, shift = torch.randn(M, generator=gen), torch.randn(M, generator=gen)
    for shape, k, stride, pad in (((2, 3, 6, 7, 5), 3, 1, 1), ((2, 4, 7, 6, 6), 3, 2, 0), ((2, 3, 4, 5, 3), 1, 1, 0)):
        x = _case(gen, shape, offset, spread)
        w = _case(gen, (M, shape[1], k, k, k), offset, spread)
        for col in (torch.randn(M, generator=gen), torch.randn(2, M, generator=gen)):
            _check_fused([x], w, col, scale, shift, True, (stride,) * 3, (pad,) * 3, (1,) * 3)


def test_fused_propagates_nan_and_inf_like_the_formula():
    gen = torch.Generator().manual_seed(3)
    x = _case(gen, (2, 6, 40), 0.0, 1.0)
    x[0, 2, 5] = float("nan")
    x[1, 4, 17] = float("inf")
    x[1, 0, 33] = -float("inf")
    w = _case(gen, (4, 6, 1), 0.0, 1.0)
    scale = torch.tensor([1.5, -2.0, 0.0, 0.5])  # a zero scale makes 0 * inf = NaN
    shift = torch.zeros(4)
    for relu in (True, False):
        _check_fused([x[:, :2], x[:, 2:]], w, torch.zeros(4), scale, shift, relu)
    x3 = _case(gen, (1, 2, 5, 5, 5), 0.0, 1.0)
    x3[0, 1, 2, 2, 2] = float("nan")
    _check_fused([x3], _case(gen, (4, 2, 3, 3, 3), 0.0, 1.0), torch.zeros(4), scale, shift, True,
                 (1,) * 3, (1,) * 3, (1,) * 3)


def test_several_inputs_need_a_pointwise_geometry():
    x = torch.randn(1, 2, 6, 6, 6)
    with pytest.raises(KernelError, match="l1fx_conv_forward_fused"):
        cpu.conv_forward_fused([x, x], torch.randn(3, 4, 3, 3, 3), torch.zeros(3), None, None, False,
                               (1,) * 3, (1,) * 3, (1,) * 3, 1)


# ---------------------------------------------------------------- the rewrite, through onnxruntime
class PartSegLike(nn.Module):
    """PointNet part segmentation in small: shared MLPs with norms, the global feature and the one-hot class
    repeated for every point and concatenated, a head, a classifier with no norm after it."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = L.L1Conv1d(3, 8, 1), nn.BatchNorm1d(8)
        self.c2, self.n2 = L.L1Conv1d(8, 16, 1), nn.BatchNorm1d(16)
        self.head, self.nh = L.L1Conv1d(8 + 16 + 16 + 4, 12, 1), nn.BatchNorm1d(12)
        self.out = L.L1Conv1d(12, 5, 1)

    def forward(self, x, onehot):
        a = F.relu(self.n1(self.c1(x)))
        b = F.relu(self.n2(self.c2(a)))
        n = x.shape[2]
        g = b.max(2, keepdim=True)[0]
        cat = torch.cat([a, b, g.expand(-1, -1, n), onehot.unsqueeze(2).expand(-1, -1, n)], 1)
        return self.out(F.relu(self.nh(self.head(cat))))


class VoxelLike(nn.Module):
    """3x3x3 l1 convs with norms (the epilogue after the row/packed kernels); one conv's output is read twice."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = L.L1Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.c2, self.n2 = L.L1Conv3d(4, 6, 3, stride=2), nn.BatchNorm3d(6)

    def forward(self, v):
        a = F.relu(self.n1(self.c1(v)))
        c = self.c2(a)
        return F.relu(self.n2(c)), c  # the conv's output is also a graph output: its norm is not folded


def _randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 5 - 20)
                m.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def _partseg_inputs(batch, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(batch, 3, 50, generator=g) + offset
    onehot = F.one_hot(torch.randint(0, 4, (batch,), generator=g), 4).float()
    return pts, onehot


@pytest.fixture(scope="module")
def native_lib():
    if ort_build.find_headers() is None:
        pytest.skip("no onnxruntime headers here: the native path (and its fusion) does not run")
    return ort_build.library_path()


@pytest.fixture(scope="module")
def partseg_file(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(PartSegLike())
    path = tmp_path_factory.mktemp("fuse") / "partseg.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, _partseg_inputs(2, 0), path)
    return model, path


def _run(sess, inputs):
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, [t.numpy() for t in inputs])))


def _close(got, ref, rtol):
    ref = ref.detach().double().numpy()
    assert got.shape == ref.shape
    assert np.abs(got.astype(np.float64) - ref).max() <= rtol * np.abs(ref).max()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_fused_partseg_session_matches_pytorch(native_lib, partseg_file, batch, offset):
    model, path = partseg_file
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sess = S.ort_session(path, paths=("native",), intra_op_num_threads=2)
    plain = S.ort_session(path, paths=("native",), intra_op_num_threads=2, fuse=False)
    assert sess.l1fx_fused == ort_fuse.FuseReport(norms=3, relus=3, concats=1, constant_channels=1)
    assert plain.l1fx_fused is None
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the file is never changed
    inputs = _partseg_inputs(batch, 10 + batch, offset)
    with torch.no_grad():
        ref = model.double()(*(t.double() for t in inputs))
        model.float()
    (fused,), (unfused,) = _run(sess, inputs), _run(plain, inputs)
    _close(unfused, ref, 1e-5)
    _close(fused, ref, 1e-5)


def test_rewritten_graph_has_no_norm_relu_or_concat_left(partseg_file):
    _, path = partseg_file
    fused, report = ort_fuse.fuse(onnx.load(str(path)))
    ops = [n.op_type for n in fused.graph.node]
    assert report.norms == 3 and "BatchNormalization" not in ops and "Relu" not in ops
    assert ops.count("L1FusedConv") == 3 and ops.count("L1Linear") == 1  # the constant channels, once per sample
    assert ops.count("L1Conv") == 1  # the classifier, with nothing to fuse, stays as it was
    assert "Expand" not in ops  # nothing is repeated for every point any more
    original = onnx.load(str(path))
    assert [n.op_type for n in original.graph.node].count("BatchNormalization") == 3  # the input is not changed
    # Without the exporter's intermediate shapes (onnx's inference does not see through the l1 nodes'
    # function bodies) the channel split has no proof and is not done; the rest still is.
    del original.graph.value_info[:]
    assert ort_fuse.fuse(original)[1] == dataclasses.replace(report, constant_channels=0)


def test_norms_read_elsewhere_are_not_folded(native_lib, tmp_path):
    torch.manual_seed(1)
    model = _randomise(VoxelLike())
    v = torch.randn(2, 2, 7, 6, 5) * 10 + 1e3
    path = tmp_path / "voxel.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, (v,), path)
    sess = S.ort_session(path, paths=("native",), intra_op_num_threads=2)
    assert sess.l1fx_fused == ort_fuse.FuseReport(norms=1, relus=1)  # the first layer only
    with torch.no_grad():
        refs = model.double()(v.double())
    for got, ref in zip(_run(sess, (v,)), refs):
        _close(got, ref, 1e-5)


def test_a_failing_rewrite_warns_and_runs_the_file(native_lib, partseg_file, monkeypatch):
    model, path = partseg_file

    def broken(_model):
        raise ValueError("a rewrite bug")

    monkeypatch.setattr(ort_fuse, "fuse", broken)
    with pytest.warns(S.OrtFallbackWarning, match="without fusing.*a rewrite bug"):
        sess = S.ort_session(path, paths=("native",), intra_op_num_threads=1)
    assert sess.l1fx_path == "native" and sess.l1fx_fused is None
    inputs = _partseg_inputs(2, 4)
    with torch.no_grad():
        _close(_run(sess, inputs)[0], model(*inputs), 1e-5)
