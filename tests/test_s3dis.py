"""S3DIS scene segmentation: loader (both layouts), blocks, errors, metrics, generated scenes, models, example."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

import l1fx
from l1fx.data import S3DIS, S3DIS_CLASSES, evaluate_scenes, generate_scenes, scene_segmentation_metrics
from l1fx.errors import UsageError
from l1fx.models import SCENE_MODELS, build_scene_model
from l1fx.nn import L1Module
from l1fx.s3dis import confusion_matrix, room_blocks
from l1fx.train import TrainingWrapper

import example_loader  # tests/example_loader.py

LABEL = {name: i for i, name in enumerate(S3DIS_CLASSES)}


# ---------------------------------------------------------------- fixtures
def room_instances(rng, offset):
    """A 2.5 m x 1.5 m x 2 m room as {file name: rows x y z r g b}, in area coordinates."""
    def plane(n, z):
        return np.c_[rng.uniform(0, 2.5, n), rng.uniform(0, 1.5, n), np.full(n, z)]

    def colour(n, rgb):
        return np.tile(rgb, (n, 1))

    floor, ceiling = plane(300, 0.0), plane(300, 2.0)
    floor[0, :2], ceiling[0, :2] = (0.0, 0.0), (2.5, 1.5)  # pin the room's extent
    wall = np.c_[rng.uniform(0, 2.5, 200), np.zeros(200), rng.uniform(0, 2, 200)]
    chair = np.c_[rng.uniform(0.2, 0.6, 40), rng.uniform(0.2, 0.6, 40), rng.uniform(0, 0.9, 40)]
    stairs = np.c_[rng.uniform(2.0, 2.4, 20), rng.uniform(1.0, 1.4, 20), rng.uniform(0, 0.5, 20)]
    rows = {"ceiling_1.txt": np.c_[ceiling, colour(300, (250, 250, 250))],
            "chair_1.txt": np.c_[chair, colour(40, (10, 20, 30))],
            "floor_1.txt": np.c_[floor, colour(300, (100, 80, 60))],
            "stairs_1.txt": np.c_[stairs, colour(20, (0, 0, 255))],
            "wall_1.txt": np.c_[wall, colour(200, (200, 190, 180))]}
    for r in rows.values():
        r[:, :3] += offset
    return rows


def write_fixture(root: Path, layout: str) -> dict:
    """Areas 1 (two rooms) and 5 (one room); returns {room: (xyz shifted, labels)} as read in file order."""
    rng = np.random.default_rng(0)
    expected = {}
    for area, room in ((1, "office_1"), (1, "hallway_2"), (5, "office_3")):
        rows = room_instances(rng, offset=np.array([10.0 * area, -3.0, 1.5]))
        names = sorted(rows)
        data = np.concatenate([np.round(rows[n], 3) for n in names])
        labels = np.concatenate([np.full(len(rows[n]), LABEL.get(n.split("_")[0], LABEL["clutter"])) for n in names])
        if layout == "raw":
            ann = root / f"Area_{area}" / room / "Annotations"
            ann.mkdir(parents=True)
            for n in names:
                np.savetxt(ann / n, rows[n], fmt="%.3f %.3f %.3f %d %d %d")
            (ann / ".DS_Store").write_text("junk")  # hidden files are skipped, as in the real data
        else:
            shifted = data.copy()
            shifted[:, :3] -= shifted[:, :3].min(0)
            np.save(root / f"Area_{area}_{room}.npy", np.c_[shifted, labels])
        expected[f"Area_{area}/{room}"] = (data[:, :3] - data[:, :3].min(0), labels, data[:, 3:])
    return expected


@pytest.fixture(params=["raw", "npy"])
def fixture_root(request, tmp_path):
    return tmp_path, write_fixture(tmp_path, request.param), request.param


# ---------------------------------------------------------------- loader
def test_both_layouts_read_the_same_rooms_and_blocks(tmp_path):
    raw, npy = tmp_path / "raw", tmp_path / "npy"
    raw.mkdir(), npy.mkdir()
    write_fixture(raw, "raw"), write_fixture(npy, "npy")
    for split in ("train", "test"):
        a = S3DIS(raw, split=split, num_points=128, progress=False)
        b = S3DIS(npy, split=split, num_points=128, progress=False)
        assert (a.layout, b.layout) == ("raw", "npy") and len(a) == len(b) > 0
        assert [r.name for r in a.rooms] == [r.name for r in b.rooms]
        for i in range(len(a)):
            torch.testing.assert_close(a[i][0], b[i][0], atol=1e-5, rtol=0)
            assert torch.equal(a[i][1], b[i][1])
    assert [r.name for r in S3DIS(raw, split="train", progress=False).rooms] == ["Area_1/hallway_2", "Area_1/office_1"]


def test_rooms_are_shifted_and_labelled_as_collect_indoor3d_data_does(fixture_root):
    root, expected, _ = fixture_root
    ds = S3DIS(root, split="train", num_points=64, progress=False)
    for room in ds.rooms:
        xyz, labels, rgb = expected[room.name]
        np.testing.assert_allclose(room.xyz, xyz, atol=1e-5)
        np.testing.assert_array_equal(room.labels, labels)
        np.testing.assert_allclose(room.rgb * 255, rgb, atol=1e-3)
        np.testing.assert_allclose(room.extent, [2.5, 1.5, 2.0], atol=1e-5)
        assert LABEL["clutter"] in room.labels  # stairs_1.txt counted as clutter


def test_block_grid_counts_and_borders():
    xyz = np.array([[0, 0, 0], [1.0, 0.5, 0], [2.5, 1.5, 0], [1.7, 0.2, 0]], np.float32)
    # extent 2.5 x 1.5: ceil((2.5 - 1) / 1) + 1 = 3 by ceil((1.5 - 1) / 1) + 1 = 2 blocks, empty ones dropped;
    # x = 1.0 lies on the border of blocks (0, 0) and (1, 0), so it is in both
    assert [b.tolist() for b in room_blocks(xyz, 1.0, 1.0, 1)] == [[0, 1], [1, 3], [2]]
    assert [b.tolist() for b in room_blocks(xyz, 1.0, 1.0, 2)] == [[0, 1], [1, 3]]  # min_points
    # stride 0.5: x starts 0, 0.5, 1, 1.5 and y starts 0, 0.5
    assert [b.tolist() for b in room_blocks(xyz, 1.0, 0.5, 1)] == [[0, 1], [1], [1], [1], [1, 3], [1], [3], [2]]
    assert len(room_blocks(xyz[:1] * 0, 1.0, 0.5, 1)) == 1  # a room smaller than a block is one block


def test_train_items_sample_and_normalise_each_block(fixture_root):
    root, _, _ = fixture_root
    for num_points in (16, 512):  # fewer and more than the blocks' points
        ds = S3DIS(root, split="train", num_points=num_points, stride=0.5, min_block_points=10, progress=False)
        assert len(ds) == sum(len(room_blocks(r.xyz, 1.0, 0.5, 10)) for r in ds.rooms)
        for i in range(len(ds)):
            points, labels = ds[i]
            assert points.shape == (9, num_points) and points.dtype == torch.float32
            assert labels.shape == (num_points,) and labels.dtype == torch.int64
            r, idx = ds.point_index(i)
            room, block = ds.rooms[r], ds._items[i][1]
            assert set(idx.tolist()) <= set(block.tolist())
            if num_points >= len(block):
                assert set(idx.tolist()) == set(block.tolist())  # every point, plus repeats
            else:
                assert len(set(idx.tolist())) == num_points  # no repeats
            p = points.numpy()
            xmin = room.xyz[block, :2].min(0)
            np.testing.assert_allclose(p[0:2].T, room.xyz[idx, :2] - xmin - 0.5, atol=1e-6)
            assert p[0:2].min() >= -0.5 - 1e-6 and p[0:2].max() <= 0.5 + 1e-6
            np.testing.assert_allclose(p[2], room.xyz[idx, 2], atol=1e-6)
            np.testing.assert_allclose(p[3:6].T, room.rgb[idx], atol=1e-6)
            assert p[3:6].min() >= 0 and p[3:6].max() <= 1
            np.testing.assert_allclose(p[6:9].T * room.extent, room.xyz[idx], atol=1e-5)
            assert p[6:9].min() >= 0 and p[6:9].max() <= 1 + 1e-6
            assert torch.equal(labels, torch.from_numpy(room.labels[idx]))
    again = S3DIS(root, split="train", num_points=16, progress=False)
    first = again[0][0].clone()
    assert torch.equal(again[0][0], first)  # the same sample within an epoch
    again.set_epoch(1)
    assert not torch.equal(again[0][0], first)  # a new one the next epoch
    assert len(S3DIS(root, split="train", num_points=16, progress=False)) < \
        len(S3DIS(root, split="train", num_points=16, min_block_points=1, progress=False))  # PointNet's 100


def test_test_items_cover_every_point_and_vote_back(fixture_root):
    root, _, _ = fixture_root
    ds = S3DIS(root, split="test", num_points=100, progress=False)
    assert [r.name for r in ds.rooms] == ["Area_5/office_3"]
    room = ds.rooms[0]
    blocks = room_blocks(room.xyz, 1.0, 1.0, 1)
    assert len(ds) == sum(math.ceil(len(b) / 100) for b in blocks)
    covered = np.concatenate([ds.point_index(i)[1] for i in ds.room_items(0)])
    assert set(covered.tolist()) == set(range(len(room.labels)))
    assert torch.equal(ds[3][0], ds[3][0])  # fixed
    oracle = torch.nn.functional.one_hot(torch.stack([ds[i][1] for i in range(len(ds))]), 13).permute(0, 2, 1)
    np.testing.assert_array_equal(ds.room_prediction(0, oracle.float()), room.labels)
    scores = evaluate_scenes(lambda x: torch.zeros(x.shape[0], 13, x.shape[2]), ds)  # everything "ceiling"
    share = float(np.mean(room.labels == 0))
    assert scores.oa == pytest.approx(100 * share) and scores.points == len(room.labels)
    assert scores.iou["ceiling"] == pytest.approx(100 * share) and scores.iou["floor"] == 0.0


# ---------------------------------------------------------------- errors
def test_malformed_line_and_unknown_class_are_one_line_errors(tmp_path):
    write_fixture(tmp_path, "raw")
    wall = tmp_path / "Area_1" / "office_1" / "Annotations" / "wall_1.txt"
    lines = wall.read_text().splitlines()
    lines[2] = "1.0 2.0 3.0 4 5"  # a column short
    wall.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"wall_1\.txt:3: malformed line '1\.0 2\.0 3\.0 4 5'") as e:
        S3DIS(tmp_path, progress=False)
    assert "\n" not in str(e.value)
    lines[2] = "19.302 -9.160 1.785 185\x00187 182"  # the corruption of Area_5/hallway_6 ceiling_1.txt
    wall.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"wall_1\.txt:3:"):
        S3DIS(tmp_path, progress=False)
    wall.write_text("\n".join(lines[:2]) + "\n")
    (wall.parent / "lamp_1.txt").write_text("0 0 0 1 2 3\n")
    with pytest.raises(UsageError, match=r"lamp_1\.txt: class 'lamp' .* not one of the 13") as e:
        S3DIS(tmp_path, progress=False)
    assert "\n" not in str(e.value)


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(UsageError, match="no S3DIS rooms"):
        S3DIS(tmp_path, progress=False)
    write_fixture(tmp_path, "npy")
    with pytest.raises(UsageError, match="test_area 3 not found"):
        S3DIS(tmp_path, test_area=3, progress=False)
    with pytest.raises(UsageError, match="stride"):
        S3DIS(tmp_path, stride=1.5, progress=False)
    with pytest.raises(UsageError, match="split"):
        S3DIS(tmp_path, split="val", progress=False)
    with pytest.raises(UsageError, match="num_points"):
        S3DIS(tmp_path, num_points=0, progress=False)
    np.save(tmp_path / "Area_2_bad_1.npy", np.zeros((4, 6)))
    with pytest.raises(UsageError, match=r"Area_2_bad_1\.npy: expected an \[N, 7\]"):
        S3DIS(tmp_path, progress=False)
    np.save(tmp_path / "Area_2_bad_1.npy", np.c_[np.zeros((4, 6)), [0, 1, 13, 2]])
    with pytest.raises(UsageError, match=r"Area_2_bad_1\.npy: label 13\.0 \(row 2\)"):
        S3DIS(tmp_path, progress=False)


# ---------------------------------------------------------------- metrics
def test_metrics_match_a_hand_computation():
    # classes 0..3 of 4; class 3 occurs nowhere; class 2 is only predicted; one point unpredicted (-1)
    gt = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 0, 1, 1, 1, 2, -1, 0])
    s = scene_segmentation_metrics(pred, gt, num_classes=4, class_names=["a", "b", "c", "d"])
    # class 0: TP 3, FN 1 (the 1), FP 0 -> 3/4; class 1: TP 2, FP 1, FN 2 -> 2/5; class 2: TP 0, FP 1 -> 0
    assert s.iou == pytest.approx({"a": 75.0, "b": 40.0, "c": 0.0})
    assert s.miou == pytest.approx((75 + 40 + 0) / 3)
    assert s.oa == pytest.approx(100 * 5 / 8)
    assert s.macc == pytest.approx(100 * (3 / 4 + 2 / 4) / 2)
    conf = confusion_matrix(pred, gt, 4)
    assert conf.shape == (4, 5) and conf[1, 4] == 1 and conf.sum() == 8
    with pytest.raises(UsageError, match="labels must be in"):
        scene_segmentation_metrics(np.array([0]), np.array([13]))


# ---------------------------------------------------------------- generated scenes
def test_generator_is_deterministic_local_and_readable(tmp_path):
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    generate_scenes(tmp_path / "a", areas=(1, 5), rooms_per_area=2, points_per_room=3000, seed=1, layout="both",
                    progress=False)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    generate_scenes(tmp_path / "b", areas=(5,), rooms_per_area=1, points_per_room=3000, seed=1, progress=False)
    first = sorted((tmp_path / "a").glob("Area_5_*.npy"))
    room = [p for p in first if p.name == next((tmp_path / "b").glob("*.npy")).name]
    assert room and np.array_equal(np.load(room[0]), np.load(next((tmp_path / "b").glob("*.npy"))))
    labels = set()
    for path in (tmp_path / "a").glob("*.npy"):
        data = np.load(path)
        assert data.shape[1] == 7 and 0.8 * 3000 < len(data) <= 3000 + 40
        assert np.allclose(data[:, :3].min(0), 0) and data[:, 3:6].min() >= 0 and data[:, 3:6].max() <= 255
        lab = data[:, 6].astype(int)
        assert set(lab) >= {0, 1, 2}  # ceiling, floor, walls in every room
        assert data[lab == 1, 2].mean() < 0.1 < 2.5 < data[lab == 0, 2].mean()
        labels |= set(lab.tolist())
    assert len(labels) >= 8
    raw = S3DIS(tmp_path / "a", split="test", num_points=256, layout="raw", progress=False)
    npy = S3DIS(tmp_path / "a", split="test", num_points=256, layout="npy", progress=False)
    assert len(raw) == len(npy) and all(torch.equal(raw[i][1], npy[i][1]) for i in range(len(raw)))
    with pytest.raises(UsageError, match="layout"):
        generate_scenes(tmp_path / "c", layout="h5")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").iterdir()}
    generate_scenes(tmp_path / "b", areas=(5,), rooms_per_area=1, points_per_room=3000, seed=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "b").iterdir()} == before  # same arguments: reused
    with pytest.raises(UsageError, match="already holds S3DIS rooms generated with other arguments"):
        generate_scenes(tmp_path / "b", areas=(5,), rooms_per_area=2, points_per_room=3000, seed=1, progress=False)
    (tmp_path / "b" / "generated_scenes.json").unlink()  # e.g. an interrupted generation, or the real data
    with pytest.raises(UsageError, match="already holds S3DIS rooms; generate into a new"):
        generate_scenes(tmp_path / "b", areas=(5,), rooms_per_area=1, points_per_room=3000, seed=1, progress=False)
    assert len(list((tmp_path / "b").glob("Area_5_*.npy"))) == 1  # nothing was deleted


# ---------------------------------------------------------------- models
@pytest.mark.parametrize("name", sorted(SCENE_MODELS))
def test_scene_models_trace_convert_and_train_a_step(name):
    torch.manual_seed(0)
    kwargs = {"pointnet": dict(encoder=(8, 16), global_mlp=(16,), head=(16,)),
              "pointnet2": dict(npoint=(16, 4), nsample=(4, 4), radius=(0.2, 0.4), sa_mlps=((8,), (16,)),
                                fp_mlps=((16,), (8,)), head=8)}[name]
    model = build_scene_model(name, 13, **kwargs).eval()
    points = torch.rand(2, 9, 64) - 0.5
    out = model(points)
    assert out.shape == (2, 13, 64)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(points), out)
    l1 = l1fx.convert(model.train(), ratio=1.0, init="data", example_inputs=(points,))
    assert sum(isinstance(m, L1Module) for m in l1.modules()) == \
        sum(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    opt = torch.optim.SGD(l1.parameters(), lr=0.05, momentum=0.9)
    wrapper = TrainingWrapper(l1, opt, total_steps=2)
    loss = torch.nn.functional.cross_entropy(l1(points), torch.randint(0, 13, (2, 64)))
    loss.backward()
    wrapper.step()
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="pointnet2"):
        build_scene_model("dgcnn")


# ---------------------------------------------------------------- the example
def load_example():
    return example_loader.load_example("scene_segmentation.py", "scene_segmentation_example")


def test_scene_segmentation_example_end_to_end(tmp_path):
    example = load_example()
    results = example.main(["--smoke", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert {(r["model"], r["variant"]) for r in results} == \
        {(m, v) for m in example.MODEL_NAMES for v in example.VARIANTS}
    for r in results:
        assert r["finite"] and 0 <= r["final"]["miou"] <= 100 and 0 <= r["final"]["oa"] <= 100 and r["steps"] >= 1
        assert (r["l1_layers"] == 0) == (r["variant"] == "baseline")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["results"]) == len(results) and "--smoke" in saved["command"]
    for m in example.MODEL_NAMES:
        assert 0.3 < saved["energy"][m]["ratio"] < 0.5  # fp32 45 nm: 2 adds (1.8 pJ) vs mul + add (4.6 pJ)
        assert (tmp_path / f"curves_{m}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "| pointnet2 | l1-mgs-dlc |" in md and "| pointnet | l1-dlc |  | ✓ |" in md


def test_example_reports_mean_and_std_over_seeds():
    example = load_example()
    fake = [{"model": "pointnet", "variant": v, "seed": s, "seconds": 1.0, "final": {"miou": m, "oa": 2 * m}}
            for v, vals in (("baseline", (40.0, 44.0)), ("l1-mgs-dlc", (38.0, 38.0))) for s, m in enumerate(vals)]
    md = example.markdown_tables(fake, {"pointnet": {"dense_uJ": 10.0, "l1_uJ": 4.0, "ratio": 0.4}}, 2)
    assert "| pointnet | baseline | 42.00 ± 2.83 | 84.00 ± 5.66 | 10 | 1 |" in md
    assert "| pointnet | l1-mgs-dlc | 38.00 ± 0.00 | 76.00 ± 0.00 | 4 | 0.40 |" in md
    assert example.parse_args(["--quick"]).init == "data"
    with pytest.raises(SystemExit):
        example.parse_args(["--quick", "--smoke"])
    with pytest.raises(SystemExit):
        example.parse_args(["--variants", "l1-foo"])
