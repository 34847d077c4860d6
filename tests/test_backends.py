"""Backend registry: L1FX_BACKEND selection and clear errors."""
import pytest
import torch

import l1fx.functional as L1F
from l1fx import kernels
from l1fx.kernels import Backend, BackendUnavailable, get_backend, reference


def test_reference_by_name(monkeypatch):
    monkeypatch.setenv("L1FX_BACKEND", "reference")
    assert get_backend(torch.randn(2, 2)).name == "reference"
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    torch.testing.assert_close(L1F.l1_linear(x, w), -(x[:, None] - w).abs().sum(-1))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("L1FX_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="L1FX_BACKEND='cuda-magic' is not a backend"):
        L1F.l1_linear(torch.randn(3, 4), torch.randn(2, 4))


def test_missing_backend_by_name_is_not_silently_replaced(monkeypatch):
    monkeypatch.setattr(kernels, "_REGISTRY", {"reference": reference.BACKEND})
    monkeypatch.setenv("L1FX_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="'triton' is not built"):
        L1F.l1_linear(torch.randn(3, 4), torch.randn(2, 4))


def test_unavailable_backend_reports_why(monkeypatch):
    broken = Backend("cpu", reference.linear_forward, reference.linear_backward,
                     available=lambda: (False, "no C++ compiler found"), priority=10)
    monkeypatch.setattr(kernels, "_REGISTRY", {"reference": reference.BACKEND, "cpu": broken})
    monkeypatch.setenv("L1FX_BACKEND", "cpu")
    with pytest.raises(BackendUnavailable, match="no C\\+\\+ compiler found"):
        get_backend(torch.randn(2))
    # auto skips it without error
    monkeypatch.setenv("L1FX_BACKEND", "auto")
    assert get_backend(torch.randn(2)).name == "reference"


def test_auto_prefers_priority_and_support(monkeypatch):
    calls = []

    def fwd(x, w, b):
        calls.append(x.dtype)
        return reference.linear_forward(x, w, b)

    fast = Backend("cpu", fwd, reference.linear_backward, supports=lambda x: x.dtype == torch.float32, priority=10)
    monkeypatch.setattr(kernels, "_REGISTRY", {"reference": reference.BACKEND, "cpu": fast})
    monkeypatch.delenv("L1FX_BACKEND", raising=False)
    L1F.l1_linear(torch.randn(3, 4), torch.randn(2, 4))
    L1F.l1_linear(torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    assert calls == [torch.float32]


def test_chunk_budget_env(monkeypatch):
    monkeypatch.setenv("L1FX_CHUNK_BYTES", "nonsense")
    with pytest.raises(ValueError, match="L1FX_CHUNK_BYTES"):
        kernels.chunk_bytes()
    monkeypatch.setenv("L1FX_CHUNK_BYTES", "1024")
    assert kernels.chunk_bytes() == 1024


# ---------------------------------------------------------------- third-party backends, per-op support
from brute import l1_conv_brute, l1_linear_brute  # noqa: E402

from l1fx.kernels import BACKEND_NAMES, backend_names, conv_kernels, register_backend  # noqa: E402


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the backend registry, restored after the test."""
    monkeypatch.setattr(kernels, "_REGISTRY", dict(kernels._REGISTRY))
    return kernels._REGISTRY


def _recording(name, calls, **kw):
    def fwd(x, w, b):
        calls.append((name, tuple(x.shape)))
        return reference.linear_forward(x, w, b)

    return Backend(name, fwd, reference.linear_backward, **kw)


def test_third_party_backend_by_name(registry, monkeypatch):
    calls = []
    register_backend(_recording("mine", calls))
    assert "mine" in backend_names() and "mine" not in BACKEND_NAMES
    monkeypatch.setenv("L1FX_BACKEND", "mine")
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(L1F.l1_linear(x, w), l1_linear_brute(x, w))
    assert calls == [("mine", (3, 4))]
    # under auto it competes by priority: at 0 the built-ins (registered first) win, at 100 it does
    monkeypatch.setenv("L1FX_BACKEND", "auto")
    assert get_backend(x).name != "mine"
    register_backend(_recording("mine", calls, priority=100))
    assert get_backend(x).name == "mine"


def test_unknown_backend_lists_the_registered_ones(registry, monkeypatch):
    register_backend(_recording("mine", []))
    monkeypatch.setenv("L1FX_BACKEND", "theirs")
    with pytest.raises(ValueError, match=r"L1FX_BACKEND='theirs' is not a backend; set it to one of .*reference.*mine"):
        get_backend(torch.randn(2, 2))
    with pytest.raises(ValueError, match="'theirs' is not a backend"):
        get_backend(torch.randn(2, 2), "theirs")


@pytest.mark.parametrize("bad", ["auto", "Mine", "", "my backend"])
def test_backend_names_are_checked(registry, bad):
    with pytest.raises(ValueError, match="is not usable"):
        register_backend(_recording(bad, []))
    with pytest.raises(TypeError, match="expects an l1fx.kernels.Backend"):
        register_backend("mine")


@pytest.mark.parametrize("style", ["ops", "supports"])
def test_linear_only_backend_per_op(registry, monkeypatch, style):
    """A backend may run linear but not conv: auto sends conv to the next one, a forced one names the op."""
    calls = []
    kw = {"ops": ("linear",)} if style == "ops" else {"supports": lambda op, x: op == "linear"}
    register_backend(_recording("mine", calls, priority=100, **kw))
    monkeypatch.delenv("L1FX_BACKEND", raising=False)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert get_backend(x, op="linear").name == "mine"
    assert get_backend(x, op="conv").name != "mine"
    monkeypatch.setenv("L1FX_BACKEND", "mine")
    assert get_backend(x).name == "mine"
    with pytest.raises(BackendUnavailable, match="'mine' .* the l1 conv op"):
        get_backend(x, op="conv")
    with pytest.raises(BackendUnavailable, match="conv"):
        conv_kernels(x)


def test_conv_falls_back_to_the_lowering_of_the_backend(registry, monkeypatch):
    """A backend without conv_forward runs conv on its own linear core (the im2col lowering)."""
    calls = []
    register_backend(_recording("mine", calls))
    x = torch.randn(2, 4, 9, dtype=torch.float64) * 1e3 + 5e5  # far from 0: exactness, not luck
    w = torch.randn(6, 2, 3, dtype=torch.float64) * 1e3 + 5e5
    b = torch.randn(6, dtype=torch.float64)
    backend, forward, _ = conv_kernels(x, "mine")
    assert backend.name == "mine"
    y = forward(x, w, b, [2], [1], [1], 2)
    torch.testing.assert_close(y, l1_conv_brute(x, w, b, [2], [1], [1], 2))
    assert calls and all(name == "mine" for name, _ in calls)


def test_own_conv_forward_is_used(registry):
    seen = []

    def conv_forward(x, w, b, stride, padding, dilation, groups):
        seen.append("conv")
        return l1_conv_brute(x, w, b, stride, padding, dilation, groups)

    register_backend(Backend("mine", reference.linear_forward, reference.linear_backward, conv_forward=conv_forward))
    x, w = torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)
    _, forward, _ = conv_kernels(x, "mine")
    forward(x, w, None, [1], [0], [1], 1)
    assert seen == ["conv"]


def test_old_style_supports_still_applies_to_every_op(registry, monkeypatch):
    register_backend(_recording("mine", [], supports=lambda x: x.dtype == torch.float32, priority=100))
    monkeypatch.delenv("L1FX_BACKEND", raising=False)
    for op in ("linear", "conv"):
        assert get_backend(torch.randn(2, 2), op=op).name == "mine"
        assert get_backend(torch.randn(2, 2, dtype=torch.float64), op=op).name != "mine"
    with pytest.raises(BackendUnavailable, match="cannot run torch.float64 tensors on cpu; unset"):
        get_backend(torch.randn(2, 2, dtype=torch.float64), "mine")


@pytest.mark.parametrize("per_op", [False, True])
def test_unhashable_supports_callable_works_under_auto(registry, monkeypatch, per_op):
    # an object with __eq__ and no __hash__ is unhashable: the signature cache must not make every op fail
    class Supports:
        __hash__ = None

        def __eq__(self, other):
            return self is other

        def __call__(self, *args):
            seen.append(len(args))
            return True

    seen, calls = [], []
    if per_op:
        Supports.__call__ = lambda self, op, x: seen.append(2) or True
    register_backend(_recording("mine", calls, supports=Supports(), priority=100))
    monkeypatch.delenv("L1FX_BACKEND", raising=False)
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    torch.testing.assert_close(L1F.l1_linear(x, w), l1_linear_brute(x, w))
    assert calls and calls[0][0] == "mine"
    assert seen and set(seen) == {2 if per_op else 1}
