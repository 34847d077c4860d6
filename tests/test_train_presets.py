"""The paper presets (MGS.paper, DLC.paper), DLC under Adam-type optimizers (update mode), the study scaffolding."""
import math

import pytest
import torch
from torch import nn

from l1fx.errors import TrainingError
from l1fx.study import VARIANTS, make_optimizer, mean_std, schedules, step_time, summarize
from l1fx.train import ADAPTIVE_OPTIMIZERS, DLC, MGS, TrainingWrapper

from test_train import TinySeg, batches, train_steps


# ---------------------------------------------------------------- presets compute the documented schedules
def test_mgs_paper_step_unit_is_lam_to_the_step():
    mgs = MGS.paper(lam=0.99, unit="step")
    for k in (0, 1, 2, 10, 100, 287):
        assert mgs.value(k, 288) == pytest.approx(0.99 ** k, rel=1e-12)
    assert mgs.value(10, 20) == mgs.value(10, 5000)  # independent of total_steps
    assert MGS.paper(lam=0.5).value(3, 10) == 0.125


def test_mgs_paper_epoch_unit_counts_whole_epochs():
    mgs = MGS.paper(lam=0.9, unit="epoch", steps_per_epoch=12)
    assert [mgs.value(s, 100) for s in (0, 11)] == [1.0, 1.0]
    assert mgs.value(12, 100) == pytest.approx(0.9) and mgs.value(23, 100) == pytest.approx(0.9)
    assert mgs.value(24, 100) == pytest.approx(0.81)
    assert MGS(schedule="exponential", lam=0.5, warmup_steps=2).value(1, 10) == 1.0  # held during warm-up
    assert MGS(schedule="exponential", lam=0.5, warmup_steps=2).value(4, 10) == 0.25
    assert MGS(schedule="exponential", lam=0.5, start=0.8, end=0.2).value(1, 10) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(unit="epoch"), "steps_per_epoch"), (dict(unit="epoch", steps_per_epoch=0), "steps_per_epoch"),
    (dict(unit="step", steps_per_epoch=3), "takes no steps_per_epoch"), (dict(unit="iteration"), "unit"),
    (dict(lam=0.0), "lam"), (dict(lam=1.5), "lam")])
def test_mgs_paper_rejects_bad_arguments(kwargs, match):
    with pytest.raises(TrainingError, match=match):
        MGS.paper(**kwargs)


def test_dlc_paper_is_plain_cosine_with_the_per_layer_scaling():
    dlc = DLC.paper()
    assert dlc.scale_gradients and dlc.eta == 0.2 and dlc.mode == "auto"
    for p in (0.0, 0.1, 0.5, 0.75, 0.94, 1.0):
        assert dlc.lr_factor(p) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert DLC.paper(eta=0.5, groups="l1").eta == 0.5 and DLC.paper(groups="l1").groups == "l1"
    with pytest.raises(TrainingError, match="mode"):
        DLC(mode="adam")


def test_mode_auto_picks_update_for_adaptive_and_gradient_for_sgd():
    p = [nn.Parameter(torch.zeros(2))]
    assert DLC().mode_for(torch.optim.SGD(p, lr=0.1)) == "gradient"
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop):
        assert cls in ADAPTIVE_OPTIMIZERS and DLC().mode_for(cls(p, lr=0.1)) == "update"
    assert DLC(mode="gradient").mode_for(torch.optim.AdamW(p)) == "gradient"


# ---------------------------------------------------------------- the AdamW path: scaling, schedules, resume
def _adamw_wrapper(mode="auto", lr=1e-2, total=8, **dlc):
    torch.manual_seed(0)
    model = TinySeg()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    return model, opt, TrainingWrapper(model, opt, total, mgs=MGS.paper(0.9), dlc=DLC.paper(mode=mode, **dlc))


def test_adamw_update_mode_gives_every_l1_layer_an_update_of_rms_update_eta_times_lr():
    model, opt, wrapper = _adamw_wrapper(update_eta=0.5)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model.conv1.weight.grad.mul_(1e-20)  # a vanishing gradient: Adam's eps would swallow it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    lr = opt.param_groups[0]["lr"]
    wrapper.step()
    for name in ("conv1.weight", "conv2.weight"):
        delta = model.get_parameter(name).detach() - before[name]
        assert delta.pow(2).mean().sqrt().item() == pytest.approx(0.5 * lr, rel=1e-5), name
        assert torch.equal(model.get_parameter(name).grad, grads[name])  # the gradient is not touched
    # everything else took AdamW's own step
    ref = TinySeg()
    ref.load_state_dict({k: v for k, v in before.items()}, strict=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=1e-4)
    for n, p in ref.named_parameters():
        p.grad = grads[n]
    ref_opt.step()
    torch.testing.assert_close(model.head.weight, ref.head.weight, rtol=0, atol=0)
    # the schedules advance as under SGD
    assert model.conv1.mgs_mix == pytest.approx(0.9) and opt.param_groups[0]["lr"] == pytest.approx(
        1e-2 * DLC.paper().lr_factor(1 / 8))


