"""Generated part-segmentation data, the ShapeNet-part / ModelNet40 loaders, metrics, voxels."""
import json

import numpy as np
import pytest
import torch

from l1fx.data import (SHAPENET_PART_CLASSES, SYNTHETIC_CATEGORIES, ModelNet40, ShapeNetPart, devoxelize,
                       make_part_segmentation, part_segmentation_metrics, voxelize)


# ---------------------------------------------------------------- generator
def test_generator_is_deterministic_and_split_streams_are_independent():
    a_train, a_test = make_part_segmentation(12, 6, 64, seed=3)
    b_train, b_test = make_part_segmentation(12, 6, 64, seed=3)
    assert torch.equal(a_train.points, b_train.points) and torch.equal(a_test.labels, b_test.labels)
    _, c_test = make_part_segmentation(30, 6, 64, seed=3)  # more training shapes, same test set
    assert torch.equal(a_test.points, c_test.points)
    d_train, _ = make_part_segmentation(12, 6, 64, seed=4)
    assert not torch.equal(a_train.points, d_train.points)
    assert not torch.equal(a_train.points[:6], a_test.points)


def test_generator_labels_belong_to_their_category():
    train, _ = make_part_segmentation(24, 0, 128, seed=0)
    assert train.points.shape == (24, 128, 3) and train.labels.shape == (24, 128)
    assert train.num_categories == 6 and train.num_parts == 16 and train.classes == SYNTHETIC_CATEGORIES
    assert torch.bincount(train.categories).tolist() == [4] * 6  # balanced
    for pts, cat, lab in train:
        parts = SYNTHETIC_CATEGORIES[train.category_names[cat]]
        assert set(lab.tolist()) <= set(parts) and len(set(lab.tolist())) >= 2
        assert pts.norm(dim=1).max() < 1.5  # unit sphere, then scale <= 1.25 and jitter
    rotated, _ = make_part_segmentation(4, 0, 64, seed=0, rotation="so3")
    assert torch.isfinite(rotated.points).all()


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown categories"):
        make_part_segmentation(2, 2, 16, categories=["teapot"])
    with pytest.raises(ValueError, match="num_points"):
        make_part_segmentation(2, 2, 0)
    with pytest.raises(ValueError, match="rotation"):
        make_part_segmentation(2, 0, 16, rotation="x")


# ---------------------------------------------------------------- ShapeNet-part txt
def write_shapenet(root, rng):
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text("Airplane\t02691156\nMug\t03797390\n")
    entries = {"train": [], "val": [], "test": []}
    shapes = [("02691156", "a1", [0, 1, 3], "train"), ("03797390", "m1", [36, 37], "train"),
              ("02691156", "a2", [2], "val"), ("03797390", "m2", [37], "test")]
    for synset, sid, parts, split in shapes:
        (root / synset).mkdir(exist_ok=True)
        n = 5
        rows = np.concatenate([rng.normal(size=(n, 6)), np.resize(parts, n)[:, None]], 1)
        np.savetxt(root / synset / f"{sid}.txt", rows, fmt="%.6f")
        entries[split].append(f"shape_data/{synset}/{sid}")
    for split, names in entries.items():
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(names))


def test_shapenet_part_loader(tmp_path):
    write_shapenet(tmp_path, np.random.default_rng(0))
    train = ShapeNetPart(tmp_path, "train", num_points=8)
    assert len(train) == 2 and train.num_parts == 50
    pts, cat, lab = train[0]
    assert pts.shape == (8, 3) and pts.dtype == torch.float32 and int(cat) == 0  # Airplane
    assert set(lab.tolist()) <= {0, 1, 3}
    assert torch.equal(train[0][0], pts)  # the resampling is the same every time
    pts1, cat1, lab1 = train[1]
    assert train.category_names[int(cat1)] == "Mug" and set(lab1.tolist()) <= set(SHAPENET_PART_CLASSES["Mug"])
    assert len(ShapeNetPart(tmp_path, "trainval")) == 3
    full = ShapeNetPart(tmp_path, "test", num_points=None, normals=True)
    assert full[0][0].shape == (5, 6)
    assert len(ShapeNetPart(tmp_path, "train", categories=["Mug"])) == 1


