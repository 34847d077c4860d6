"""S3DIS indoor scenes: the loader (both common layouts), generated scenes, scene metrics.

* :class:`S3DIS` reads the Stanford 3D Indoor Scenes data set as distributed
  (``Area_N/<room>/Annotations/<class>_<i>.txt``, rows ``x y z r g b``) or as
  preprocessed by the widely used ``collect_indoor3d_data`` script (one
  ``Area_N_<room>.npy`` per room, columns ``x y z r g b label``), cuts every
  room into blocks and yields ``(points [9, num_points] float32, labels
  [num_points] int64)`` as the PointNet / PointNet++ S3DIS code does.
* :func:`generate_scenes` writes generated rooms (floor, ceiling, walls with
  doors and windows, tables, chairs, bookcases, clutter, ... as noisy sampled
  primitives, colours per class) in either layout, so everything runs without
  the data set.
* :func:`scene_segmentation_metrics` (mIoU, OA, mAcc over all points) and
  :func:`evaluate_scenes` (whole test rooms: block predictions scattered back
  to every point of the room by voting).

The protocol and the choices where the usual scripts differ are in
docs/scene_segmentation.md.
"""
from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._atomicfile import atomic_write
from .errors import UsageError

# l1fx.data re-exports this module at its end, so its shape primitives are imported where they
# are used (generation only): importing them here would make ``import l1fx.s3dis`` circular.

__all__ = ["S3DIS", "S3DIS_CLASSES", "CLASS_ALIASES", "SceneScores", "scene_segmentation_metrics",
           "confusion_matrix", "scores_from_confusion", "evaluate_scenes", "generate_scenes",
           "read_annotated_room", "read_preprocessed_room", "room_blocks"]

S3DIS_CLASSES: tuple[str, ...] = ("ceiling", "floor", "wall", "beam", "column", "window", "door", "table",
                                  "chair", "sofa", "bookcase", "board", "clutter")
"""The 13 classes, in the order of the labels (``meta/class_names.txt`` of the PointNet code)."""
_CLASS_INDEX = {name: i for i, name in enumerate(S3DIS_CLASSES)}

CLASS_ALIASES: dict[str, str] = {"stairs": "clutter"}
"""Annotation names outside the 13 that the real data uses, and the class they count as.

S3DIS v1.2 has ``stairs_*.txt`` annotations in a few rooms (e.g. Area_2 hallways);
``collect_indoor3d_data`` maps every unknown name to clutter. Here only the known
quirk is mapped; any other name is an error, since it usually means a wrong folder."""

_NPY_RE = re.compile(r"^Area_(\d+)_(.+)\.npy$")
_AREA_RE = re.compile(r"^Area_(\d+)$")


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


# ------------------------------------------------------------------ reading rooms

