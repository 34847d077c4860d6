"""Wrong traces are caught before converting (issue 21): the traced graph is compared with the eager model.

Small models in the style of the public code that broke: MONAI's ``UpCat`` (``torch.jit.isinstance`` on
the skip input), the same with the builtin ``isinstance``, torchvision's ``StochasticDepth`` (drop path on
``self.training``), a root method called back from a submodule, and shape checks (``if x.dim() > 3``).
"""
import random
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import l1fx.nn as l1nn
from l1fx import passes
from l1fx.convert import convert, summary


def _quiet(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, **kwargs)


# ------------------------------------------------------------------ isinstance on a Proxy
class UpCat(nn.Module):
    """MONAI's BasicUNet ``UpCat``: the skip connection is used only ``if torch.jit.isinstance(x_e, torch.Tensor)``."""

    def __init__(self, ch: int, builtin: bool = False) -> None:
        super().__init__()
        self.builtin = builtin
        self.upsample = nn.Conv1d(ch, ch, 1)
        self.convs = nn.Sequential(nn.Conv1d(2 * ch, ch, 1), nn.BatchNorm1d(ch), nn.ReLU())

    def forward(self, x, x_e):
        x_0 = self.upsample(x)
        skip = isinstance(x_e, torch.Tensor) if self.builtin else torch.jit.isinstance(x_e, torch.Tensor)
        if x_e is not None and skip:
            x = self.convs(torch.cat([x_e, x_0], dim=1))
        else:
            x = self.convs(torch.cat([x_0, x_0], dim=1))  # what a Proxy would silently get
        return x


class BasicUNet1d(nn.Module):
    def __init__(self, builtin: bool = False, ch: int = 8) -> None:
        super().__init__()
        self.conv_0 = nn.Sequential(nn.Conv1d(3, ch, 1), nn.BatchNorm1d(ch), nn.ReLU())
        self.down_1 = nn.Sequential(nn.Conv1d(ch, ch, 1), nn.BatchNorm1d(ch), nn.ReLU())
        self.upcat_1 = UpCat(ch, builtin)
        self.final_conv = nn.Conv1d(ch, 2, 1)

    def forward(self, x):
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        return self.final_conv(self.upcat_1(x1, x0))


def _same_as_eager(converted, model, x):
    """The converted graph with dense weights computes what the model does (only layers swapped)."""
    dense = _quiet(model, ratio=0.0, example_inputs=(x,))  # nothing converted: the traced model itself
    with torch.no_grad():
        return torch.allclose(dense.eval()(x), model.eval()(x), atol=1e-6)


def test_jit_isinstance_on_a_proxy_takes_the_tensor_branch():
    model, x = BasicUNet1d().eval(), torch.randn(2, 3, 10)
    out = _quiet(model, example_inputs=(x,))
    info = summary(out)
    assert isinstance(out, fx.GraphModule) and info.tracing == "full"
    assert info.trace_check.startswith("passed") and "example_inputs" in info.trace_check
    assert _same_as_eager(out, model, x)
    out(x)  # the converted model runs
    # the patch is gone after tracing
    assert torch.jit.isinstance.__module__ == "torch.jit" or not hasattr(torch.jit.isinstance, "__wrapped__")


def test_builtin_isinstance_wrong_branch_is_caught_and_the_submodule_becomes_a_leaf():
    model, x = BasicUNet1d(builtin=True).eval(), torch.randn(2, 3, 10)
    with pytest.warns(UserWarning, match="upcat_1.*differed from the eager model"):
        out = convert(model, example_inputs=(x,))
    info = summary(out)
    assert info.tracing == "partial" and set(info.leaves) == {"upcat_1"}  # not "full" for a wrong trace
    assert info.trace_check.startswith("failed at first") and "upcat_1" in info.trace_check
    assert "trace check: failed at first" in str(info)
    assert _same_as_eager(out, model, x)
    assert isinstance(out.upcat_1.upsample, l1nn.L1Conv1d)  # its layers converted by module swap


class _WrongAtTheRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, y=None):
        y = self.a(x) if y is None else y
        return self.b(y) if isinstance(y, torch.Tensor) else self.b(x)  # a Proxy takes the wrong branch


def test_a_wrong_branch_in_the_root_forward_means_a_whole_model_swap():
    x = torch.randn(3, 4)
    model = _WrongAtTheRoot().eval()
    out = _quiet(model, example_inputs=(x,), init="dense")
    info = summary(out)
    assert info.tracing.startswith("none") and "differs from the eager model" in info.whole_model_error
    assert not isinstance(out, fx.GraphModule) and isinstance(out.a, l1nn.L1Linear)


def test_without_example_inputs_a_generated_input_is_used_or_the_summary_says_no_check():
    out = _quiet(BasicUNet1d(builtin=True))
    info = summary(out)
    assert "generated input [2, 3, 16]" in info.trace_check and set(info.leaves) == {"upcat_1"}

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.fc(x) + y

    info = summary(_quiet(TwoInputs()))
    assert info.trace_check.startswith("not run") and "2 required inputs" in info.trace_check
    assert "trace check: not run" in str(info)


def test_the_check_leaves_rng_train_flags_and_buffers_as_they_were():
    model = BasicUNet1d(builtin=True)
    model.train()
    model.conv_0.eval()  # a mix the user chose
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    out = _quiet(model, example_inputs=(x,))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expected[0].tolist(), *expected[1:])
    assert model.training and not model.conv_0.training and model.down_1.training
    assert out.training and not out.conv_0.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ train flag stays a runtime value
