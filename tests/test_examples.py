"""The bundled point networks and the part-segmentation example, end to end on a tiny config."""
import json
import math

import pytest
import torch
import torch.fx

from l1fx.models import MODELS, build_model
from l1fx.nn import L1Module
from l1fx.train import TrainingWrapper

import example_loader  # tests/example_loader.py

TINY = {
    "pointnet": dict(encoder=(8, 16), head=(16,)),
    "pointnet2": dict(npoint=(16, 4), nsample=(4, 4), sa_mlps=((8,), (8, 16), (16,)), fp_mlps=((16,), (8,), (8,)),
                      head=8),
    "voxelcnn": dict(resolution=4, widths=(4, 8), head=8),
}


def load_example():
    return example_loader.load_example("part_segmentation.py", "part_segmentation_example")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_traces_converts_and_trains_a_step(name):
    torch.manual_seed(0)
    model = build_model(name, num_parts=5, num_categories=2, **TINY[name])
    points, category = torch.rand(2, 3, 32) * 2 - 1, torch.tensor([0, 1])
    out = model(points, category)
    assert out.shape == (2, 5, 32)
    traced = torch.fx.symbolic_trace(model)  # geometry helpers stay single leaf calls
    torch.testing.assert_close(traced(points, category), out)
    example = load_example()
    l1_model = example.to_l1(model, 1.0)
    assert any(isinstance(m, L1Module) for m in l1_model.modules())
    assert not any(isinstance(m, L1Module) for m in model.modules())  # the original is left alone
    opt = torch.optim.SGD(l1_model.parameters(), lr=0.05, momentum=0.9)
    wrapper = TrainingWrapper(l1_model, opt, total_steps=2)
    loss = torch.nn.functional.cross_entropy(l1_model(points, category), torch.randint(0, 5, (2, 32)))
    loss.backward()
    wrapper.step()
    assert math.isfinite(loss.item()) and wrapper.mix == pytest.approx(0.5)  # cosine, halfway


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="pointnet2"):
        build_model("dgcnn", 4, 2)


def test_part_segmentation_example_quick_two_seeds_end_to_end(tmp_path, monkeypatch):
    """``--quick --seeds 2``: every variant of the ablation, the ratios for every model, mean ± std, curves, speed."""
    example = load_example()
    monkeypatch.setitem(example.PRESETS["quick"], "models", TINY)  # the --quick run itself is larger
    threads = torch.get_num_threads()
    results = example.main(["--quick", "--seeds", "2", "--epochs", "1", "--train", "16", "--test", "8",
                            "--points", "32", "--batch", "8", "--out", str(tmp_path), "--no-progress",
                            "--speed-repeats", "1"])
    assert torch.get_num_threads() == threads  # --threads is put back
    runs = {(r["model"], r["variant"], round(r["ratio"], 2), r["seed"]) for r in results}
    assert len(runs) == len(results) == 3 * 5 * 2 + 3 * 2 * 2
    assert runs == {(m, v, 1.0, s) for m in MODELS for v in example.VARIANTS for s in (0, 1)} | \
        {(m, "l1-mgs-dlc", r, s) for m in MODELS for r in (0.33, 0.67) for s in (0, 1)}
    for r in results:
        assert r["finite"] and 0 <= r["final"]["instance_miou"] <= 100 and r["steps"] == 2
        assert (r["l1_layers"] == 0) == (r["variant"] == "baseline") and r["seconds"] > 0
        assert len(r["history"]["test_miou"]) == 1 and r["init"] in ("-", "data")
    # the two seeds differ (initial weights and batch order), the variants of one seed share the data
    by = {(r["model"], r["variant"], r["ratio"], r["seed"]): r for r in results}
    assert by[("pointnet", "baseline", 1.0, 0)]["final"] != by[("pointnet", "baseline", 1.0, 1)]["final"]
    ablation = sorted((r["ratio"], r["l1_layers"]) for r in results if r["model"] == "pointnet2"
                      and r["variant"] == "l1-mgs-dlc")
    assert [n for _, n in ablation] == sorted(n for _, n in ablation) and ablation[0][1] < ablation[-1][1]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["results"]) == len(results) and "--quick" in saved["command"] and saved["seconds"] > 0
    assert set(saved["speed"]) == set(MODELS) and all(v["ratio"] > 0 for v in saved["speed"].values())
    md = (tmp_path / "results.md").read_text()
    assert "mean ± std over 2 seeds" in md and "| pointnet | l1-dlc |  | ✓ |" in md and " ± " in md
    assert "| voxelcnn | 0.33 |" in md and "ℓ1 ÷ dense" in md
    for name in MODELS:
        png = tmp_path / f"curves_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --from-results combines earlier runs, e.g. a longer-budget run, without training
    longer = [dict(r, steps=4) for r in saved["results"] if r["model"] == "pointnet2" and r["ratio"] == 1.0]
    (tmp_path / "longer.json").write_text(json.dumps({"results": longer}))
    merged = tmp_path / "merged"
    again = example.main(["--from-results", f"{tmp_path},{tmp_path / 'longer.json'}", "--out", str(merged)])
    assert len(again) == len(results) + len(longer)
    md = (merged / "results.md").read_text()
    assert "Longer budgets (4 steps)" in md and "ℓ1 ÷ dense" in md
    assert (merged / "budget_pointnet2.png").read_bytes()[:4] == b"\x89PNG" and not (merged / "budget_pointnet.png").exists()