def test_shapenet_part_loader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="synsetoffset2category"):
        ShapeNetPart(tmp_path / "nowhere")
    write_shapenet(tmp_path, np.random.default_rng(0))
    with pytest.raises(ValueError, match="split"):
        ShapeNetPart(tmp_path, "dev")
    bad = tmp_path / "02691156" / "a1.txt"
    bad.write_text("0 0 0 0 0 1 40\n")  # a Pistol part in an airplane file
    with pytest.raises(ValueError, match="a1.txt"):
        ShapeNetPart(tmp_path, "train")[0]


# ---------------------------------------------------------------- ModelNet40 resampled txt
def test_modelnet40_loader(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "modelnet40_shape_names.txt").write_text("airplane\nbed\n")
    (tmp_path / "modelnet40_train.txt").write_text("airplane_0001\nbed_0001\n")
    (tmp_path / "modelnet40_test.txt").write_text("bed_0002\n")
    for sid in ("airplane_0001", "bed_0001", "bed_0002"):
        cls = sid.rsplit("_", 1)[0]
        (tmp_path / cls).mkdir(exist_ok=True)
        np.savetxt(tmp_path / cls / f"{sid}.txt", rng.normal(size=(12, 6)), fmt="%.6f", delimiter=",")
    train = ModelNet40(tmp_path, "train", num_points=10)
    pts, label = train[1]
    assert len(train) == 2 and pts.shape == (10, 3) and int(label) == 1
    expected = np.loadtxt(tmp_path / "bed" / "bed_0001.txt", delimiter=",", dtype=np.float32)[:10, :3]
    assert np.array_equal(pts.numpy(), expected)
    assert ModelNet40(tmp_path, "test", num_points=4, normals=True)[0][0].shape == (4, 6)
    with pytest.raises(ValueError, match="bed_0002.txt"):
        ModelNet40(tmp_path, "test", num_points=50)[0]
    with pytest.raises(FileNotFoundError, match="modelnet10_shape_names"):
        ModelNet40(tmp_path, num_classes=10)


# ---------------------------------------------------------------- metrics
def test_part_metrics_by_hand():
    classes = {"a": [0, 1], "b": [2, 3, 4]}
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 3, 4]])
    logits = torch.nn.functional.one_hot(pred, 5).float().transpose(1, 2)
    logits[0, 3] = 10.0  # a part of another category must be ignored for category "a"
    s = part_segmentation_metrics(logits, labels, torch.tensor([0, 1]), classes)
    # shape 0: part0 IoU 1/2, part1 IoU 2/3; shape 1: part2 1, part3 1/2, part4 0
    iou0, iou1 = (0.5 + 2 / 3) / 2, (1 + 0.5 + 0) / 3
    assert s.instance_miou == pytest.approx(100 * (iou0 + iou1) / 2)
    assert s.per_category == pytest.approx({"a": 100 * iou0, "b": 100 * iou1})
    assert s.accuracy == pytest.approx(100 * 6 / 8)
    absent = part_segmentation_metrics(torch.nn.functional.one_hot(torch.tensor([[2, 2]]), 5).float()
                                       .transpose(1, 2), torch.tensor([[2, 2]]), torch.tensor([1]), classes)
    assert absent.instance_miou == 100.0  # parts absent from both count as IoU 1
    with pytest.raises(ValueError, match="logits"):
        part_segmentation_metrics(logits.transpose(1, 2), labels, torch.tensor([0, 1]), classes)


# ---------------------------------------------------------------- voxels
def test_voxelize_and_devoxelize():
    pts = torch.tensor([[[-0.9, -0.8, 0.9, 1.5], [-0.9, -0.9, 0.9, 0.0], [-0.9, -0.9, 0.9, -0.5]]])  # [1, 3, 4]
    grid, index = voxelize(pts, 2)
    assert grid.shape == (1, 4, 2, 2, 2) and index.tolist() == [[0, 0, 7, 6]]
    assert grid[0, 0].sum() == 3  # three distinct voxels occupied
    torch.testing.assert_close(grid[0, 1:].reshape(3, 8)[:, 0], torch.tensor([-0.85, -0.9, -0.9]))
    feats = torch.arange(16.0).reshape(1, 2, 2, 2, 2)
    assert devoxelize(feats, index).tolist() == [[[0, 0, 7, 6], [8, 8, 15, 14]]]