def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth (not fx-wrapped here: traced through, or failing on ``training``)."""
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


def wrapped_stochastic_depth(input, p: float, mode: str, training: bool = True):
    return stochastic_depth(input, p, mode, training)


torch.fx.wrap("wrapped_stochastic_depth")  # as torchvision does: one graph node taking self.training


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str, wrapped: bool = False) -> None:
        super().__init__()
        self.p, self.mode, self.wrapped = p, mode, wrapped

    def forward(self, input):
        fn = wrapped_stochastic_depth if self.wrapped else stochastic_depth
        return fn(input, self.p, self.mode, self.training)


class _DropPathBlock(nn.Module):
    """A Swin-style block: drop path on ``self.training``, and ``F.dropout(x, p, self.training)``."""

    def __init__(self, wrapped: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop_path = StochasticDepth(0.5, "row", wrapped)

    def forward(self, x):
        h = F.dropout(torch.relu(self.fc1(x)), 0.3, self.training)
        return x + self.drop_path(self.fc2(h))


@pytest.mark.parametrize("wrapped", [False, True])
def test_drop_path_and_dropout_follow_the_train_flag_after_conversion(wrapped):
    # wrapped: torchvision's fx-wrapped stochastic_depth, self.training an argument of its node;
    # not wrapped: `if not training` fails to trace on the flag, and the helper becomes one graph node
    # that reads the live flag
    model, x = nn.Sequential(_DropPathBlock(wrapped), _DropPathBlock(wrapped)), torch.randn(64, 8)
    model.train()  # traced in train mode: nothing of it may be baked in
    out = _quiet(model, example_inputs=(x,))
    info = summary(out)
    assert not info.leaves and any(n.endswith(".stochastic_depth") for n in info.opaque_functions) != wrapped
    out.eval()
    with torch.no_grad():
        assert torch.equal(out(x), out(x))  # deterministic in eval mode
    out.train()
    with torch.no_grad():
        assert not torch.equal(out(x), out(x))  # and random again in training
    assert info.trace_check.startswith("passed")


# ------------------------------------------------------------------ a root method called from a submodule
class _Encoder(nn.Module):
    def __init__(self, center) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.center = center  # a bound method of the root model (PointNet++ code passes such helpers)

    def forward(self, x):
        return self.center(torch.relu(self.fc(x)))


class _Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = _Encoder(self.recenter)
        self.head = nn.Linear(8, 2)

    def recenter(self, h):
        if h.mean() > 0:  # data-dependent: cannot be traced
            return h - h.mean()
        return h

    def forward(self, x):
        return self.head(self.enc(x))


def test_a_failure_in_a_root_method_makes_the_calling_submodule_a_leaf():
    x = torch.randn(5, 4)
    out = _quiet(_Root(), example_inputs=(x,))
    info = summary(out)
    assert isinstance(out, fx.GraphModule) and info.whole_model_error is None  # it was a whole-model swap
    assert set(info.leaves) == {"enc"} and "control flow" in info.leaves["enc"]
    assert info.converted == ["enc.fc", "head"]


# ------------------------------------------------------------------ shape checks decided by example_inputs
class _ShapeChecked(nn.Module):
    """``if D > 3``-style checks: xyz only, or xyz + features (PointNet++'s ``if points is not None`` kin)."""

    def __init__(self) -> None:
        super().__init__()
        self.xyz = nn.Conv1d(3, 8, 1)
        self.xyzf = nn.Conv1d(6, 8, 1)
        self.head = nn.Conv1d(8, 2, 1)

    def forward(self, x):
        B, D, N = x.shape
        if D > 3:
            h = self.xyzf(x)
        else:
            h = self.xyz(x)
        if x.dim() != 3:
            raise ValueError("expected B x D x N")
        return self.head(torch.relu(h))


def test_example_inputs_decide_branches_on_shapes():
    x = torch.randn(2, 6, 16)
    model = _ShapeChecked().eval()
    with_inputs = summary(_quiet(model, example_inputs=(x,)))
    assert with_inputs.tracing == "full" and with_inputs.trace_check.startswith("passed")
    assert len(with_inputs.shape_branches) == 2 and "branches on shapes decided" in str(with_inputs)
    assert with_inputs.converted == ["xyzf", "head"]  # the layer the branch skips is not called
    # without inputs the branch cannot be decided: the whole model is swapped, as before
    assert summary(_quiet(model)).tracing.startswith("none")


def test_a_branch_on_tensor_values_is_not_decided_by_the_example():
    class ValueBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.shape[0] > 1 and x.sum() > 0 else -x

    info = summary(_quiet(ValueBranch(), example_inputs=(torch.ones(3, 4),)))
    assert info.tracing.startswith("none") and not info.shape_branches


def test_trace_report_records_the_check():
    report = passes.trace_model(BasicUNet1d().eval(), (torch.randn(2, 3, 10),))
    assert report.check.startswith("passed") and report.fully_traced


def test_no_generated_input_for_uninitialised_lazy_layers():
    """A made-up input would fix a LazyLinear's in_features to the made-up length: the check is not run."""
    import l1fx

    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.Flatten(), nn.LazyLinear(5))
    out = l1fx.convert(model, ratio=1.0)
    info = l1fx.summary(out)
    assert "lazy module '2' is not initialised" in str(info)
    assert "lazy" in info.skipped["2"]  # still lazy: left dense with the reason
    assert out(torch.randn(2, 3, 7)).shape == (2, 5)  # any length works, as in the user's model
