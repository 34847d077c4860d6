"""l1fx.convert keeps what the model means: weight ties, random draws, the user's RNG; clear errors."""
import copy
import io
import random
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import l1fx.nn as l1nn
from l1fx.convert import convert, summary
from l1fx.errors import ConversionError, L1fxError


def _quiet_convert(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, *args, **kwargs)


# ------------------------------------------------------------------ 1. weight ties
class _TiedBody(nn.Module):
    """``body`` is converted; ``kept`` (excluded, stays dense) shares its weight; ``head`` is tied to ``emb``."""

    def __init__(self, untraceable: bool = False) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.body = nn.Linear(8, 8)
        self.kept = nn.Linear(8, 8)
        self.kept.weight = self.body.weight
        self.norm = nn.LayerNorm(8)

    def forward(self, h):
        if self.untraceable and h.abs().sum().item() < 0:  # .item(): fx cannot trace this module
            h = -h
        return self.norm(self.body(h) + self.kept(h))


class _TiedLM(nn.Module):
    def __init__(self, mode: str = "traced") -> None:
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(10, 8)
        self.block = _TiedBody(untraceable=mode == "leaf")
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied output layer

    def forward(self, idx):
        h = self.emb(idx)
        if self.mode == "whole" and h.abs().sum().item() < 0:  # root untraceable: whole-model swap
            h = -h
        return self.head(self.block(h))


def _check_tied(out, idx):
    assert isinstance(out.head, l1nn.L1Module) and isinstance(out.block.body, l1nn.L1Module)
    assert not isinstance(out.block.kept, l1nn.L1Module) and not isinstance(out.emb, l1nn.L1Module)
    assert out.head.weight is out.emb.weight, "converted head lost its tie to the embedding"
    assert out.block.body.weight is out.block.kept.weight, "converted/kept tie lost"
    # one optimizer step moves the shared weight once, for both users
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    out(idx).square().mean().backward()
    before = out.emb.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, out.emb.weight)
    assert torch.equal(out.head.weight, out.emb.weight) and torch.equal(out.block.body.weight, out.block.kept.weight)


@pytest.mark.parametrize("mode", ["traced", "leaf", "whole"])
def test_weights_shared_with_converted_layers_stay_one_parameter(mode):
    torch.manual_seed(0)
    model = _TiedLM(mode)
    idx = torch.randint(0, 10, (4, 5))
    out = _quiet_convert(model, exclude="block.kept", normalize=None)
    region = {"traced": "traced", "leaf": "block", "whole": ""}[mode]
    assert {r.name: r.region for r in summary(out).rows}["block.body"] == region
    _check_tied(out, idx)
    # the summary says who shares what
    text = str(summary(out))
    assert "emb.weight" in text and "head.weight" in text and "block.kept.weight" in text, text
    shared = {frozenset(g) for g in summary(out).shared_weights}
    assert frozenset({"emb.weight", "head.weight"}) in shared
    assert frozenset({"block.body.weight", "block.kept.weight"}) in shared
    # the state_dict round-trips into a fresh conversion, ties intact
    torch.manual_seed(1)
    other = _quiet_convert(_TiedLM(mode), exclude="block.kept", normalize=None)
    other.load_state_dict(out.state_dict())
    assert other.head.weight is other.emb.weight
    with torch.no_grad():
        torch.testing.assert_close(other(idx), out(idx))


def test_data_init_reinitialises_a_shared_weight_once_for_all_its_users():
    torch.manual_seed(0)
    model = _TiedLM("traced")
    idx = torch.randint(0, 10, (16, 5))
    out = _quiet_convert(model, exclude="block.kept", example_inputs=(idx,), init="data")
    assert out.head.weight is out.emb.weight and out.block.body.weight is out.block.kept.weight
    assert not torch.equal(out.head.weight, model.head.weight)  # re-initialised ...
    assert torch.equal(model.emb.weight, model.head.weight)  # ... on the copy only
    assert any("shared" in n for n in summary(out).notes), summary(out).notes
    _check_tied(out, idx)


# ------------------------------------------------------------------ 2. random draws stay random
class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        noise = (torch.randn(4) + torch.rand_like(torch.zeros(4)) + torch.empty(4).uniform_()
                 + torch.randint(0, 100, (4,)) + torch.randperm(4) + torch.normal(torch.zeros(4), 1.0)
                 + torch.bernoulli(torch.full((4,), 0.5)) + F.dropout(torch.ones(4), 0.5, True))
        return self.lin(x), x + noise


def test_random_draws_without_traced_arguments_stay_random():
    model = _Noisy()
    x = torch.randn(2, 4)
    out = _quiet_convert(model)
    assert isinstance(out, fx.GraphModule) and summary(out).tracing == "full"
    targets = {n.target for n in out.graph.nodes if n.op in ("call_function", "call_method")}
    assert {torch.randn, torch.randperm, F.dropout, "uniform_"} <= targets, targets
    assert not torch.equal(out(x)[1], out(x)[1]), "the noise was frozen into a constant"
    for m in (out, copy.deepcopy(out), _reloaded(out)):
        torch.manual_seed(3)
        got = m(x)[1]
        torch.manual_seed(3)
        want = model(x)[1]
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # same draws, in the same order, as eager


