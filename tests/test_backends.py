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