def test_part_segmentation_options():
    example = load_example()
    args = example.parse_args(["--quick", "--budget", "2.5", "--optimizer", "adamw"])
    assert args.epochs == 5 and args.lr == 1e-3 and args.recipe == "cosine"
    assert example.parse_args(["--epochs", "10", "--budget", "3"]).epochs == 30
    assert example.parse_args(["--quick"]).lr == 0.05
    for bad in (["--budget", "0"], ["--ratios", "1.0"], ["--seeds", "0"], ["--optimizer", "lion"],
                ["--ratio-models", "dgcnn"]):
        with pytest.raises(SystemExit):
            example.parse_args(["--quick", *bad])
    # the variants of one (model, seed) start from the same dense weights; AdamW gets the update-mode DLC
    data = example.make_part_segmentation(16, 2, 16, seed=0)[0]
    args = example.parse_args(["--quick", "--optimizer", "adamw"])
    args.model_kwargs = TINY
    _, opt, wrapper = example.build_run(args, "pointnet", "l1-mgs-dlc", 1.0, 0, data, 10, 2)
    assert isinstance(opt, torch.optim.AdamW) and wrapper.dlc.mode_for(opt) == "update"
    base = example.build_model_for(args, "pointnet", "baseline", 1.0, 3, data)
    again = example.build_model_for(args, "pointnet", "baseline", 1.0, 3, data)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), again.state_dict().values()))


def test_init_option_reaches_convert():
    example = load_example()
    assert example.parse_args(["--quick"]).init == "data"
    assert example.parse_args(["--quick", "--init", "10"]).init == 10.0
    assert example.parse_args(["--quick", "--init", "dense"]).init == "dense"
    with pytest.raises(SystemExit):
        example.parse_args(["--quick", "--init", "-1"])
    torch.manual_seed(0)
    model = build_model("pointnet", num_parts=5, num_categories=2, **TINY["pointnet"])
    inputs = (torch.rand(4, 3, 32) * 2 - 1, torch.tensor([0, 1, 0, 1]))
    dense = example.to_l1(model, 1.0)
    l1_names = {n for n, m in dense.named_modules() if isinstance(m, L1Module)}
    for init in ("data", 10.0):
        other = example.to_l1(model, 1.0, init, inputs if init == "data" else None)
        for key, value in dense.state_dict().items():
            changed = not torch.equal(other.state_dict()[key], value)
            assert changed == (key.rpartition(".")[0] in l1_names and key.endswith(".weight")), (init, key)
    batch = example.init_batch(example.make_part_segmentation(8, 2, 16, seed=0)[0], 4)
    assert batch[0].shape == (4, 3, 16) and batch[1].shape == (4,)


def test_norm_stats_reestimate_option_evaluates_with_precise_statistics():
    """--norm-stats reestimate: before each evaluation the norms' statistics are recomputed from training
    batches drawn by their own generator (the training order and the user's RNG are untouched)."""
    from l1fx.data import make_part_segmentation

    example = load_example()
    assert example.parse_args(["--norm-stats", "reestimate"]).norm_stats == "reestimate"
    assert example.parse_args([]).norm_stats == "running"
    train, test = make_part_segmentation(num_train=8, num_test=4, num_points=32, seed=0)
    state = torch.random.get_rng_state()
    batches = example.norm_batches(train, 4, 2, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state) and len(batches) == 2
    model = build_model("pointnet", train.num_parts, train.num_categories)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    bn.running_mean.fill_(1e3)  # stale statistics, as after a fast-moving l1 layer
    loader = torch.utils.data.DataLoader(test, batch_size=4)
    example.evaluate(model, loader, train.classes, batches)
    assert bn.running_mean.abs().max() < 1e2 and bn.momentum == 0.1  # recomputed; momentum put back