def _bad_line(path: Path, expected: int, what: str) -> UsageError:
    """The first line of ``path`` that is not ``expected`` numbers, as a one-line error."""
    with open(path, "r", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                ok = len(fields) == expected and all(math.isfinite(float(v)) for v in fields)
            except ValueError:
                ok = False
            if not ok:
                return UsageError(f"{path}:{number}: malformed line {line.strip()[:60]!r}; expected {expected} "
                                  f"numbers '{what}': fix or delete that line")
    return UsageError(f"{path}: cannot be read as rows of {expected} numbers '{what}'")


def _read_rows(path: Path, expected: int, what: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file is an empty instance, not a warning
            data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError:
        raise _bad_line(path, expected, what) from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if data.size == 0:
        return np.zeros((0, expected))
    if data.shape[1] != expected or not np.isfinite(data).all():
        raise _bad_line(path, expected, what)
    return data


def _class_of(path: Path) -> int:
    name = path.name.split("_")[0]
    name = CLASS_ALIASES.get(name, name)
    if name not in _CLASS_INDEX:
        raise UsageError(f"{path}: class {name!r} (from the file name) is not one of the 13 S3DIS classes "
                         f"({', '.join(S3DIS_CLASSES)}); rename the file or add it to l1fx.s3dis.CLASS_ALIASES")
    return _CLASS_INDEX[name]


def read_annotated_room(room_dir: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(xyzrgb [N, 6] float64, labels [N] int64)`` of one room of the distributed layout.

    Reads every ``room_dir/Annotations/<class>_<i>.txt`` (hidden files skipped),
    as ``collect_indoor3d_data`` does; coordinates are returned as stored.
    """
    ann = Path(room_dir) / "Annotations"
    files = sorted(p for p in ann.glob("*.txt") if not p.name.startswith("."))
    if not files:
        raise UsageError(f"{ann}: no annotation files <class>_<i>.txt")
    rows, labels = [], []
    for f in files:
        label = _class_of(f)
        data = _read_rows(f, 6, "x y z r g b")
        rows.append(data)
        labels.append(np.full(len(data), label, np.int64))
    return np.concatenate(rows), np.concatenate(labels)


def read_preprocessed_room(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(xyzrgb [N, 6], labels [N] int64)`` of one ``Area_N_<room>.npy`` (columns ``x y z r g b label``)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path} as a .npy array: {e}") from None
    if data.ndim != 2 or data.shape[1] != 7 or not np.issubdtype(data.dtype, np.number):
        raise UsageError(f"{path}: expected an [N, 7] array 'x y z r g b label', got {data.dtype} {data.shape}")
    labels = data[:, 6]
    bad = (labels != np.round(labels)) | (labels < 0) | (labels >= len(S3DIS_CLASSES))
    if bad.any():
        raise UsageError(f"{path}: label {float(labels[bad][0])!r} (row {int(np.argmax(bad))}) is not an integer in "
                         f"0..{len(S3DIS_CLASSES) - 1}")
    finite = np.isfinite(data[:, :6]).all(1)
    if not finite.all():
        raise UsageError(f"{path}: non-finite coordinates or colours (row {int(np.argmax(~finite))})")
    return data[:, :6].astype(np.float64), labels.astype(np.int64)


def _find_rooms(root: Path, layout: str) -> tuple[str, list[tuple[int, str, Path]]]:
    """``(layout, [(area, room, path)])`` sorted by area and room."""
    if layout not in ("auto", "raw", "npy"):
        raise UsageError(f"S3DIS layout must be 'auto', 'raw' or 'npy', got {layout!r}")
    if not root.is_dir():
        raise UsageError(f"S3DIS root {root} is not a directory")
    npy = [(int(m[1]), m[2], p) for p in root.glob("Area_*_*.npy") if (m := _NPY_RE.match(p.name))]
    raw = [(int(m[1]), room.name, room) for area in root.glob("Area_*") if (m := _AREA_RE.match(area.name))
           and area.is_dir() for room in area.iterdir() if (room / "Annotations").is_dir()]
    if layout == "auto":
        layout = "npy" if npy else "raw"  # both present: the preprocessed files are the faster read
    found = npy if layout == "npy" else raw
    if not found:
        raise UsageError(f"no S3DIS rooms under {root} (layout {layout!r}): expected Area_N/<room>/Annotations/"
                         "<class>_<i>.txt (as distributed) or Area_N_<room>.npy (collect_indoor3d_data)")
    return layout, sorted(found)


# ------------------------------------------------------------------ blocks

@dataclass
class _Room:
    name: str  # "Area_5/office_1"
    xyz: np.ndarray  # [N, 3] float32, shifted so that the minimum is the origin
    rgb: np.ndarray  # [N, 3] float32 in [0, 1]
    labels: np.ndarray  # [N] int64
    extent: np.ndarray  # [3] float32: max of xyz (the room's size), the divisor of channels 6..8


def _make_room(name: str, xyzrgb: np.ndarray, labels: np.ndarray) -> _Room:
    if len(xyzrgb) == 0:
        raise UsageError(f"S3DIS room {name} has no points")
    xyz = xyzrgb[:, :3] - xyzrgb[:, :3].min(0)  # what collect_indoor3d_data stores (idempotent on its output)
    extent = xyz.max(0)
    return _Room(name, xyz.astype(np.float32), (xyzrgb[:, 3:6] / 255.0).astype(np.float32), labels,
                 np.where(extent > 0, extent, 1.0).astype(np.float32))


def room_blocks(xyz: np.ndarray, block_size: float, stride: float, min_points: int) -> list[np.ndarray]:
    """Point indices of the blocks of a room (PointNet's ``room2blocks`` grid).

    Block ``(i, j)`` covers ``[i*stride, i*stride + block_size]`` x ``[j*stride, ...]`` in xy
    (both ends included, so a point on a border belongs to both blocks), with
    ``ceil((extent - block_size) / stride) + 1`` blocks per axis (at least 1). Blocks with
    fewer than ``min_points`` points are dropped (PointNet drops below 100).
    """
    limit = xyz[:, :2].max(0)
    counts = [max(1, int(math.ceil((float(limit[a]) - block_size) / stride)) + 1) for a in (0, 1)]
    order = np.argsort(xyz[:, 0], kind="stable")
    xs = xyz[order, 0]
    blocks = []
    for i in range(counts[0]):
        lo, hi = np.searchsorted(xs, i * stride, "left"), np.searchsorted(xs, i * stride + block_size, "right")
        column = order[lo:hi]
        ys = xyz[column, 1]
        for j in range(counts[1]):
            inside = column[(ys >= j * stride) & (ys <= j * stride + block_size)]
            if len(inside) >= max(min_points, 1):
                blocks.append(np.sort(inside))
    return blocks


def _sample(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` indices into ``n`` points: without replacement when ``n >= k``, else every point plus random repeats."""
    if n >= k:
        return rng.choice(n, k, replace=False)
    return rng.permutation(np.concatenate([np.arange(n), rng.choice(n, k - n)]))


class S3DIS(Dataset):
    """S3DIS blocks: ``(points [9, num_points] float32, labels [num_points] int64)``.

    ``root`` holds either layout (``layout="auto"`` picks the ``.npy`` files when there are
    any). ``split="train"`` uses every area except ``test_area``, ``"test"`` only that area.
    Rooms are shifted so their minimum is the origin (as ``collect_indoor3d_data`` does) and cut
    into ``block_size`` x ``block_size`` blocks in xy every ``stride`` (default ``block_size``).

    Channels (PointNet's ``room2blocks_plus_normalized``): 0-1 xy minus (the block's minimum
    + block_size / 2), i.e. roughly centred in [-block_size/2, block_size/2]; 2 z in metres
    above the room's lowest point; 3-5 rgb / 255; 6-8 xyz / the room's extent, in [0, 1].

    * train: one item per block (blocks below ``min_block_points``, default 100, dropped);
      ``num_points`` are drawn from the block each time (without replacement when the block
      has that many, else all its points plus random repeats), from a generator seeded by
      ``(seed, epoch, index)``: call :meth:`set_epoch` to draw new samples each epoch.
    * test: every block (``min_block_points`` default 1) is split into chunks of
      ``num_points`` covering each of its points once (the last chunk padded with repeats),
      fixed by ``seed``; :meth:`point_index` maps an item back to its room's points and
      :func:`evaluate_scenes` scores whole rooms.
    """

    num_classes = len(S3DIS_CLASSES)
    class_names = S3DIS_CLASSES

    def __init__(self, root: Union[str, Path], test_area: int = 5, split: str = "train", num_points: int = 4096,
                 block_size: float = 1.0, stride: Optional[float] = None, *, layout: str = "auto",
                 min_block_points: Optional[int] = None, seed: int = 0, progress: bool = True):
        if split not in ("train", "test"):
            raise UsageError(f"S3DIS split must be 'train' or 'test', got {split!r}")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise UsageError(f"S3DIS num_points must be a positive int, got {num_points!r}")
        if not block_size > 0:
            raise UsageError(f"S3DIS block_size must be positive, got {block_size!r}")
        stride = block_size if stride is None else stride
        if not 0 < stride <= block_size:
            raise UsageError(f"S3DIS stride must be in (0, block_size={block_size}], got {stride!r} "
                             "(a larger stride would skip points)")
        self.root, self.split, self.test_area = Path(root), split, test_area
        self.num_points, self.block_size, self.stride, self.seed = num_points, float(block_size), float(stride), seed
        self.min_block_points = (100 if split == "train" else 1) if min_block_points is None else min_block_points
        self.layout, found = _find_rooms(self.root, layout)
        areas = sorted({a for a, _, _ in found})
        if test_area not in areas:
            raise UsageError(f"test_area {test_area} not found under {self.root}; areas present: {areas}")
        chosen = [f for f in found if (f[0] == test_area) == (split == "test")]
        if not chosen:
            raise UsageError(f"no training areas under {self.root}: only Area_{test_area}, the test area")
        read = read_preprocessed_room if self.layout == "npy" else read_annotated_room
        self.rooms: list[_Room] = []
        for area, room, path in _progress(chosen, progress, desc=f"S3DIS {split}: reading rooms", unit="room"):
            self.rooms.append(_make_room(f"Area_{area}/{room}", *read(path)))
        self._items: list[tuple[int, np.ndarray, np.ndarray]] = []  # (room, point indices, block centre xy)
        for r, room in enumerate(_progress(self.rooms, progress, desc=f"S3DIS {split}: cutting blocks", unit="room")):
            self._add_blocks(r, room)
        self.epoch = 0

    def _add_blocks(self, r: int, room: _Room) -> None:
        rng = np.random.default_rng([self.seed, r])
        for block in room_blocks(room.xyz, self.block_size, self.stride, self.min_block_points):
            centre = room.xyz[block, :2].min(0) + self.block_size / 2
            if self.split == "train":
                self._items.append((r, block, centre))
                continue
            order = block[rng.permutation(len(block))]
            for start in range(0, len(order), self.num_points):
                chunk = order[start:start + self.num_points]
                if len(chunk) < self.num_points:
                    chunk = np.concatenate([chunk, block[rng.choice(len(block), self.num_points - len(chunk))]])
                self._items.append((r, chunk.astype(np.int64), centre))

    def set_epoch(self, epoch: int) -> None:
        """Draw the training samples of epoch ``epoch`` (test items never change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._items)

    def point_index(self, i: int) -> tuple[int, np.ndarray]:
        """``(room, indices [num_points])``: item ``i``'s points in ``rooms[room]`` (test items are fixed)."""
        r, idx, _ = self._items[i]
        if self.split == "train":
            idx = idx[_sample(np.random.default_rng([self.seed, self.epoch, i]), len(idx), self.num_points)]
        return r, idx

    def room_items(self, r: int) -> list[int]:
        """The items cut from room ``r`` (consecutive)."""
        return [i for i, (room, _, _) in enumerate(self._items) if room == r]

    def _features(self, r: int, idx: np.ndarray, centre: np.ndarray) -> np.ndarray:
        room = self.rooms[r]
        xyz = room.xyz[idx]
        out = np.empty((9, len(idx)), np.float32)
        out[0:2] = (xyz[:, :2] - centre).T
        out[2] = xyz[:, 2]
        out[3:6] = room.rgb[idx].T
        out[6:9] = (xyz / room.extent).T
        return out

    def __getitem__(self, i: int):
        r, idx = self.point_index(i)
        points = self._features(r, idx, self._items[i][2])
        return torch.from_numpy(points), torch.from_numpy(self.rooms[r].labels[idx])

    def room_prediction(self, r: int, logits: Union[Tensor, np.ndarray]) -> np.ndarray:
        """Labels ``[N]`` of every point of room ``r`` from ``logits [k, C, num_points]`` of its items, in order.

        Each point takes the class most of its predictions voted for (a point can be in several
        blocks when ``stride < block_size``, or repeated as padding); ties go to the lower class;
        -1 for a point no item covered (only in blocks below ``min_block_points``).
        """
        items = self.room_items(r)
        votes_of = torch.as_tensor(logits).argmax(1).cpu().numpy()
        if len(votes_of) != len(items):
            raise UsageError(f"room {self.rooms[r].name} has {len(items)} items, got logits for {len(votes_of)}")
        votes = np.zeros((len(self.rooms[r].labels), self.num_classes), np.int32)
        for i, pred in zip(items, votes_of):
            np.add.at(votes, (self._items[i][1], pred), 1)
        return np.where(votes.any(1), votes.argmax(1), -1)


# ------------------------------------------------------------------ metrics

@dataclass
class SceneScores:
    miou: float  # mean IoU over the classes in the ground truth or the prediction, in %
    oa: float  # overall accuracy over all points, in %
    macc: float  # mean over the classes in the ground truth of their points' accuracy, in %
    iou: dict[str, float]  # per-class IoU (%) of those classes
    points: int


def confusion_matrix(pred, labels, num_classes: int = len(S3DIS_CLASSES)) -> np.ndarray:
    """``[C, C + 1]`` counts, rows ground truth, columns prediction; column ``C`` counts unpredicted (-1) points."""
    pred = np.asarray(torch.as_tensor(pred).cpu()).ravel().astype(np.int64)
    labels = np.asarray(torch.as_tensor(labels).cpu()).ravel().astype(np.int64)
    if pred.shape != labels.shape:
        raise UsageError(f"predictions {pred.shape} and labels {labels.shape} differ in size")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UsageError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    if len(pred) and (pred.min() < -1 or pred.max() >= num_classes):
        raise UsageError(f"predictions must be in -1..{num_classes - 1}, got {pred.min()}..{pred.max()}")
    pred = np.where(pred < 0, num_classes, pred)
    return np.bincount(labels * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1)) \
        .reshape(num_classes, num_classes + 1)


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str] = S3DIS_CLASSES) -> SceneScores:
    c = conf.shape[0]
    tp = np.diag(conf[:, :c]).astype(np.float64)
    gt = conf.sum(1).astype(np.float64)
    predicted = conf[:, :c].sum(0).astype(np.float64)
    union = gt + predicted - tp
    present = union > 0
    iou = {class_names[k]: 100 * tp[k] / union[k] for k in range(c) if present[k]}
    total = conf.sum()
    return SceneScores(miou=float(np.mean(list(iou.values()))) if iou else float("nan"),
                       oa=100 * float(tp.sum() / total) if total else float("nan"),
                       macc=100 * float(np.mean(tp[gt > 0] / gt[gt > 0])) if (gt > 0).any() else float("nan"),
                       iou=iou, points=int(total))


def scene_segmentation_metrics(pred, labels, num_classes: int = len(S3DIS_CLASSES),
                               class_names: Sequence[str] = S3DIS_CLASSES) -> SceneScores:
    """mIoU / OA / mAcc of point predictions against labels, pooled over all points given.

    IoU of class k = TP / (TP + FP + FN) over all points (not per room or per block); mIoU
    averages it over the classes that occur in the labels or the predictions (a class in
    neither has no IoU; one only predicted scores 0). On S3DIS Area 5 all 13 classes occur,
    so this is the usual mean over 13. Predictions -1 (no prediction) count as wrong.
    """
    return scores_from_confusion(confusion_matrix(pred, labels, num_classes), class_names)


@torch.no_grad()
def evaluate_scenes(predict: Callable[[Tensor], Tensor], dataset: S3DIS, batch_size: int = 16,
                    device: Union[str, torch.device] = "cpu") -> SceneScores:
    """Scores over every point of ``dataset``'s rooms: ``predict(points [B, 9, P]) -> logits [B, C, P]``.

    Items are predicted in batches, voted back to the room's points
    (:meth:`S3DIS.room_prediction`) and pooled into one confusion matrix.
    """
    conf = np.zeros((dataset.num_classes, dataset.num_classes + 1), np.int64)
    for r in range(len(dataset.rooms)):
        items = dataset.room_items(r)
        logits = []
        for start in range(0, len(items), batch_size):
            batch = torch.stack([dataset[i][0] for i in items[start:start + batch_size]]).to(device)
            logits.append(predict(batch).cpu())
        conf += confusion_matrix(dataset.room_prediction(r, torch.cat(logits)), dataset.rooms[r].labels,
                                 dataset.num_classes)
    return scores_from_confusion(conf, dataset.class_names)


# ------------------------------------------------------------------ generated scenes
# A room is a list of instances (class, points [n, 3]); every instance is a primitive
# (box surface, rectangle, cylinder, ellipsoid) placed in an axis-aligned room, as the
# S3DIS rooms are aligned. Points are allocated by surface area (roughly uniform density).

_COLOURS = {  # base rgb per class; ceiling/wall/beam/column are deliberately close (geometry must decide)
    "ceiling": (215, 215, 210), "floor": (125, 105, 85), "wall": (200, 195, 185), "beam": (190, 188, 180),
    "column": (195, 190, 182), "window": (140, 170, 205), "door": (150, 105, 65), "table": (165, 125, 85),
    "chair": (60, 62, 75), "sofa": (125, 45, 45), "bookcase": (120, 95, 60), "board": (238, 238, 238),
    "clutter": (128, 128, 128),
}


def _rect(rng, n, origin, u, v):
    """Points on the parallelogram ``origin + a u + b v``, a, b in [0, 1]."""
    a, b = rng.random((2, n, 1))
    return np.asarray(origin, float) + a * np.asarray(u, float) + b * np.asarray(v, float)


class _Builder:
    """Collects (class, instance, area, sampler) for one room; parts of one object share an instance."""

    def __init__(self, rng):
        self.rng, self.parts, self.instances = rng, [], 0

    def new(self) -> int:
        self.instances += 1
        return self.instances

    def add(self, cls: str, area: float, sample: Callable[[int], np.ndarray], inst: Optional[int] = None) -> None:
        self.parts.append((cls, self.new() if inst is None else inst, max(float(area), 1e-3), sample))

    def box(self, cls, centre, size, inst: Optional[int] = None):
        from .data import _box

        size = np.asarray(size, float)
        area = 2 * (size[0] * size[1] + size[1] * size[2] + size[0] * size[2])
        self.add(cls, area, lambda n: _box(self.rng, n, size) + centre, inst)


def _furniture(b: _Builder, rng, w: float, d: float, kind: str) -> None:
    from .data import _cylinder, _ellipsoid

    def table(cx, cy, tw, td):
        h, inst = rng.uniform(0.72, 0.78), b.new()
        b.box("table", (cx, cy, h), (tw, td, 0.04), inst)
        for sx in (-1, 1):
            for sy in (-1, 1):
                c = np.array([cx + sx * (tw / 2 - 0.06), cy + sy * (td / 2 - 0.06), h / 2])
                b.add("table", 2 * math.pi * 0.025 * h,
                      lambda n, c=c, h=h: _cylinder(rng, n, 0.025, h, caps=False) + c, inst)
        for _ in range(rng.integers(0, 3)):  # clutter on the table
            c = np.array([cx + rng.uniform(-tw / 3, tw / 3), cy + rng.uniform(-td / 3, td / 3), h + 0.1])
            r = rng.uniform(0.05, 0.12, 3)
            b.add("clutter", 4 * math.pi * r.mean() ** 2, lambda n, c=c, r=r: _ellipsoid(rng, n, r) + c)
        return h

    def chair(cx, cy, facing):
        s, inst = rng.uniform(0.42, 0.5), b.new()
        b.box("chair", (cx, cy, 0.45), (s, s, 0.05), inst)
        back = np.array([0.0, 0.0])
        back[facing[0]] = facing[1] * s / 2
        size = [s, s, 0.45]
        size[facing[0]] = 0.04
        b.box("chair", (cx + back[0], cy + back[1], 0.7), size, inst)
        for sx in (-1, 1):
            for sy in (-1, 1):
                c = np.array([cx + sx * (s / 2 - 0.03), cy + sy * (s / 2 - 0.03), 0.215])
                b.add("chair", 2 * math.pi * 0.015 * 0.43,
                      lambda n, c=c: _cylinder(rng, n, 0.015, 0.43, caps=False) + c, inst)

    def place_tables(count, tw, td):
        for _ in range(count):
            cx, cy = rng.uniform(tw / 2 + 0.7, w - tw / 2 - 0.7), rng.uniform(td / 2 + 0.7, d - td / 2 - 0.7)
            table(cx, cy, tw, td)
            for side in (-1, 1):
                for k in range(int(rng.integers(1, max(2, int(tw / 0.6)) + 1))):
                    x = cx - tw / 2 + (k + 0.5) * tw / max(1, int(tw / 0.6))
                    chair(min(max(x, 0.3), w - 0.3), cy + side * (td / 2 + 0.35), (1, side))

    if kind == "conferenceRoom":
        place_tables(1, min(w - 1.8, rng.uniform(2.4, 3.6)), rng.uniform(1.0, 1.4))
    elif kind == "office":
        place_tables(int(rng.integers(1, 3)), rng.uniform(1.2, 1.6), rng.uniform(0.6, 0.8))
        if rng.random() < 0.5:
            sw = rng.uniform(1.6, 2.0)
            cx = rng.uniform(sw / 2 + 0.1, w - sw / 2 - 0.1)
            inst = b.new()
            b.box("sofa", (cx, d - 0.45, 0.22), (sw, 0.8, 0.44), inst)
            b.box("sofa", (cx, d - 0.12, 0.6), (sw, 0.18, 0.4), inst)
    for _ in range(int(rng.integers(1, 3) if kind != "hallway" else 0) + (2 if kind == "storage" else 0)):
        bw, bh = rng.uniform(0.8, 1.6), rng.uniform(1.6, 2.2)
        cx = rng.uniform(bw / 2 + 0.05, w - bw / 2 - 0.05)
        y = 0.2 if rng.random() < 0.5 else d - 0.2
        inst = b.new()
        b.box("bookcase", (cx, y, bh / 2), (bw, 0.36, bh), inst)
        for k in range(1, 4):  # shelves
            z = k * bh / 4
            b.add("bookcase", bw * 0.34, lambda n, z=z, cx=cx, y=y, bw=bw: _rect(
                rng, n, (cx - bw / 2, y - 0.17, z), (bw, 0, 0), (0, 0.34, 0)), inst)
    for _ in range(int(rng.integers(2, 7)) + (4 if kind == "storage" else 0)):  # clutter on the floor
        r = rng.uniform(0.1, 0.35, 3)
        c = np.array([rng.uniform(0.4, w - 0.4), rng.uniform(0.4, d - 0.4), r[2]])
        if rng.random() < 0.5:
            b.add("clutter", 4 * math.pi * r.mean() ** 2, lambda n, c=c, r=r: _ellipsoid(rng, n, r) + c)
        else:
            b.box("clutter", c, 2 * r)


def _build_room(rng, kind: str) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Instances ``[(class, points)]`` of one room of type ``kind``, in room coordinates (metres)."""
    if kind == "hallway":
        w, d = rng.uniform(6.0, 10.0), rng.uniform(1.8, 2.6)
    elif kind == "conferenceRoom":
        w, d = rng.uniform(5.0, 8.0), rng.uniform(4.0, 6.0)
    else:
        w, d = rng.uniform(3.5, 6.5), rng.uniform(3.0, 5.5)
    h = rng.uniform(2.7, 3.2)
    b = _Builder(rng)
    b.add("floor", w * d, lambda n: _rect(rng, n, (0, 0, 0), (w, 0, 0), (0, d, 0)))
    b.add("ceiling", w * d, lambda n: _rect(rng, n, (0, 0, h), (w, 0, 0), (0, d, 0)))
    # Walls: (origin, along, length, inward normal); openings (door, window, board) are cut out of them.
    walls = [((0, 0, 0), (1, 0, 0), w, (0, 1, 0)), ((0, d, 0), (1, 0, 0), w, (0, -1, 0)),
             ((0, 0, 0), (0, 1, 0), d, (1, 0, 0)), ((w, 0, 0), (0, 1, 0), d, (-1, 0, 0))]
    openings: list[list[tuple[float, float, float, float]]] = [[] for _ in walls]

    def opening(k, cls, width, z0, height, depth):
        origin, along, length, normal = walls[k]
        if length < width + 0.4:
            return
        for _ in range(10):  # find a free place along the wall
            s = rng.uniform(0.2, length - width - 0.2)
            if all(s + width < a or s > a + aw or z0 + height < z or z0 > z + zh for a, aw, z, zh in openings[k]):
                break
        else:
            return
        openings[k].append((s, width, z0, height))
        start = np.asarray(origin, float) + s * np.asarray(along, float) + depth * np.asarray(normal, float)
        b.add(cls, width * height, lambda n: _rect(rng, n, start + (0, 0, z0), np.asarray(along) * width,
                                                   (0, 0, height)))

    for _ in range(int(rng.integers(1, 3)) + (2 if kind == "hallway" else 0)):
        opening(int(rng.integers(4)), "door", rng.uniform(0.85, 1.0), 0.0, rng.uniform(2.0, 2.2), 0.03)
    for _ in range(int(rng.integers(0, 3)) if kind != "hallway" else 0):
        opening(int(rng.integers(2)), "window", rng.uniform(1.0, 1.8), rng.uniform(0.8, 1.0),
                rng.uniform(1.1, 1.4), 0.04)
    if kind in ("office", "conferenceRoom") and rng.random() < 0.8:
        opening(int(rng.integers(2, 4)), "board", rng.uniform(1.5, 2.5), 0.9, rng.uniform(1.0, 1.2), 0.02)

    for k, (origin, along, length, _) in enumerate(walls):
        def wall(n, origin=origin, along=along, length=length, k=k):
            pts = _rect(rng, n, origin, np.asarray(along) * length, (0, 0, h))
            s = (pts - np.asarray(origin)) @ np.asarray(along, float)
            keep = np.ones(n, bool)
            for a, aw, z, zh in openings[k]:  # the wall behind an opening is not scanned
                keep &= ~((s > a) & (s < a + aw) & (pts[:, 2] > z) & (pts[:, 2] < z + zh))
            return pts[keep]
        b.add("wall", length * h, wall)
    if rng.random() < 0.4:  # a beam across the ceiling
        y = rng.uniform(0.8, d - 0.8)
        b.box("beam", (w / 2, y, h - 0.2), (w, 0.3, 0.4))
    for _ in range(int(rng.integers(0, 3))):  # columns in the corners
        cx, cy = (0.2 if rng.random() < 0.5 else w - 0.2), (0.2 if rng.random() < 0.5 else d - 0.2)
        b.box("column", (cx, cy, h / 2), (0.4, 0.4, h))
    _furniture(b, rng, w, d, kind)
    return np.array([w, d, h]), b.parts


_ROOM_KINDS = ("office", "office", "conferenceRoom", "hallway", "storage")


def _sample_room(rng, parts, num_points: int, noise: float) -> list[tuple[str, np.ndarray]]:
    """``[(class, rows [n, 6] x y z r g b)]``, one entry per instance, points allocated by area."""
    weights = np.array([a for _, _, a, _ in parts])
    counts = rng.multinomial(num_points, weights / weights.sum())
    points: dict[int, list[np.ndarray]] = {}
    classes: dict[int, str] = {}
    for (cls, inst, _, sample), n in zip(parts, counts):
        classes[inst] = cls
        points.setdefault(inst, []).append(sample(int(max(n, 1))))
    instances = []
    for inst, cls in classes.items():
        pts = np.concatenate(points[inst])
        if len(pts) == 0:
            continue
        pts = pts + rng.normal(scale=noise, size=pts.shape)
        base = np.asarray(_COLOURS[cls], float)
        if cls == "clutter":
            base = rng.uniform(40, 230, 3)  # clutter is anything: any colour
        colour = np.clip(base + rng.normal(scale=12, size=3) + rng.normal(scale=8, size=pts.shape), 0, 255)
        instances.append((cls, np.concatenate([pts, np.round(colour)], 1)))
    return instances


def _write_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, lambda f: f.write(buf.getvalue()), clean_stale=False)


def _write_txt(path: Path, rows: np.ndarray) -> None:
    buf = io.StringIO()
    np.savetxt(buf, rows, fmt="%.3f %.3f %.3f %d %d %d")  # the distributed files' format
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()), clean_stale=False)


def generate_scenes(root: Union[str, Path], areas: Iterable[int] = (1, 2, 3, 4, 5, 6), rooms_per_area: int = 3,
                    points_per_room: int = 20000, *, seed: int = 0, layout: str = "npy", noise: float = 0.01,
                    progress: bool = True) -> Path:
    """Write generated rooms under ``root`` in the S3DIS layout(s); returns ``root``.

    ``layout``: ``"npy"`` (``Area_N_<room>.npy``, columns ``x y z r g b label``, shifted to the
    origin as ``collect_indoor3d_data`` writes them), ``"raw"`` (``Area_N/<room>/Annotations/
    <class>_<i>.txt`` rows ``x y z r g b``, in area coordinates as distributed) or ``"both"``.
    Room ``k`` of area ``a`` depends only on ``(seed, a, k)``, not on how many are generated.
    Rooms: offices, conference rooms, hallways and storage rooms with about ``points_per_room``
    points (fewer where the wall behind a door or window is cut out), position noise ``noise``
    metres. Uses its own random generator; the global RNGs are untouched.

    Writes ``generated_scenes.json`` (the arguments) last. If ``root`` already holds rooms, a call
    with the same arguments returns at once (the data are there), any other raises
    :class:`~l1fx.errors.UsageError`: two generations are never mixed, nothing is deleted.
    """
    if layout not in ("npy", "raw", "both"):
        raise UsageError(f"generate_scenes layout must be 'npy', 'raw' or 'both', got {layout!r}")
    for what, v in (("rooms_per_area", rooms_per_area), ("points_per_room", points_per_room)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"generate_scenes {what} must be a positive int, got {v!r}")
    areas = list(areas)
    if not areas or any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in areas):
        raise UsageError(f"generate_scenes areas must be positive ints, got {areas!r}")
    root = Path(root)
    params = {"generator": 1, "areas": areas, "rooms_per_area": rooms_per_area, "points_per_room": points_per_room,
              "seed": seed, "layout": layout, "noise": noise}
    marker = root / "generated_scenes.json"
    if any(root.glob("Area_*_*.npy")) or any(root.glob("Area_*/*/Annotations")):
        # Never mix two generations (the loader would read both) and never delete: reuse or refuse.
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return root
        raise UsageError(f"{root} already holds S3DIS rooms" + (" generated with other arguments"
                         if marker.is_file() else "") + "; generate into a new or empty directory")
    jobs = [(a, k) for a in areas for k in range(rooms_per_area)]
    for area, k in _progress(jobs, progress, desc="generating rooms", unit="room"):
        rng = np.random.default_rng([seed, area, k])
        kind = _ROOM_KINDS[int(rng.integers(len(_ROOM_KINDS)))]
        name = f"{kind}_{k + 1}"
        _, parts = _build_room(rng, kind)
        instances = _sample_room(rng, parts, points_per_room, noise)
        offset = np.array([*rng.uniform(-20, 40, 2), rng.uniform(-1, 1)])  # rooms sit somewhere in their area
        numbers: dict[str, int] = {}
        files = []
        for cls, rows in instances:
            numbers[cls] = numbers.get(cls, 0) + 1
            files.append((f"{cls}_{numbers[cls]}.txt", cls, rows))
        files.sort()  # the order read_annotated_room reads them in, so both layouts list the points alike
        if layout in ("raw", "both"):
            ann = root / f"Area_{area}" / name / "Annotations"
            for file_name, _, rows in files:
                moved = rows.copy()
                moved[:, :3] += offset
                _write_txt(ann / file_name, moved)
        if layout in ("npy", "both"):
            rows = np.concatenate([r for _, _, r in files])
            labels = np.concatenate([np.full(len(r), _CLASS_INDEX[c], float) for _, c, r in files])
            xyz = np.round(rows[:, :3] + offset, 3)  # the same coordinates as the txt files
            xyz -= xyz.min(0)
            _write_npy(root / f"Area_{area}_{name}.npy", np.concatenate([xyz, rows[:, 3:], labels[:, None]], 1))
    text = json.dumps(params).encode()
    atomic_write(marker, lambda f: f.write(text), clean_stale=False)  # last: marks the generation complete
    return root
