"""MGS / DLC schedules and the TrainingWrapper: exact resume, DDP, autocast."""
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from l1fx.errors import TrainingError
from l1fx.nn import L1Conv1d, L1Linear
from l1fx.train import DLC, MGS, TrainingWrapper, find_l1_modules


class TinySeg(nn.Module):
    """A shared-MLP point network in miniature: ℓ1 Conv1d -> BN -> ReLU -> ℓ1 Conv1d -> dense head."""

    def __init__(self):
        super().__init__()
        self.conv1 = L1Conv1d(3, 8, 1)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = L1Conv1d(8, 8, 1)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, generator=g), torch.randint(0, 4, (4, 16), generator=g)) for _ in range(n)]


def train_steps(model, wrapper, data):
    for x, y in data:
        wrapper.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        wrapper.step()


# ---------------------------------------------------------------- schedules
def test_mgs_cosine_linear_warmup_and_callable():
    m = MGS()
    assert m.value(0, 10) == 1.0 and m.value(10, 10) == 0.0
    assert m.value(5, 10) == pytest.approx(0.5)
    assert m.value(2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    lin = MGS(start=0.8, end=0.2, schedule="linear", warmup_steps=4)
    assert [lin.value(s, 10) for s in (0, 3, 4)] == [0.8, 0.8, 0.8]
    assert lin.value(7, 10) == pytest.approx(0.5)  # halfway through the 6 post-warm-up steps
    assert lin.value(50, 10) == pytest.approx(0.2)  # past the end holds the final value
    sq = MGS(schedule=lambda p: p * p)
    assert sq.value(5, 10) == pytest.approx(0.75)
    assert MGS.constant(0.0).value(3, 10) == 0.0


@pytest.mark.parametrize("kwargs", [dict(start=1.5), dict(end=-0.1), dict(schedule="step"),
                                    dict(warmup_steps=-1), dict(schedule=3)])
def test_mgs_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="MGS"):
        MGS(**kwargs)


def test_mgs_callable_out_of_range_is_named():
    with pytest.raises(ValueError, match="fraction of the way"):
        MGS(schedule=lambda p: 2.0).value(1, 10)


def test_dlc_default_lr_shape():
    d = DLC()
    assert d.lr_factor(0.0) == 1.0 and d.lr_factor(0.02) == 1.0  # held for the first 2.5%
    cos = lambda p: 0.5 * (1 + math.cos(math.pi * (p - 0.025) / 0.975))
    assert d.lr_factor(0.5) == pytest.approx(cos(0.5))
    assert d.lr_factor(0.7499) == pytest.approx(cos(0.7499))
    assert d.lr_factor(0.75) == pytest.approx(cos(0.75) / 10)  # ÷10 at 75%
    assert d.lr_factor(0.94) == pytest.approx(cos(0.94) / 100)  # ÷100 at 94%
    custom = DLC(hold=0.0, drops=(), min_factor=0.1)
    assert custom.lr_factor(1.0) == pytest.approx(0.1)
    assert DLC(lr_schedule=lambda p: 1 - p).lr_factor(0.25) == 0.75
    assert DLC(lr_schedule=None).lr_factor(0.9) == 1.0


@pytest.mark.parametrize("kwargs", [dict(eta=0), dict(hold=1.0), dict(drops=((0.5,),)), dict(drops=((0.5, -1),)),
                                    dict(groups="dense"), dict(lr_schedule="step"), dict(eps=-1.0)])
def test_dlc_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="DLC"):
        DLC(**kwargs)


# ---------------------------------------------------------------- the wrapper
def test_dlc_scales_only_l1_weight_gradients():
    model = TinySeg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = TrainingWrapper(model, opt, total_steps=10, mgs=None, dlc=DLC(eta=0.3))
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    wrapper.step()
    for name, p in model.named_parameters():
        g = before[name]
        if name in ("conv1.weight", "conv2.weight"):
            expected = g * (0.3 * math.sqrt(g.numel()) / g.norm())
            torch.testing.assert_close(p.grad, expected)
            assert p.grad.norm().item() == pytest.approx(0.3 * math.sqrt(g.numel()), rel=1e-5)
        else:  # biases, BN and the dense head keep the optimizer's own gradient
            assert torch.equal(p.grad, g), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dlc_normalises_vanishing_gradients_and_keeps_zero_ones(dtype):
    # Deep ℓ1 stacks have weight gradients of 1e-20 and below in their first layers (the squares
    # underflow float32); the scaling exists to give those layers a full step, so it must not clamp.
    tiny = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    tiny = tiny * (1e-20 if dtype == torch.float32 else 1e-6)  # float16 cannot hold 1e-20
    weights = [nn.Parameter(torch.zeros(8, 16, dtype=dtype)) for _ in range(2)]
    weights[0].grad, weights[1].grad = tiny.to(dtype), torch.zeros(8, 16, dtype=dtype)
    expected = tiny.to(dtype).float() / tiny.to(dtype).float().norm() * 0.2 * math.sqrt(tiny.numel())
    DLC(eta=0.2).scale_(weights)
    assert weights[0].grad.dtype == dtype
    torch.testing.assert_close(weights[0].grad.float(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=0)
    assert torch.equal(weights[1].grad, torch.zeros(8, 16, dtype=dtype))  # nothing to normalise: no NaN


def test_mgs_drives_every_l1_layer_and_lr_follows_dlc():
    model = TinySeg()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    wrapper = TrainingWrapper(model, opt, total_steps=8, mgs=MGS(schedule="linear"), dlc=DLC())
    assert [m.mgs_mix for _, m in wrapper.l1_modules] == [1.0, 1.0]
    train_steps(model, wrapper, batches(4))
    assert wrapper.step_count == 4
    assert model.conv1.mgs_mix == model.conv2.mgs_mix == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * DLC().lr_factor(0.5))
    train_steps(model, wrapper, batches(4, seed=2))
    assert model.conv1.mgs_mix == 0.0
    with pytest.warns(UserWarning, match="past total_steps"):
        train_steps(model, wrapper, batches(1))


