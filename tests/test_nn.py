"""l1fx.nn modules: drop-in interface, state_dict compatibility, tracing and compilation."""
import copy
import io

import pytest
import torch
from torch import nn

import l1fx
import l1fx.functional as L1F
from l1fx.nn import DENSE_TO_L1, L1Conv1d, L1Conv2d, L1Conv3d, L1Linear

from brute import l1_conv_brute, l1_linear_brute

DENSE = [
    nn.Linear(6, 4),
    nn.Linear(6, 4, bias=False),
    nn.Conv1d(4, 8, 1),
    nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=2),
    nn.Conv3d(2, 4, 3, padding=1, dilation=1, bias=False),
    nn.Conv3d(4, 4, (1, 3, 3), stride=2, padding="valid", groups=4),
]


@pytest.mark.parametrize("dense", DENSE, ids=lambda m: repr(m))
def test_state_dict_loads_strict_both_ways(dense):
    l1cls = DENSE_TO_L1[type(dense)]
    kwargs = {k: getattr(dense, k) for k in ("stride", "padding", "dilation", "groups") if hasattr(dense, k)}
    if isinstance(dense, nn.Linear):
        fresh = l1cls(dense.in_features, dense.out_features, bias=dense.bias is not None)
    else:
        fresh = l1cls(dense.in_channels, dense.out_channels, dense.kernel_size, bias=dense.bias is not None, **kwargs)
    fresh.load_state_dict(dense.state_dict(), strict=True)
    dense.load_state_dict(fresh.state_dict(), strict=True)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in dense.state_dict().items()}


@pytest.mark.parametrize("dense", DENSE, ids=lambda m: repr(m))
def test_from_dense_copies_and_matches_functional(dense):
    dense = dense.double()
    m = DENSE_TO_L1[type(dense)].from_dense(dense)
    assert m.mgs_mix == 1.0
    assert m.weight is not dense.weight and torch.equal(m.weight, dense.weight)
    assert m.weight.dtype == torch.float64
    if isinstance(dense, nn.Linear):
        x = torch.randn(3, 5, dense.in_features, dtype=torch.float64)
        torch.testing.assert_close(m(x), l1_linear_brute(x, dense.weight, dense.bias))
    else:
        nd = dense.weight.dim() - 2
        x = torch.randn(2, dense.in_channels, *([7] * nd), dtype=torch.float64)
        pad = dense.padding if not isinstance(dense.padding, str) else [0] * nd
        ref = l1_conv_brute(x, dense.weight, dense.bias, list(dense.stride), list(pad), list(dense.dilation), dense.groups)
        torch.testing.assert_close(m(x), ref)
    # Same repr as the dense layer, with the l1 class name.
    assert repr(m) == repr(dense).replace(type(dense).__name__, type(m).__name__, 1)


def test_padding_modes_match_explicit_pad():
    for mode in ("circular", "reflect", "replicate"):
        m = L1Conv2d(2, 3, 3, padding=1, padding_mode=mode).double()
        x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
        xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode=mode)
        torch.testing.assert_close(m(x), l1_conv_brute(xp, m.weight, m.bias, [1, 1], [0, 0], [1, 1], 1))


def test_same_padding_even_kernel_module():
    m = L1Conv3d(2, 2, (2, 3, 4), padding="same").double()
    x = torch.randn(1, 2, 5, 5, 5, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, L1F.l1_conv3d(x, m.weight, m.bias, padding="same"))


def test_mgs_mix_reaches_the_op():
    m = L1Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    m.mgs_mix = 0.0
    m(x).sum().backward()
    g0 = m.weight.grad.clone()
    d = x.detach()[:, None] - m.weight.detach()[None]
    torch.testing.assert_close(g0, d.sign().sum(0))


def test_module_error_names_layer():
    m = L1Conv1d(3, 4, 1)
    m.l1fx_name = "sa1.mlp.0"
    with pytest.raises(ValueError, match=r"sa1\.mlp\.0.*4 channels.*expects 3"):
        m(torch.randn(2, 4, 10))
    with pytest.raises(TypeError, match="expects Conv1d"):
        L1Conv1d.from_dense(nn.Conv2d(1, 1, 1))


def test_pickle_and_deepcopy():
    m = nn.Sequential(L1Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU(), L1Linear(8, 2))
    m.eval()
    m[0].mgs_mix = 0.25
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    m3 = copy.deepcopy(m)
    x = torch.randn(2, 3, 5)
    f = lambda mod, x: mod[3](mod[:3](x).mean(-1))  # noqa: E731
    torch.testing.assert_close(f(m2, x), f(m, x))
    torch.testing.assert_close(f(m3, x), f(m, x))
    assert m2[0].mgs_mix == 0.25 and m3[0].mgs_mix == 0.25


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = L1Conv1d(3, 8, 1)
        self.fc = L1Linear(8, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = torch.relu(self.conv(x)).amax(-1)
        return L1F.l1_linear(self.fc(h), self.w, mix=0.5)


def test_symbolic_trace_keeps_the_custom_ops():
    net = _Net()
    gm = torch.fx.symbolic_trace(net)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.l1fx.conv.default in targets or torch.ops.l1fx.conv in targets
    assert sum(1 for t in targets if "l1fx" in str(t) and "linear" in str(t)) == 2
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(gm(x), net(x))


def test_export_and_compile():
    net = _Net()
    x = torch.randn(2, 3, 10)
    ep = torch.export.export(net, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "l1fx.conv.default" in ops and "l1fx.linear.default" in ops
    torch.testing.assert_close(ep.module()(x), net(x))
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    xg = x.clone().requires_grad_()
    y = compiled(xg)
    y.sum().backward()
    torch.testing.assert_close(y, net(x))
    assert xg.grad is not None and net.conv.weight.grad is not None


def test_autocast_bfloat16():
    net = nn.Sequential(nn.Linear(5, 6), L1Linear(6, 3))
    x = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.dtype == torch.float32


def test_public_reexports():
    assert l1fx.L1Conv3d is L1Conv3d and l1fx.nn.L1Linear is L1Linear