def test_adamw_gradient_mode_mostly_cancels_and_update_mode_does_not():
    """The reason for update mode: under Adam a per-layer gradient factor changes the first step not at all."""
    steps = {}
    for mode in (None, "gradient", "update"):
        torch.manual_seed(0)
        model = TinySeg()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        dlc = DLC(scale_gradients=False) if mode is None else DLC(mode=mode, eta=5.0, update_eta=0.1)
        wrapper = TrainingWrapper(model, opt, 4, mgs=None, dlc=dlc)
        w0 = model.conv2.weight.detach().clone()
        x, y = batches(1)[0]
        nn.functional.cross_entropy(model(x), y).backward()
        wrapper.step()
        steps[mode] = (model.conv2.weight.detach() - w0).pow(2).mean().sqrt().item()
    assert steps["gradient"] == pytest.approx(steps[None], rel=1e-4)  # Adam's first step is lr * sign(g)
    assert steps["update"] == pytest.approx(0.1 * 1e-2, rel=1e-5)


def test_adamw_update_mode_keeps_zero_updates_zero():
    model, opt, wrapper = _adamw_wrapper()
    for p in (model.conv1.weight,):
        p.requires_grad_(False)
    w0 = model.conv1.weight.detach().clone()
    train_steps(model, wrapper, batches(2))
    assert torch.equal(model.conv1.weight, w0) and torch.isfinite(model.conv2.weight).all()


@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_adamw_resume_via_save_checkpoint_is_bit_exact(tmp_path, mode):
    from l1fx.checkpoint import load_checkpoint, save_checkpoint

    data = batches(8)
    model_a, _, wrapper_a = _adamw_wrapper(mode)
    train_steps(model_a, wrapper_a, data)
    model_b, opt_b, wrapper_b = _adamw_wrapper(mode)
    train_steps(model_b, wrapper_b, data[:3])
    save_checkpoint(tmp_path / "last.pt", model=model_b, optimizer=opt_b, wrapper=wrapper_b, step=3)
    model_c, opt_c, wrapper_c = _adamw_wrapper(mode)
    assert load_checkpoint(tmp_path / "last.pt", model=model_c, optimizer=opt_c, wrapper=wrapper_c)["step"] == 3
    assert model_c.conv1.mgs_mix == pytest.approx(0.9 ** 3)
    train_steps(model_c, wrapper_c, data[3:])
    for (name, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pa, pc), name
    assert opt_c.param_groups[0]["lr"] == wrapper_a.optimizer.param_groups[0]["lr"]


def test_sgd_is_unchanged_by_the_mode_option():
    """auto == gradient for SGD, bit for bit (the SGD recipe is exactly what it was)."""
    finals = []
    for mode in ("auto", "gradient"):
        torch.manual_seed(0)
        model = TinySeg()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        train_steps(model, TrainingWrapper(model, opt, 4, dlc=DLC(mode=mode)), batches(4))
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(*finals)


# ---------------------------------------------------------------- the shared study scaffolding
def test_study_schedules_of_the_ablation():
    for recipe in ("default", "cosine", "paper"):
        got = {v: schedules(v, 0.3, recipe, steps_per_epoch=4) for v in VARIANTS}
        assert got["baseline"][0] is None and not got["baseline"][1].scale_gradients
        assert got["l1-vanilla"][0] == MGS.constant(0.0) and not got["l1-vanilla"][1].scale_gradients
        assert got["l1-dlc"][0] == MGS.constant(0.0) and got["l1-dlc"][1].eta == 0.3
        assert got["l1-mgs"][0] == got["l1-mgs-dlc"][0] != MGS.constant(0.0)
        if recipe != "default":  # one learning-rate schedule for every variant
            assert len({tuple(d.lr_factor(p) for p in (0.0, 0.3, 0.8)) for _, d in got.values()}) == 1
    assert schedules("l1-mgs", recipe="paper", mgs_unit="epoch", steps_per_epoch=4)[0].value(4, 99) == 0.99
    assert schedules("l1-dlc", recipe="default")[1] == DLC()
    with pytest.raises(ValueError, match="recipe"):
        schedules("l1-dlc", recipe="fast")


def test_study_helpers():
    p = [nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(p, "adamw"), torch.optim.AdamW) and make_optimizer(p, "adamw").defaults["lr"] == 1e-3
    sgd = make_optimizer(p, "sgd", 0.1)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    assert mean_std([1.0, 3.0]) == "2.00 ± 1.41" and mean_std([2.0]) == "2.00"
    s = summarize([{"m": "a", "v": 1}, {"m": "a", "v": 3}, {"m": "b", "v": 5}], lambda r: r["m"], {"v": lambda r: r["v"]})
    assert s == {"a": {"v": [1, 3]}, "b": {"v": [5]}}
    calls = []
    t = step_time({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=3, warmup=1)
    assert calls == ["x", "y"] * 4 and set(t) == {"x", "y"} and all(v >= 0 for v in t.values())


def test_reestimate_norm_stats_averages_over_the_batches_and_restores_state():
    from l1fx.train import reestimate_norm_stats

    model = TinySeg().eval()
    model.bn1.momentum = 0.3
    data = [x for x, _ in batches(3)]
    reestimate_norm_stats(model, data, forward=lambda m, x: m(x))
    assert not model.training and model.bn1.momentum == 0.3 and int(model.bn1.num_batches_tracked) == 3
    with torch.no_grad():
        means = [model.conv1(x).mean(dim=(0, 2)) for x in data]
    torch.testing.assert_close(model.bn1.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-5)
    model.train()
    reestimate_norm_stats(model, [(x,) for x in data])  # tuples are unpacked
    assert model.training