def test_lr_schedule_groups_all_vs_l1():
    def build(groups):
        model = TinySeg()
        l1 = [model.conv1.weight, model.conv2.weight]
        rest = [p for p in model.parameters() if all(p is not q for q in l1)]
        opt = torch.optim.Adam([{"params": l1, "lr": 1e-2}, {"params": rest, "lr": 1e-3}])
        return model, opt, TrainingWrapper(model, opt, total_steps=4, dlc=DLC(groups=groups))

    for groups, dense_lr in (("all", 1e-3 * DLC().lr_factor(0.5)), ("l1", 1e-3)):
        model, opt, wrapper = build(groups)
        train_steps(model, wrapper, batches(2))
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * DLC().lr_factor(0.5))
        assert opt.param_groups[1]["lr"] == pytest.approx(dense_lr)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_resume_from_checkpoint_is_bit_exact(tmp_path, opt_name):
    def build():
        torch.manual_seed(0)
        model = TinySeg()
        if opt_name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, TrainingWrapper(model, opt, total_steps=8, mgs=MGS(warmup_steps=1), dlc=DLC(hold=0.2))

    data = batches(8)
    model_a, _, wrapper_a = build()
    train_steps(model_a, wrapper_a, data)

    model_b, opt_b, wrapper_b = build()
    train_steps(model_b, wrapper_b, data[:3])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "wrapper": wrapper_b.state_dict()}, path)

    model_c, opt_c, wrapper_c = build()  # fresh objects, as after a restart
    ckpt = torch.load(path)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    wrapper_c.load_state_dict(ckpt["wrapper"])
    assert wrapper_c.step_count == 3 and model_c.conv1.mgs_mix == model_b.conv1.mgs_mix
    train_steps(model_c, wrapper_c, data[3:])

    for (name, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pa, pc), name
    assert model_a.conv1.mgs_mix == model_c.conv1.mgs_mix


def test_load_state_dict_checks_total_steps():
    model = TinySeg()
    wrapper = TrainingWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5)
    other = TrainingWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=7)
    with pytest.raises(ValueError, match="total_steps=5"):
        other.load_state_dict(wrapper.state_dict())
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"step": 1})


def test_wrapper_argument_errors_and_warnings():
    model = TinySeg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        TrainingWrapper(model, opt, total_steps=0)
    with pytest.raises(TypeError, match="MGS"):
        TrainingWrapper(model, opt, total_steps=3, mgs=0.5)
    dense = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="no l1fx ℓ1 layers"):
        TrainingWrapper(dense, torch.optim.SGD(dense.parameters(), lr=0.1), total_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the schedule alone on a dense model is a legitimate use
        TrainingWrapper(dense, torch.optim.SGD(dense.parameters(), lr=0.1), total_steps=3,
                        mgs=None, dlc=DLC(scale_gradients=False))
    with pytest.warns(UserWarning, match="conv2.weight"):
        TrainingWrapper(model, torch.optim.SGD([model.conv1.weight], lr=0.1), total_steps=3)


# ---------------------------------------------------------------- step() checks before it touches anything
def training_state(model, opt, wrapper):
    """Everything a failed step must leave as it was."""
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()},
            [g["lr"] for g in opt.param_groups], wrapper.step_count, model.conv1.mgs_mix)


def assert_same_state(a, b):
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                vx, vy = x[k], y[k]
                if isinstance(vx, dict):
                    assert vx.keys() == vy.keys() and all(
                        torch.equal(vx[j], vy[j]) if torch.is_tensor(vx[j]) else vx[j] == vy[j] for j in vx), k
                else:
                    assert torch.equal(vx, vy), k
        else:
            assert x == y


