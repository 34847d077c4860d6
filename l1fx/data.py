"""Point-cloud data for the examples: generated part segmentation, real-format loaders, voxels.

* :func:`make_part_segmentation` builds a synthetic, ShapeNet-part-like data
  set: objects of a few categories assembled from primitives (boxes,
  cylinders, cones, spheres, tori), every primitive carrying a part label;
  random proportions, rotation, anisotropic scale and jitter; fixed seeds and
  a train/test split drawn from independent streams. Nothing is downloaded.
* :class:`ShapeNetPart` reads the ShapeNet-part benchmark in its common txt
  form (``shapenetcore_partanno_segmentation_benchmark_v0_normal``) and
  :class:`ModelNet40` the resampled ModelNet txt form
  (``modelnet40_normal_resampled``), for users who have those files.
* :func:`part_segmentation_metrics` is the ShapeNet-part evaluation
  (instance- and class-averaged mIoU over the parts of each shape's category).
* :func:`voxelize` / :func:`devoxelize` map points to an occupancy grid and
  grid features back to points, for the voxel 3D CNN.

Every data set yields ``(points [N, 3] float32, category int64, labels [N] int64)``
(ModelNet: ``(points, label)``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.fx
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "SYNTHETIC_CATEGORIES", "SHAPENET_PART_CLASSES", "PartSegmentationData", "make_part_segmentation",
    "ShapeNetPart", "ModelNet40", "part_segmentation_metrics", "voxelize", "devoxelize",
]

# ------------------------------------------------------------------ primitives
# Each sampler draws n points on a primitive's surface, centred at the origin,
# roughly uniform by area; the object builders place and label them.


def _box(rng, n, size):
    size = np.asarray(size, float)
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]]).repeat(2)
    face = rng.choice(6, n, p=areas / areas.sum())
    pts = (rng.random((n, 3)) - 0.5) * size
    axis = face // 2
    pts[np.arange(n), axis] = np.where(face % 2 == 0, -0.5, 0.5) * size[axis]
    return pts


def _cylinder(rng, n, radius, height, caps=True, top_radius=None):
    """Side of a (possibly tapered) cylinder along z, with optional end caps."""
    top_radius = radius if top_radius is None else top_radius
    side = math.pi * (radius + top_radius) * math.hypot(height, radius - top_radius)
    cap = math.pi * (radius ** 2 + top_radius ** 2) if caps else 0.0
    on_cap = rng.random(n) < cap / (side + cap)
    t = rng.random(n)
    theta = rng.random(n) * 2 * math.pi
    z = np.where(on_cap, np.where(t < radius ** 2 / max(radius ** 2 + top_radius ** 2, 1e-12), 0.0, 1.0), t)
    r_at = radius + (top_radius - radius) * z
    r = np.where(on_cap, r_at * np.sqrt(rng.random(n)), r_at)
    return np.stack([r * np.cos(theta), r * np.sin(theta), (z - 0.5) * height], axis=1)


def _ellipsoid(rng, n, radii):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * np.asarray(radii, float)


def _torus_arc(rng, n, major, minor, arc=math.pi):
    """Part of a torus in the xz plane (a mug handle), angle ``arc`` around its centre."""
    u = (rng.random(n) - 0.5) * arc
    v = rng.random(n) * 2 * math.pi
    r = major + minor * np.cos(v)
    return np.stack([r * np.cos(u), minor * np.sin(v), r * np.sin(u)], axis=1)


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


# ------------------------------------------------------------------ objects
# A builder returns a list of (local part index, area weight, sampler(n) -> points).

def _table(rng):
    w, d, h, t = _u(rng, 1.2, 1.8), _u(rng, 0.7, 1.1), _u(rng, 0.6, 0.9), _u(rng, 0.04, 0.1)
    r = _u(rng, 0.03, 0.06)
    parts = [(0, w * d * 2, lambda n: _box(rng, n, (w, d, t)) + (0, 0, h))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            c = np.array([sx * (w / 2 - 0.1), sy * (d / 2 - 0.1), h / 2])
            parts.append((1, 2 * math.pi * r * h, lambda n, c=c: _cylinder(rng, n, r, h, caps=False) + c))
    return parts


def _chair(rng):
    w, s_h, b_h, t = _u(rng, 0.5, 0.7), _u(rng, 0.4, 0.55), _u(rng, 0.45, 0.8), _u(rng, 0.04, 0.08)
    r = _u(rng, 0.02, 0.04)
    parts = [(0, 2 * w * w, lambda n: _box(rng, n, (w, w, t)) + (0, 0, s_h)),
             (1, 2 * w * b_h, lambda n: _box(rng, n, (w, t, b_h)) + (0, w / 2, s_h + b_h / 2))]
    for sx in (-1, 1):
        for sy in (-1, 1):
            c = np.array([sx * (w / 2 - 0.04), sy * (w / 2 - 0.04), s_h / 2])
            parts.append((2, 2 * math.pi * r * s_h, lambda n, c=c: _cylinder(rng, n, r, s_h, caps=False) + c))
    return parts


def _lamp(rng):
    base_r, pole_h, shade_h = _u(rng, 0.2, 0.35), _u(rng, 0.8, 1.4), _u(rng, 0.25, 0.45)
    shade_lo, shade_hi = _u(rng, 0.25, 0.4), _u(rng, 0.1, 0.2)
    return [
        (0, 2 * math.pi * base_r ** 2, lambda n: _cylinder(rng, n, base_r, 0.06)),
        (1, 2 * math.pi * 0.03 * pole_h, lambda n: _cylinder(rng, n, 0.03, pole_h, caps=False) + (0, 0, pole_h / 2)),
        (2, math.pi * (shade_lo + shade_hi) * shade_h * 1.2,
         lambda n: _cylinder(rng, n, shade_lo, shade_h, caps=False, top_radius=shade_hi) + (0, 0, pole_h)),
    ]


def _airplane(rng):
    length, radius, span, chord = _u(rng, 1.6, 2.2), _u(rng, 0.1, 0.16), _u(rng, 1.4, 2.0), _u(rng, 0.25, 0.4)
    tail = _u(rng, 0.25, 0.4)
    return [
        (0, 2 * math.pi * radius * length, lambda n: _ellipsoid(rng, n, (length / 2, radius, radius))),
        (1, 2 * span * chord, lambda n: _box(rng, n, (chord, span, 0.03)) + (0.05, 0, 0)),
        (2, 2 * tail * tail * 2, lambda n: np.where(
            rng.random((n, 1)) < 0.5,
            _box(rng, n, (tail * 0.8, 0.03, tail)) + (-length / 2 + tail / 2, 0, tail / 2),
            _box(rng, n, (tail * 0.6, tail * 1.6, 0.03)) + (-length / 2 + tail / 2, 0, 0.02))),
    ]


def _mug(rng):
    r, h = _u(rng, 0.3, 0.45), _u(rng, 0.6, 1.0)
    major, minor = _u(rng, 0.15, 0.25), _u(rng, 0.03, 0.05)
    return [
        (0, 2 * math.pi * r * h + math.pi * r * r, lambda n: _cylinder(rng, n, r, h)),
        (1, 2 * math.pi ** 2 * major * minor, lambda n: _torus_arc(rng, n, major, minor) + (r, 0, 0)),
    ]


def _rocket(rng):
    r, h, nose = _u(rng, 0.12, 0.2), _u(rng, 1.0, 1.6), _u(rng, 0.25, 0.5)
    fin = _u(rng, 0.2, 0.35)
    parts = [(0, 2 * math.pi * r * h, lambda n: _cylinder(rng, n, r, h, caps=False)),
             (1, math.pi * r * math.hypot(r, nose),
              lambda n: _cylinder(rng, n, r, nose, caps=False, top_radius=0.0) + (0, 0, (h + nose) / 2))]
    for k in range(3):
        a = 2 * math.pi * k / 3
        rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        parts.append((2, 2 * fin * fin, lambda n, rot=rot: (_box(rng, n, (0.03, fin, fin))
                                                           + (0, r + fin / 2, -h / 2 + fin / 2)) @ rot.T))
    return parts


_BUILDERS = {"table": (_table, 2), "chair": (_chair, 3), "lamp": (_lamp, 3),
             "airplane": (_airplane, 3), "mug": (_mug, 2), "rocket": (_rocket, 3)}


def _part_ranges(names: Sequence[str]) -> dict[str, list[int]]:
    out, start = {}, 0
    for name in names:
        count = _BUILDERS[name][1]
        out[name] = list(range(start, start + count))
        start += count
    return out


SYNTHETIC_CATEGORIES: dict[str, list[int]] = _part_ranges(list(_BUILDERS))
"""Category -> global part labels of the generated data (like ShapeNet-part's ``seg_classes``)."""

# ShapeNet-part: 16 categories (alphabetical, as in synsetoffset2category.txt), 50 parts numbered in order.
SHAPENET_PART_CLASSES: dict[str, list[int]] = {}
_start = 0
for _name, _count in [("Airplane", 4), ("Bag", 2), ("Cap", 2), ("Car", 4), ("Chair", 4), ("Earphone", 3),
                      ("Guitar", 3), ("Knife", 2), ("Lamp", 4), ("Laptop", 2), ("Motorbike", 6), ("Mug", 2),
                      ("Pistol", 3), ("Rocket", 3), ("Skateboard", 3), ("Table", 3)]:
    SHAPENET_PART_CLASSES[_name] = list(range(_start, _start + _count))
    _start += _count
del _start, _name, _count


def _rotation(rng, mode: Optional[str]) -> np.ndarray:
    if mode is None or mode == "none":
        return np.eye(3)
    if mode == "z":
        a = rng.uniform(0, 2 * math.pi)
        return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    if mode == "so3":
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        return q if np.linalg.det(q) > 0 else -q
    raise ValueError(f"rotation must be None, 'z' or 'so3', got {mode!r}")


def _make_shape(rng, category: str, num_points: int, rotation, scale, jitter):
    parts = _BUILDERS[category][0](rng)
    weights = np.array([max(w, 1e-6) for _, w, _ in parts])
    counts = rng.multinomial(num_points, weights / weights.sum())
    pts, labels = [], []
    for (local, _, sample), count in zip(parts, counts):
        if count:
            pts.append(sample(int(count)))
            labels.append(np.full(int(count), local))
    points, labels = np.concatenate(pts), np.concatenate(labels)
    points = points - points.mean(0)
    points = points / np.linalg.norm(points, axis=1).max()
    points = points @ _rotation(rng, rotation).T * rng.uniform(*scale, size=3)
    points = points + np.clip(rng.normal(scale=jitter, size=points.shape), -5 * jitter, 5 * jitter)
    order = rng.permutation(num_points)
    return points[order].astype(np.float32), labels[order]


class PartSegmentationData(Dataset):
    """In-memory part-segmentation set: ``points [S, N, 3]``, ``labels [S, N]`` (global part ids), ``categories [S]``."""

    def __init__(self, points: np.ndarray, labels: np.ndarray, categories: np.ndarray,
                 classes: dict[str, list[int]]):
        self.points = torch.as_tensor(points, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.categories = torch.as_tensor(categories, dtype=torch.int64)
        self.classes = dict(classes)
        self.category_names = list(classes)

    @property
    def num_parts(self) -> int:
        return max(max(p) for p in self.classes.values()) + 1

    @property
    def num_categories(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i):
        return self.points[i], self.categories[i], self.labels[i]


def make_part_segmentation(num_train: int = 600, num_test: int = 200, num_points: int = 512, *, seed: int = 0,
                           categories: Optional[Sequence[str]] = None, rotation: Optional[str] = "z",
                           scale: tuple[float, float] = (0.8, 1.25), jitter: float = 0.01,
                           ) -> tuple[PartSegmentationData, PartSegmentationData]:
    """Generated train and test sets, identical for identical arguments.

    Train and test shapes come from independent random streams of ``seed``
    (so changing ``num_train`` does not change the test set). Categories are
    balanced; labels are global part ids as in :data:`SYNTHETIC_CATEGORIES`.
    """
    names = list(categories) if categories is not None else list(_BUILDERS)
    unknown = [c for c in names if c not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; available: {list(_BUILDERS)}")
    for what, v in (("num_train", num_train), ("num_test", num_test), ("num_points", num_points)):
        if not isinstance(v, int) or v < (1 if what == "num_points" else 0):
            raise ValueError(f"{what} must be a {'positive' if what == 'num_points' else 'non-negative'} int, got {v!r}")
    classes = _part_ranges(names)
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)

    def build(seq, count):
        rng = np.random.default_rng(seq)
        pts = np.zeros((count, num_points, 3), np.float32)
        lab = np.zeros((count, num_points), np.int64)
        cat = np.arange(count) % len(names)
        rng.shuffle(cat)
        for i, c in enumerate(cat):
            p, local = _make_shape(rng, names[c], num_points, rotation, scale, jitter)
            pts[i], lab[i] = p, np.asarray(classes[names[c]])[local]
        return PartSegmentationData(pts, lab, cat, classes)

    return build(train_seq, num_train), build(test_seq, num_test)


# ------------------------------------------------------------------ real-format loaders

def _resample(rng: np.random.Generator, n_have: int, n_want: Optional[int]) -> np.ndarray:
    if n_want is None:
        return np.arange(n_have)
    return rng.choice(n_have, n_want, replace=n_have < n_want)


class ShapeNetPart(Dataset):
    """ShapeNet-part in the txt layout of ``shapenetcore_partanno_segmentation_benchmark_v0_normal``.

    ``root/synsetoffset2category.txt`` (``Name<TAB>synset``), one ``root/<synset>/<id>.txt`` per
    shape with rows ``x y z nx ny nz part`` (global part id 0..49), and split lists
    ``root/train_test_split/shuffled_{train,val,test}_file_list.json`` holding
    ``"shape_data/<synset>/<id>"``. ``split`` is ``train``, ``val``, ``test`` or ``trainval``.
    Each shape is resampled to ``num_points`` (``None`` keeps all points; then
    batches need ``batch_size=1``); the resampling is seeded per shape, so it is the same
    every epoch. ``normals=True`` returns ``[N, 6]`` points.
    """

    SPLITS = {"train": ["train"], "val": ["val"], "test": ["test"], "trainval": ["train", "val"]}

    def __init__(self, root: Union[str, Path], split: str = "train", num_points: Optional[int] = 2048, *,
                 normals: bool = False, categories: Optional[Sequence[str]] = None, seed: int = 0):
        root = Path(root)
        if split not in self.SPLITS:
            raise ValueError(f"ShapeNetPart split must be one of {list(self.SPLITS)}, got {split!r}")
        cat_file = root / "synsetoffset2category.txt"
        if not cat_file.is_file():
            raise FileNotFoundError(f"{cat_file} not found: is {root} the root of "
                                    "shapenetcore_partanno_segmentation_benchmark_v0_normal?")
        synset_to_name = {}
        for line in cat_file.read_text().splitlines():
            if line.strip():
                name, synset = line.split()
                synset_to_name[synset] = name
        unknown = [n for n in synset_to_name.values() if n not in SHAPENET_PART_CLASSES]
        if unknown:
            raise ValueError(f"{cat_file}: unknown categories {unknown}; expected the 16 ShapeNet-part names")
        wanted = set(categories) if categories is not None else set(synset_to_name.values())
        self.classes = dict(SHAPENET_PART_CLASSES)
        self.category_names = list(self.classes)
        self.files: list[tuple[Path, int]] = []
        for part in self.SPLITS[split]:
            split_file = root / "train_test_split" / f"shuffled_{part}_file_list.json"
            if not split_file.is_file():
                raise FileNotFoundError(f"split list {split_file} not found")
            for entry in json.loads(split_file.read_text()):
                synset, shape_id = entry.split("/")[-2:]
                if synset not in synset_to_name:
                    raise ValueError(f"{split_file}: synset {synset} is not in {cat_file}")
                name = synset_to_name[synset]
                if name in wanted:
                    self.files.append((root / synset / f"{shape_id}.txt", self.category_names.index(name)))
        self.num_points, self.normals, self.seed = num_points, normals, seed

    @property
    def num_parts(self) -> int:
        return 50

    @property
    def num_categories(self) -> int:
        return 16

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        path, category = self.files[i]
        try:
            data = np.loadtxt(path, dtype=np.float32, ndmin=2)
        except OSError as e:
            raise FileNotFoundError(f"ShapeNetPart: cannot read {path}: {e}") from None
        if data.shape[1] != 7:
            raise ValueError(f"{path}: expected 7 columns 'x y z nx ny nz part', got {data.shape[1]}")
        labels = data[:, 6].astype(np.int64)
        allowed = self.classes[self.category_names[category]]
        if labels.min() < allowed[0] or labels.max() > allowed[-1]:
            raise ValueError(f"{path}: part labels {sorted(set(labels.tolist()))} outside "
                             f"{self.category_names[category]}'s parts {allowed}")
        idx = _resample(np.random.default_rng([self.seed, i]), len(data), self.num_points)
        points = data[idx, :6 if self.normals else 3]
        return torch.from_numpy(np.ascontiguousarray(points)), torch.tensor(category), torch.from_numpy(labels[idx])


class ModelNet40(Dataset):
    """ModelNet40 (or 10) in the ``modelnet40_normal_resampled`` txt layout.

    ``root/modelnet{N}_shape_names.txt``, ``root/modelnet{N}_{train,test}.txt`` (ids like
    ``airplane_0001``) and ``root/<class>/<id>.txt`` with comma-separated rows
    ``x,y,z,nx,ny,nz``. Yields ``(points [num_points, 3 or 6], label)``; the first
    ``num_points`` points are used, as the resampled files are already uniformly sampled.
    """

    def __init__(self, root: Union[str, Path], split: str = "train", num_points: int = 1024, *,
                 normals: bool = False, num_classes: int = 40):
        root = Path(root)
        if split not in ("train", "test"):
            raise ValueError(f"ModelNet40 split must be 'train' or 'test', got {split!r}")
        if num_classes not in (10, 40):
            raise ValueError(f"num_classes must be 10 or 40, got {num_classes!r}")
        names_file = root / f"modelnet{num_classes}_shape_names.txt"
        list_file = root / f"modelnet{num_classes}_{split}.txt"
        for f in (names_file, list_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: is {root} the root of modelnet40_normal_resampled?")
        self.class_names = [l.strip() for l in names_file.read_text().splitlines() if l.strip()]
        index = {n: i for i, n in enumerate(self.class_names)}
        self.files: list[tuple[Path, int]] = []
        for shape_id in (l.strip() for l in list_file.read_text().splitlines()):
            if not shape_id:
                continue
            cls = shape_id.rsplit("_", 1)[0]
            if cls not in index:
                raise ValueError(f"{list_file}: {shape_id!r} has class {cls!r}, not in {names_file.name}")
            self.files.append((root / cls / f"{shape_id}.txt", index[cls]))
        self.num_points, self.normals = num_points, normals

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        try:
            data = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
        except OSError as e:
            raise FileNotFoundError(f"ModelNet40: cannot read {path}: {e}") from None
        if data.shape[1] != 6 or len(data) < self.num_points:
            raise ValueError(f"{path}: expected at least {self.num_points} rows of 'x,y,z,nx,ny,nz', "
                             f"got shape {data.shape}")
        points = data[: self.num_points, : 6 if self.normals else 3]
        return torch.from_numpy(np.ascontiguousarray(points)), torch.tensor(label)


# ------------------------------------------------------------------ evaluation

@dataclass
class SegmentationScores:
    instance_miou: float  # mean over shapes of the mean part IoU (ShapeNet-part "instance mIoU")
    class_miou: float  # mean over categories of their shapes' mean IoU
    accuracy: float  # fraction of points labelled correctly
    per_category: dict[str, float]


def part_segmentation_metrics(logits: Tensor, labels: Tensor, categories: Tensor,
                              classes: dict[str, list[int]]) -> SegmentationScores:
    """ShapeNet-part evaluation of ``logits [S, P, N]`` against ``labels [S, N]``.

    The prediction of each point is the best of its shape's category parts
    (the standard protocol); a part absent from both prediction and ground
    truth counts as IoU 1. Percentages in [0, 100].
    """
    names = list(classes)
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[0] != labels.shape[0] \
            or logits.shape[2] != labels.shape[1]:
        raise ValueError(f"expected logits [S, P, N] and labels [S, N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    ious, per_cat = [], {n: [] for n in names}
    correct = 0
    for s in range(labels.shape[0]):
        parts = classes[names[int(categories[s])]]
        pred = torch.as_tensor(parts)[logits[s, parts].argmax(0)]
        gt = labels[s]
        correct += int((pred == gt).sum())
        shape_ious = []
        for part in parts:
            inter = int(((pred == part) & (gt == part)).sum())
            union = int(((pred == part) | (gt == part)).sum())
            shape_ious.append(1.0 if union == 0 else inter / union)
        ious.append(float(np.mean(shape_ious)))
        per_cat[names[int(categories[s])]].append(ious[-1])
    per_category = {n: 100 * float(np.mean(v)) for n, v in per_cat.items() if v}
    return SegmentationScores(
        instance_miou=100 * float(np.mean(ious)) if ious else float("nan"),
        class_miou=float(np.mean(list(per_category.values()))) if per_category else float("nan"),
        accuracy=100 * correct / max(labels.numel(), 1),
        per_category=per_category,
    )


# ------------------------------------------------------------------ voxels

@torch.fx.wrap
def voxelize(points: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Occupancy grid and point->voxel index of ``points [B, 3, N]`` in roughly [-1, 1]^3.

    Returns ``grid [B, 4, R, R, R]`` (occupancy, then the mean xyz of the
    points in each voxel, 0 where empty) and ``index [B, N]`` (flat voxel
    index of each point). Points outside [-1, 1] are clamped to the border
    voxels. Wrapped for torch.fx: it is data-dependent, and it stays one leaf call.
    """
    b, _, n = points.shape
    r = resolution
    cell = ((points.detach() + 1) * (r / 2)).floor().long().clamp_(0, r - 1)  # [B, 3, N]
    index = (cell[:, 0] * r + cell[:, 1]) * r + cell[:, 2]  # [B, N]
    counts = points.new_zeros(b, r ** 3).scatter_add_(1, index, points.new_ones(b, n))
    sums = points.new_zeros(b, 3, r ** 3).scatter_add_(2, index[:, None].expand(b, 3, n), points)
    mean = sums / counts.clamp(min=1)[:, None]
    grid = torch.cat([(counts > 0).to(points.dtype)[:, None], mean], 1)
    return grid.view(b, 4, r, r, r), index


@torch.fx.wrap
def devoxelize(features: Tensor, index: Tensor) -> Tensor:
    """Per-point features ``[B, C, N]`` read from ``features [B, C, R, R, R]`` at ``index [B, N]``."""
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1)
    return flat.gather(2, index[:, None].expand(b, c, index.shape[1]))
from .s3dis import S3DIS, S3DIS_CLASSES, evaluate_scenes, generate_scenes, scene_segmentation_metrics  # noqa: E402,F401
