"""torch.ops.l1fx.* pick their backend per op (l1fx/ops.py): linear by op="linear", conv by conv_kernels."""
import pytest
import torch

import l1fx.functional as L1F
from l1fx import kernels
from l1fx.kernels import Backend, reference, register_backend

from brute import l1_conv_brute, l1_linear_brute


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the backend registry, restored after the test."""
    monkeypatch.setattr(kernels, "_REGISTRY", dict(kernels._REGISTRY))
    monkeypatch.delenv("L1FX_BACKEND", raising=False)
    return kernels._REGISTRY


def _recording(name, calls, **kw):
    def fwd(x, w, b):
        calls.append(("forward", tuple(x.shape)))
        return reference.linear_forward(x, w, b)

    def bwd(g, x, w, mix, need_x, need_w):
        calls.append(("backward", tuple(x.shape)))
        return reference.linear_backward(g, x, w, mix, need_x, need_w)

    return Backend(name, fwd, bwd, **kw)


def _conv_forward_backward():
    x = (torch.randn(2, 4, 9, dtype=torch.float64) * 1e3 + 5e5).requires_grad_()  # far from 0
    w = (torch.randn(6, 2, 3, dtype=torch.float64) * 1e3 + 5e5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64)
    y = L1F.l1_conv1d(x, w, b, stride=2, padding=1, groups=2)
    torch.testing.assert_close(y, l1_conv_brute(x.detach(), w.detach(), b, [2], [1], [1], 2))
    y.sum().backward()
    assert x.grad is not None and w.grad is not None and torch.isfinite(x.grad).all()


def test_linear_only_backend_runs_linear_and_leaves_conv_to_the_next(registry):
    calls = []
    register_backend(_recording("mine", calls, ops=("linear",), priority=100))
    _conv_forward_backward()
    assert calls == []  # conv went to the next backend (before: to "mine", through the lowering)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, dtype=torch.float64)
    y = L1F.l1_linear(x, w)
    torch.testing.assert_close(y, l1_linear_brute(x.detach(), w))
    y.sum().backward()
    assert calls == [("forward", (3, 4)), ("backward", (3, 4))]


def test_backend_with_only_linear_kernels_gets_conv_through_the_lowering(registry, monkeypatch):
    """Default ops (both) without conv_forward/conv_backward: conv runs on its linear core, both directions."""
    calls = []
    register_backend(_recording("mine", calls))
    monkeypatch.setenv("L1FX_BACKEND", "mine")
    _conv_forward_backward()
    assert {kind for kind, _ in calls} == {"forward", "backward"}
    assert all(shape[1] == 2 * 3 for _, shape in calls)  # im2col rows: C/groups * kernel


def test_own_conv_kernels_are_used_for_both_directions(registry, monkeypatch):
    seen = []

    def conv_forward(*a):
        seen.append("forward")
        return kernels.conv.conv_forward(reference.BACKEND, *a)

    def conv_backward(*a):
        seen.append("backward")
        return kernels.conv.conv_backward(reference.BACKEND, *a)

    register_backend(Backend("mine", reference.linear_forward, reference.linear_backward,
                             conv_forward=conv_forward, conv_backward=conv_backward))
    monkeypatch.setenv("L1FX_BACKEND", "mine")
    _conv_forward_backward()
    assert seen == ["forward", "backward"]
