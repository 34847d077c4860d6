"""Shape metrics of the garment task (GarmentNets, Chi & Song, ICCV 2021): Chamfer distance, mesh-to-mesh, NOCS error.

* :func:`chamfer_distance`: between point sets ``a [B, N, 3]`` and ``b [B, M, 3]``,
  per batch item, **the mean of the two mean nearest-neighbour distances**::

      CD(a, b) = 1/2 * ( mean_i min_j |a_i - b_j|  +  mean_j min_i |a_i - b_j| )

  with the *Euclidean* (not squared) distance, so that the value is a length in
  the points' unit (a Chamfer distance "in cm" is a typical surface error in cm;
  the squared form, common as a training loss, would be in cm² and weight
  outliers quadratically). Halving the sum makes ``CD(a, a + t) = |t|`` for a
  shift ``t`` smaller than the point spacing allows, and keeps it symmetric.
  Memory is bounded: the distance matrix is built ``chunk`` rows of ``a`` (and
  then of ``b``) at a time, ``B * chunk * max(N, M)`` floats at most, on the
  device of the inputs (CPU or GPU). Empty sets (``N == 0`` or ``M == 0``) raise
  :class:`l1fx.errors.UsageError`: a mean over no points is undefined, and a
  silent 0 or inf would enter averages unnoticed. A single point is an ordinary set.
* :func:`sample_surface`: area-weighted uniform points on a triangle mesh, so that
  :func:`mesh_chamfer_distance` compares two meshes through their surfaces (not
  their vertices, whose density depends on the tessellation).
* :func:`nocs_error`: the mean Euclidean error of predicted per-point canonical
  (NOCS) coordinates, GarmentNets' stage-one measure.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError

__all__ = ["chamfer_distance", "nearest_distances", "sample_surface", "mesh_chamfer_distance", "nocs_error"]


def _check_sets(a: Tensor, b: Tensor, what: str) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise UsageError(f"{what}: {name} must be a tensor [B, N, D], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise UsageError(f"{what}: a {tuple(a.shape)} and b {tuple(b.shape)} need the same batch size and "
                         f"point dimension")
    if a.shape[1] == 0 or b.shape[1] == 0:
        raise UsageError(f"{what}: empty point set (a has {a.shape[1]}, b has {b.shape[1]} points); the mean "
                         f"nearest distance of no points is undefined")


def nearest_distances(a: Tensor, b: Tensor, chunk: int = 1024) -> Tensor:
    """``[B, N]``: the Euclidean distance of every point of ``a [B, N, D]`` to its nearest point of ``b [B, M, D]``.

    ``chunk`` rows of ``a`` at a time, so at most ``B * chunk * M`` distances are alive.
    """
    _check_sets(a, b, "nearest_distances")
    if chunk < 1:
        raise UsageError(f"nearest_distances: chunk must be at least 1, got {chunk}")
    out = [torch.cdist(a[:, i:i + chunk], b, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=2)
           for i in range(0, a.shape[1], chunk)]
    return torch.cat(out, dim=1)


def chamfer_distance(a: Tensor, b: Tensor, chunk: int = 1024) -> Tensor:
    """``[B]``: ``(mean nearest distance a -> b + mean nearest distance b -> a) / 2``, Euclidean (module docstring)."""
    return 0.5 * (nearest_distances(a, b, chunk).mean(1) + nearest_distances(b, a, chunk).mean(1))


def sample_surface(vertices, faces, count: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``[count, 3]`` points uniform on the surface of the mesh ``vertices [V, 3]``, ``faces [F, 3]`` (numpy)."""
    rng = np.random.default_rng(0) if rng is None else rng
    v, f = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    if len(f) == 0 or count < 1:
        raise UsageError(f"sample_surface: need at least one face and count >= 1, got {len(f)} faces, "
                         f"count {count}")
    tri = v[f]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if not area.sum() > 0:
        raise UsageError("sample_surface: the mesh has zero area")
    pick = rng.choice(len(f), size=count, p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)  # uniform barycentrics on a triangle
    w = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
    return np.einsum("nk,nkd->nd", w, tri[pick])


def mesh_chamfer_distance(vertices_a, faces_a, vertices_b, faces_b, count: int = 2000,
                          rng: Optional[np.random.Generator] = None) -> float:
    """Chamfer distance between two meshes through ``count`` surface samples of each (:func:`sample_surface`)."""
    rng = np.random.default_rng(0) if rng is None else rng
    pa = torch.from_numpy(sample_surface(vertices_a, faces_a, count, rng))[None]
    pb = torch.from_numpy(sample_surface(vertices_b, faces_b, count, rng))[None]
    return float(chamfer_distance(pa, pb)[0])


def nocs_error(predicted: Tensor, target: Tensor) -> Tensor:
    """``[B]``: mean Euclidean distance between predicted and true NOCS coordinates, both ``[B, 3, N]``."""
    if predicted.shape != target.shape or predicted.dim() != 3 or predicted.shape[2] == 0:
        raise UsageError(f"nocs_error: predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must "
                         f"be equal non-empty [B, 3, N]")
    return (predicted - target).norm(dim=1).mean(1)
