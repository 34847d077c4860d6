"""Equal tuning in the part-segmentation study: the learning-rate grid, the validation split, the selection rule."""
import json
import math

import pytest
import torch

from l1fx.study import select_best, stratified_split

from test_examples import TINY, load_example  # the same tiny widths and a fresh copy of the example module


def test_stratified_split_is_balanced_disjoint_fixed_and_leaves_the_rng_alone():
    groups = torch.tensor([0, 1, 2] * 10 + [0, 0])  # 12 of group 0, 10 of groups 1 and 2
    state = torch.random.get_rng_state()
    keep, held = stratified_split(groups, 7, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(held) == 7 and len(keep) == len(groups) - 7
    assert set(keep.tolist()).isdisjoint(held.tolist()) and set(keep.tolist()) | set(held.tolist()) == set(range(32))
    counts = torch.bincount(groups[held], minlength=3).tolist()
    assert sorted(counts) == [2, 2, 3]  # as even as 7 over 3 groups allows
    again = stratified_split(groups, 7, seed=3)
    assert torch.equal(again[1], held) and torch.equal(again[0], keep)
    assert not torch.equal(stratified_split(groups, 7, seed=4)[1], held)  # the seed picks which items
    one_group = stratified_split(torch.tensor([1] * 3 + [0]), 3)[1]  # a small group runs out: the others fill in
    assert len(one_group) == 3 and 3 in one_group.tolist()
    for bad in (0, 32, -1):
        with pytest.raises(ValueError, match="count"):
            stratified_split(groups, bad)


def test_select_best_takes_the_best_mean_and_never_a_diverged_run():
    runs = [dict(k="a", lr=0.05, s=70.0), dict(k="a", lr=0.05, s=74.0),   # mean 72
            dict(k="a", lr=0.5, s=73.0), dict(k="a", lr=0.5, s=72.0),     # mean 72.5: best
            dict(k="a", lr=5.0, s=99.0), dict(k="a", lr=5.0, s=math.nan),  # one seed diverged: worst
            dict(k="b", lr=0.5, s=10.0), dict(k="b", lr=0.05, s=10.0)]    # a tie: the smaller lr
    got = select_best(runs, lambda r: r["k"], lambda r: r["lr"], lambda r: r["s"])
    assert got["a"]["best"] == 0.5 and got["b"]["best"] == 0.05
    assert list(got["a"]["scores"]) == [0.05, 0.5, 5.0] and got["a"]["scores"][0.05] == [70.0, 74.0]
    only_bad = select_best([dict(lr=1.0, s=math.inf)], lambda r: 0, lambda r: r["lr"], lambda r: r["s"])
    assert only_bad[0]["best"] == 1.0  # a choice is still made, and the table shows why it is bad


def test_lr_options_parse_and_reject_bad_values():
    example = load_example()
    args = example.parse_args(["--quick", "--lr-grid", "0.05,0.5,5", "--val", "16"])
    assert args.lrs == [0.05, 0.5, 5.0] and args.val == 16 and args.lr == 0.05
    assert example.parse_args(["--quick", "--lr", "0.2"]).lrs == [0.2]
    assert example.parse_args(["--quick"]).lrs == [0.05] and example.parse_args(["--quick"]).val == 0
    assert example.parse_args(["--quick", "--optimizer", "adamw"]).lrs == [1e-3]
    for bad in (["--lr-grid", "0.1,x"], ["--lr-grid", "0,1"], ["--lr-grid", "0.1", "--lr", "0.2"],
                ["--lr-from", "x", "--lr-grid", "1"], ["--val", "64"], ["--val", "-1"], ["--lr", "-1"]):
        with pytest.raises(SystemExit):
            example.parse_args(["--quick", *bad])


def test_a_validation_split_that_leaves_less_than_a_batch_is_a_usage_error(capsys):
    example = load_example()
    with pytest.raises(SystemExit) as e:
        example.parse_args(["--quick", "--val", "60"])  # 64 training shapes, batch 16: 4 left
    assert e.value.code == 2
    assert "--val 60 leaves 4 training shapes, fewer than one batch" in capsys.readouterr().err


def test_validation_split_keeps_the_data_type_and_is_held_out_of_training():
    example = load_example()
    train, _ = example.make_part_segmentation(24, 2, 16, seed=0)
    keep, val = example.split_validation(train, 6)
    assert len(keep) == 18 and len(val) == 6 and val.classes == train.classes and val.num_parts == train.num_parts
    pts = {tuple(p.flatten().tolist()) for p in keep.points}
    assert not any(tuple(p.flatten().tolist()) in pts for p in val.points)  # no shape in both
    assert sorted(torch.bincount(val.categories, minlength=train.num_categories).tolist())[-1] <= 1 + \
        sorted(torch.bincount(val.categories, minlength=train.num_categories).tolist())[0]


def test_grid_on_validation_then_lr_from_runs_each_variant_at_its_choice(tmp_path, monkeypatch, capsys):
    """--val --lr-grid scores every (variant, lr) on the held-out shapes (never the test set); --lr-from then
    runs each variant at its best validation lr and scores on the test set; paired gaps and curves come out."""
    example = load_example()
    monkeypatch.setitem(example.PRESETS["quick"], "models", TINY)
    common = ["--quick", "--models", "pointnet", "--variants", "baseline,l1-mgs", "--ratios=", "--epochs", "2",
              "--train", "16", "--test", "8", "--points", "32", "--batch", "4", "--no-progress", "--speed-repeats", "0"]
    sizes = []
    real_evaluate = example.evaluate
    monkeypatch.setattr(example, "evaluate", lambda model, loader, *a: sizes.append(len(loader.dataset)) or
                        real_evaluate(model, loader, *a))
    grid = example.main(common + ["--val", "4", "--lr-grid", "0.01,0.1", "--out", str(tmp_path / "grid")])
    assert set(sizes) == {4}  # only the 4 held-out shapes were scored, never the 8 test shapes
    assert sorted((r["variant"], r["lr"]) for r in grid) == [("baseline", 0.01), ("baseline", 0.1),
                                                             ("l1-mgs", 0.01), ("l1-mgs", 0.1)]
    assert all(r["eval"] == "val" and r["cpu_seconds"] > 0 and r["steps"] == 2 * 3 for r in grid)  # 12 shapes
    md = (tmp_path / "grid" / "results.md").read_text()
    assert "Learning-rate grid (final instance mIoU on the validation split" in md and "| lr 0.01 | lr 0.1 |" in md
    assert "not the test set" in md
    best = {r["variant"]: max((x for x in grid if x["variant"] == r["variant"]),
                              key=lambda x: (x["final"]["instance_miou"], -x["lr"]))["lr"] for r in grid}
    sizes.clear()
    tuned = example.main(common + ["--seeds", "2", "--lr-from", str(tmp_path / "grid"), "--out", str(tmp_path / "t")])
    assert set(sizes) == {8} and all(r["eval"] == "test" and r["steps"] == 2 * 4 for r in tuned)
    assert {(r["variant"], r["seed"]): r["lr"] for r in tuned} == {(v, s): best[v] for v in best for s in (0, 1)}
    assert "lr for pointnet l1-mgs ratio 1.00" in capsys.readouterr().out
    md = (tmp_path / "t" / "results.md").read_text()
    assert "Gap to the baseline of the same seed" in md and "| pointnet | 8 | l1-mgs | 1.00 |" in md
    saved = json.loads((tmp_path / "t" / "results.json").read_text())["results"]
    by = {(r["variant"], r["seed"]): r["final"]["instance_miou"] for r in saved}
    gaps = [by[("l1-mgs", s)] - by[("baseline", s)] for s in (0, 1)]
    assert f"{gaps[0]:+.1f}, {gaps[1]:+.1f}" in md
    assert (tmp_path / "t" / "gap_pointnet.png").read_bytes()[:4] == b"\x89PNG"
    # a learning rate is never chosen from test-set runs, nor for a configuration the grid did not run
    for source, more in ((tmp_path / "t", []), (tmp_path / "grid", ["--variants", "l1-dlc"])):
        with pytest.raises(SystemExit) as e:
            example.main(common + more + ["--lr-from", str(source), "--out", str(tmp_path / "x")])
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        example.main(common + ["--lr-from", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])


def test_ratio_unit_layer_converts_the_first_layers_where_units_cannot_tell_the_ratios_apart():
    """PointNet has two convert units (the encoder MLP, the head MLP + classifier): ratios 1/3 and 2/3 both
    convert the 3-layer encoder; --ratio-unit layer converts the first 2 and 4 of its 6 layers."""
    from l1fx.models import build_model
    from l1fx.nn import L1Module

    example = load_example()
    torch.manual_seed(0)
    model = build_model("pointnet", num_parts=5, num_categories=2, **TINY["pointnet"])

    def l1_names(m):
        return sorted(n for n, x in m.named_modules() if isinstance(x, L1Module))

    units = [l1_names(example.to_l1(model, r)) for r in (0.333, 0.667)]
    assert units[0] == units[1] and len(units[0]) == 2  # TINY's encoder has 2 layers, the whole model 4
    layers = [l1_names(example.to_l1(model, r, ratio_unit="layer")) for r in (0.25, 0.5, 0.75)]
    assert layers == [["encoder.0.0"], ["encoder.0.0", "encoder.1.0"], ["encoder.0.0", "encoder.1.0", "head.0"]]
    assert len(l1_names(example.to_l1(model, 1.0, ratio_unit="layer"))) == 4
    assert example.parse_args(["--quick", "--ratio-unit", "layer"]).ratio_unit == "layer"
    with pytest.raises(SystemExit):
        example.parse_args(["--quick", "--ratio-unit", "block"])


def test_lr_from_refuses_folders_that_mix_budgets_or_ratio_units(tmp_path, capsys):
    example = load_example()

    def run(steps, lr, ratio=1.0, unit="-"):
        return {"model": "pointnet", "variant": "baseline", "ratio": ratio, "ratio_unit": unit, "seed": 0,
                "steps": steps, "lr": lr, "eval": "val", "final": {"instance_miou": 50.0}}

    for name, runs, message in (
            ("budgets", [run(288, 0.05), run(864, 0.5)], "runs of different budgets (steps)"),
            ("units", [run(288, 0.05), run(288, 0.05, 0.5, "layer")], "its ratio runs count layer"),
            ("broken", "not a list", "cannot read the results there")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"results": runs}))
        args = example.parse_args(["--quick", "--models", "pointnet", "--variants", "baseline", "--ratios=",
                                   "--lr-from", str(folder)])
        with pytest.raises(SystemExit) as e:
            example.chosen_lrs(args)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_from_results_that_cannot_be_read_is_a_usage_error(tmp_path, capsys):
    example = load_example()
    with pytest.raises(SystemExit) as e:
        example.main(["--quick", "--from-results", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--from-results" in capsys.readouterr().err