def test_removed_param_group_raises_before_the_optimizer_moves_anything():
    model = TinySeg()
    l1 = [model.conv1.weight, model.conv2.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in l1)]
    opt = torch.optim.SGD([{"params": l1}, {"params": rest}], lr=0.05, momentum=0.9)
    wrapper = TrainingWrapper(model, opt, total_steps=6)
    train_steps(model, wrapper, batches(2))
    del opt.param_groups[1]  # the wrapper cannot tell which base learning rate belonged to it
    x, y = batches(1, seed=5)[0]
    wrapper.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before = training_state(model, opt, wrapper)
    with pytest.raises(TrainingError, match="removed after the TrainingWrapper was built"):
        wrapper.step()
    # Nothing moved: parameters, gradients (no DLC scaling either), momentum buffers, lrs, the step count.
    assert_same_state(before, training_state(model, opt, wrapper))


def test_param_group_added_later_is_adopted_and_scheduled():
    model = TinySeg()
    head = list(model.head.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if all(p is not q for q in head)], lr=0.05)
    for p in head:
        p.requires_grad_(False)  # a frozen head, unfrozen after two steps (e.g. progressive fine-tuning)
    wrapper = TrainingWrapper(model, opt, total_steps=4)
    train_steps(model, wrapper, batches(2))
    for p in head:
        p.requires_grad_(True)
    opt.add_param_group({"params": head, "lr": 0.2})
    frozen = [p.detach().clone() for p in head]
    train_steps(model, wrapper, batches(1, seed=3))
    assert wrapper.step_count == 3 and wrapper.base_lrs == [0.05, 0.2]
    assert all(not torch.equal(p, q) for p, q in zip(head, frozen))  # trained from its first step
    assert opt.param_groups[1]["lr"] == pytest.approx(0.2 * DLC().lr_factor(3 / 4))  # follows the schedule


@pytest.mark.parametrize("bad", ["lr", "mgs"])
def test_schedule_failing_at_the_next_step_raises_before_the_step(bad):
    model = TinySeg()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if bad == "lr":
        wrapper = TrainingWrapper(model, opt, total_steps=4, dlc=DLC(lr_schedule=lambda p: 1.0 if p < 0.4 else
                                                                     float("nan")))
    else:
        wrapper = TrainingWrapper(model, opt, total_steps=4, mgs=MGS(schedule=lambda p: p if p < 0.4 else 2.0))
    train_steps(model, wrapper, batches(1))
    x, y = batches(1, seed=4)[0]
    wrapper.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before = training_state(model, opt, wrapper)
    with pytest.raises(TrainingError, match="lr_schedule returned nan|schedule callable returned 2.0"):
        wrapper.step()
    assert_same_state(before, training_state(model, opt, wrapper))


def test_shared_l1_weight_is_scaled_once():
    layer = L1Linear(4, 4)
    model = nn.Sequential(layer, nn.LayerNorm(4), layer)
    wrapper = TrainingWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=3, dlc=DLC(eta=1.0))
    assert len(wrapper.l1_modules) == 1 and len(wrapper.l1_weights) == 1
    model(torch.randn(5, 4)).sum().backward()
    wrapper.step()
    assert layer.weight.grad.norm().item() == pytest.approx(4.0, rel=1e-5)  # eta * sqrt(16), once


def test_finds_l1_layers_through_compile_wrapper():
    model = TinySeg()
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    names = [n for n, _ in find_l1_modules(compiled)]
    assert names == ["_orig_mod.conv1", "_orig_mod.conv2"]
    wrapper = TrainingWrapper(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), total_steps=4,
                              mgs=MGS.constant(0.25))
    assert model.conv1.mgs_mix == 0.25 and len(wrapper.l1_weights) == 2


def test_step_under_bfloat16_autocast():
    model = nn.Sequential(L1Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = TrainingWrapper(model, opt, total_steps=4)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(2):
        wrapper.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        assert model[0].weight.grad.dtype == torch.float32
        wrapper.step()
    for b, p in zip(before, model.parameters()):
        assert torch.isfinite(p).all() and not torch.equal(b, p)


def test_step_with_grad_scaler_unscales_before_dlc():
    model = TinySeg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = TrainingWrapper(model, opt, total_steps=4, mgs=None, dlc=DLC(eta=0.5))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batches(1)[0]
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    head_grad_scaled = model.head.weight.grad.clone()
    wrapper.step(scaler=scaler)
    torch.testing.assert_close(model.head.weight.grad, head_grad_scaled / 1024.0)
    assert model.conv1.weight.grad.norm().item() == pytest.approx(0.5 * math.sqrt(24), rel=1e-5)
    assert wrapper.step_count == 1


# ---------------------------------------------------------------- DDP, two gloo processes on CPU
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
        model = nn.parallel.DistributedDataParallel(TinySeg())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        wrapper = TrainingWrapper(model, opt, total_steps=4)
        assert len(wrapper.l1_modules) == 2  # found through DDP's .module
        start = [p.detach().clone() for p in model.parameters()]
        train_steps(model, wrapper, batches(4, seed=10 + rank))  # different data on each rank
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        moved = not all(torch.equal(a, p) for a, p in zip(start, model.parameters()))
        torch.save({"equal": all(torch.equal(gathered[0], g) for g in gathered), "moved": moved,
                    "mix": model.module.conv1.mgs_mix}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_stay_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["equal"] and result["moved"]
        assert result["mix"] == 0.0