def _reloaded(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


class _RandomBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        sign = 1.0 if torch.rand(()) < 0.5 else -1.0
        return self.lin(x) * 0 + sign


class _HasRandomBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _RandomBranch()
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        return self.out(x) * 0 + self.inner(x)


@pytest.mark.parametrize("cls,fallback", [(_RandomBranch, "none"), (_HasRandomBranch, "partial")])
def test_random_branch_falls_back_instead_of_freezing_one_side(cls, fallback):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(2, 4)
    out = _quiet_convert(model)
    assert summary(out).tracing.startswith(fallback), summary(out).tracing
    assert isinstance(out.lin if cls is _RandomBranch else out.inner.lin, l1nn.L1Module)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        got = out(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, model(x))  # the branch the eager model takes
        seen.add(float(got.detach().flatten()[0]))
    assert seen == {1.0, -1.0}, seen


class _ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.noisy = _NoisyInTraining()

    def forward(self, x):
        return self.noisy(F.dropout(self.lin(x), 0.5, self.training))


class _NoisyInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if self.training:  # a branch on the mode: cannot be a graph, becomes a leaf
            x = x + torch.randn_like(x)
        return self.lin(x)


def test_functional_dropout_and_training_branches_follow_train_and_eval():
    out = _quiet_convert(_ModeDependent())  # traced in train mode
    assert list(summary(out).leaves) == ["noisy"], summary(out).leaves
    x = torch.randn(3, 4)
    out.eval()
    assert torch.equal(out(x), out(x)), "dropout/noise still on after .eval()"
    out.train()
    assert not torch.equal(out(x), out(x))
    m = _reloaded(out).eval()
    assert torch.equal(m(x), m(x))


# ------------------------------------------------------------------ 3. the user's RNG is left alone
class _Sampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.bn(self.conv(x + 0.01 * torch.randn(3, 1)))
        return self.fc(F.dropout(h.mean(-1), 0.1, self.training))


def _draws():
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


@pytest.mark.parametrize("kwargs", [{}, {"init": "data"}, {"init": 2.0}])
def test_convert_leaves_the_global_rng_as_it_found_it(kwargs):
    def seeded():
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)

    seeded()
    want = _draws()
    model, x = _Sampling(), torch.randn(4, 3, 16)
    seeded()
    out = _quiet_convert(model, example_inputs=(x,), **kwargs)
    assert isinstance(out.conv, l1nn.L1Module) and isinstance(out.fc, l1nn.L1Module)
    assert _draws() == want
    # from_dense on its own draws nothing either
    seeded()
    l1nn.L1Conv1d.from_dense(nn.Conv1d(3, 8, 1)) and l1nn.L1Linear.from_dense(nn.Linear(3, 4))
    seeded_after = _draws()
    seeded()
    nn.Conv1d(3, 8, 1) and nn.Linear(3, 4)
    assert seeded_after == _draws()


# ------------------------------------------------------------------ 4. errors
class _ChecksItsLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum().item() > 1e9:  # not traceable: whole model swapped
            x = -x
        if not type(self.fc) is nn.Linear:
            raise ValueError("expected nn.Linear\n(second line of the message)")
        return self.fc(x)


def _one_line(e):
    assert "\n" not in str(e), str(e)


def test_convert_errors_are_one_line_conversion_errors_naming_the_layer(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    for bad, builtin in (({"ratio": 2}, ValueError), ({"strategy": "random"}, ValueError),
                         ({"include": 3}, TypeError), ({"example_inputs": 3}, TypeError),
                         ({"init": "data"}, ValueError)):
        with pytest.raises(ConversionError) as info:
            convert(model, **bad)
        assert isinstance(info.value, builtin) and isinstance(info.value, L1fxError)
        _one_line(info.value)
    with pytest.raises(ConversionError) as info:
        convert("not a model")
    assert isinstance(info.value, TypeError)
    # running the model on example_inputs fails: one line, both L1fxError and the old RuntimeError
    with pytest.raises(ConversionError) as info:
        convert(model, example_inputs=(torch.randn(2, 5),))
    assert isinstance(info.value, RuntimeError)
    _one_line(info.value)
    # a layer that fails to convert is named
    def broken(module, **kwargs):
        raise RuntimeError("cannot build\nmore detail")
    monkeypatch.setattr(l1nn.L1Linear, "from_dense", classmethod(lambda cls, m, **k: broken(m)))
    with pytest.raises(ConversionError, match=r"layer '0'") as info:
        convert(model)
    assert isinstance(info.value, RuntimeError)
    _one_line(info.value)
    monkeypatch.undo()
    # the converted model fails on example_inputs: the converted layers are named
    with pytest.raises(ConversionError, match=r"fc") as info:
        _quiet_convert(_ChecksItsLayer(), example_inputs=(torch.randn(2, 4),))
    assert isinstance(info.value, RuntimeError)
    _one_line(info.value)


def test_converted_model_with_postponed_annotations_saves_and_loads(tmp_path):
    # l1fx.models uses `from __future__ import annotations`: fx saw the string 'Tensor' as a type and
    # the converted GraphModule could not be pickled.
    from l1fx import models

    model = models.PointNetPartSeg(num_parts=4, num_categories=2).eval()
    x, cat = torch.randn(2, 3, 64), torch.zeros(2, dtype=torch.long)
    l1 = _quiet_convert(model, ratio=1.0, example_inputs=(x, cat)).eval()
    path = tmp_path / "l1.pt"
    torch.save(l1, path)
    loaded = torch.load(path, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, cat), l1(x, cat))


# ------------------------------------------------------------------ in-place random fills used eagerly
class _FilledNoise(nn.Module):
    """``n`` is filled in place at random, then used in an eager op before any traced call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = torch.empty(4)
        n.uniform_()
        return self.fc(x) + n * 0.1


class _HasFilledNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.noisy = _FilledNoise()
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        return self.out(self.noisy(x))


@pytest.mark.parametrize("cls", [_FilledNoise, _HasFilledNoise])
def test_random_fill_used_eagerly_is_not_frozen(cls):
    torch.manual_seed(0)
    model = cls()
    x = torch.zeros(1, 4)
    out = _quiet_convert(model, normalize=None)
    assert summary(out).tracing == "full", summary(out).tracing
    assert "uniform_" in {n.target for n in out.graph.nodes}
    assert not torch.equal(out(x), out(x)), "the noise was frozen into a constant"
    for seed in (5, 6):
        torch.manual_seed(seed)
        got = out(x)
        torch.manual_seed(seed)
        noise = torch.empty(4).uniform_() * 0.1  # the eager model's draw
        fc = out.fc if cls is _FilledNoise else out.noisy.fc
        want = fc(x) + noise if cls is _FilledNoise else out.out(fc(x) + noise)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _FilledNoiseReadInPython(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = torch.empty(4)
        n.uniform_()
        return self.fc(x) + float(n.sum().item())  # needs the values in Python: cannot be a graph


def test_random_fill_read_in_python_falls_back_and_stays_random():
    model = _HasFilledNoise()
    model.noisy = _FilledNoiseReadInPython()
    out = _quiet_convert(model, normalize=None)
    assert summary(out).tracing.startswith("partial") and "noisy" in summary(out).leaves, summary(out).leaves
    x = torch.zeros(1, 4)
    assert not torch.equal(out(x), out(x)), "the noise was frozen into a constant"


class _FilledNoiseTraced(nn.Module):
    """The fill reaches a traced op directly: still one graph, still random (metadata reads are fine)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = torch.empty(4)
        n.normal_()
        assert n.shape[0] == 4 and n.dim() == 1
        return self.fc(x) + n


def test_random_fill_reaching_a_traced_op_keeps_the_graph():
    out = _quiet_convert(_FilledNoiseTraced(), normalize=None)
    assert isinstance(out, fx.GraphModule) and summary(out).tracing == "full", summary(out).tracing
    x = torch.zeros(1, 4)
    assert not torch.equal(out(x), out(x))


# ------------------------------------------------------------------ tracing from two threads at once
class _SlowRandom(nn.Module):
    """Draws at random and sleeps while traced, so two threads' patches overlap without a lock."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        import time

        time.sleep(0.05)
        return self.fc(x) + torch.randn(4) + torch.empty(4).uniform_()


def test_concurrent_conversions_leave_torch_unpatched():
    import threading

    originals = {"randn": torch.randn, "dropout": F.dropout, "uniform_": torch.Tensor.uniform_,
                 "normal_": torch.Tensor.normal_}
    errors, outs = [], []

    def work():
        try:
            for _ in range(3):
                outs.append(_quiet_convert(_SlowRandom(), normalize=None))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.randn is originals["randn"] and F.dropout is originals["dropout"]
    assert torch.Tensor.uniform_ is originals["uniform_"] and torch.Tensor.normal_ is originals["normal_"]
    assert len(outs) == 6 and all(summary(o).tracing == "full" for o in outs)


class _FilledThenUpdated(nn.Module):
    """An in-place op with a traced argument on the filled tensor: later uses see its result, not the fill."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = torch.empty(1, 4)
        n.uniform_()
        n.add_(self.fc(x))
        return n * 1.0


def test_an_in_place_update_of_a_random_fill_is_kept():
    torch.manual_seed(0)
    model = _FilledThenUpdated()
    out = _quiet_convert(model, normalize=None)
    assert summary(out).tracing == "full" and "add_" in {n.target for n in out.graph.nodes}
    x = torch.randn(1, 4)
    torch.manual_seed(2)
    noise = torch.empty(1, 4).uniform_()
    torch.manual_seed(2)
    torch.testing.assert_close(out(x), noise + out.fc(x), rtol=0, atol=0)
