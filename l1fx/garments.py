"""Generated garments for GarmentNets-style pose estimation (no download): meshes, hanging, partial views, fields.

GarmentNets (Chi & Song, ICCV 2021) trains on CLOTH3D garments simulated while
grasped at a point and hanging, seen by a depth camera. This module makes a small
stand-in with the same structure, seeded and deterministic:

* **Canonical garments** (metres, y up, a T-pose like CLOTH3D's): each category is a
  union of open tubes of elliptical cross-section with its own topology -- ``top``
  (one torso tube), ``dress`` (one tube, narrow waist, flared hem), ``skirt`` (a
  cone frustum), ``shirt`` (torso + two sleeve tubes), ``pants`` (waist + two leg
  tubes), ``jumpsuit`` (torso + two sleeves + two legs). Every size is drawn per
  instance (``_TEMPLATES``). Faces are oriented outwards.
* **NOCS** (normalised canonical coordinates): ``(p - centre_c) / side_c + 1/2``
  with one fixed cube (centre, side in metres) per category, as GarmentNets scales
  each category by one factor; every instance lies in ``[0, 1]^3`` by construction
  (:func:`make_garment` checks it). A distance in NOCS times ``side_c`` is metres.
* **Hanging** (:func:`hang`, a procedural drape, not a simulation): the garment is
  held at a random vertex; it turns as a rigid pendulum so that its centre of mass
  is below the grasp point, then every vertex keeps its distance to the grasp point
  while its direction is pulled towards straight down (gravity sag, more for
  far vertices), sinusoidal folds are added across the hanging direction, and the
  whole is turned about the vertical by a small random angle (``yaw_jitter``, default
  ±0.25 rad). GarmentNets' simulator lifts each garment from its canonical layout and
  its cameras sit in the gripper's frame, so the hanging yaw follows from the grasp;
  a uniform random yaw (tried first) makes NOCS unobservable from one view: a
  PointNet++ trained on 1200 such views stayed near the mean predictor (test NOCS
  error 0.25 vs 0.27) where without it the error fell to 0.16 in the same 1200 steps.
  World coordinates are metres with the grasp point at the origin.
* **Several grasps per instance** (``grasps``): as GarmentNets simulates each CLOTH3D
  garment from several grasp points, one canonical instance (and its winding field,
  the costly part) can be hung from ``grasps`` random vertices.
* **Partial view** (:func:`render_partial`): points sampled uniformly on the hanging
  surface, kept when within ``depth_tol`` of the nearest surface in their cell of a
  ``cell``-sized z-buffer seen from +z (the camera side); each kept point carries
  the NOCS coordinate of the same surface point (barycentric correspondence).
* **Fields on the canonical grid** (``G^3`` voxel centres ``(i + 1/2) / G`` in NOCS):
  the *generalised winding number* of the canonical mesh (Jacobson et al. 2013; the
  solid angle of the open surface over 4 pi: ~1 inside a tube, ~0 outside, about 1/2
  across an opening), GarmentNets' shape target, and the *warp field*: at every voxel,
  the world position (hanging) of the nearest canonical surface point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import UsageError

__all__ = ["GARMENT_CATEGORIES", "NOCS_BOXES", "YAW_JITTER", "Garment", "make_garment", "make_garments", "hang", "render_partial",
           "winding_number", "garment_fields", "generate_garments", "canonical_mesh"]

GARMENT_CATEGORIES = ("dress", "jumpsuit", "skirt", "top", "pants", "shirt")

# Per category: the NOCS cube (centre xyz, side) in metres. Every instance's canonical mesh fits inside
# (sizes below are drawn within +-10 %); make_garment raises if one does not.
NOCS_BOXES = {
    "dress": ((0.0, -0.2, 0.0), 1.25),
    "jumpsuit": ((0.0, -0.05, 0.0), 1.5),
    "skirt": ((0.0, -0.05, 0.0), 0.9),
    "top": ((0.0, 0.0, 0.0), 0.8),
    "pants": ((0.0, -0.1, 0.0), 1.3),
    "shirt": ((0.0, 0.05, 0.0), 1.4),
}

RING = 16  # vertices per tube cross-section


@dataclass
class Garment:
    """One generated example: canonical and hanging mesh, the partial view, and the canonical-grid targets."""

    category: int
    canonical: np.ndarray  # [V, 3] NOCS coordinates of the vertices (in [0, 1])
    world: np.ndarray  # [V, 3] hanging positions (metres, grasp point at the origin)
    faces: np.ndarray  # [F, 3] int64
    points: np.ndarray  # [N, 3] observed partial point cloud (world, metres)
    nocs: np.ndarray  # [N, 3] NOCS coordinate of each observed point
    winding: np.ndarray  # [G, G, G] generalised winding number of the canonical mesh at the voxel centres
    warp: np.ndarray  # [3, G, G, G] world position of the nearest canonical surface point of each voxel centre
    grasp: int  # index of the grasped vertex
    visible_fraction: float  # fraction of the surface samples the camera sees

    @property
    def side(self) -> float:
        """The NOCS cube side of this garment's category, metres (NOCS distance x side = metres)."""
        return NOCS_BOXES[GARMENT_CATEGORIES[self.category]][1]


# ---------------------------------------------------------------- canonical meshes
def _tube(centres: np.ndarray, radii: np.ndarray, e1: np.ndarray, e2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An open tube: rings of RING vertices around ``centres [S, 3]`` with half-axes ``radii [S, 2]`` along e1, e2."""
    theta = 2 * np.pi * np.arange(RING) / RING
    cos, sin = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]
    ring = cos * radii[:, None, :1] * e1 + sin * radii[:, None, 1:] * e2
    verts = (centres[:, None, :] + ring).reshape(-1, 3)
    faces = []
    for s in range(len(centres) - 1):
        for k in range(RING):
            a, b = s * RING + k, s * RING + (k + 1) % RING
            c, d = a + RING, b + RING
            faces += [(a, b, d), (a, d, c)]
    faces = np.asarray(faces, dtype=np.int64)
    # orient outwards: the winding number at a middle centre must be positive
    mid = centres[len(centres) // 2][None]
    if winding_number(verts, faces, mid)[0] < 0:
        faces = faces[:, ::-1].copy()
    return verts, faces


def _vertical(top: Sequence[float], length: float, radii_profile: np.ndarray, splay: float = 0.0):
    """A tube hanging down from ``top`` (xyz) over ``length``; ``radii_profile [S, 2]`` top to bottom."""
    s = len(radii_profile)
    t = np.linspace(0, 1, s)
    centres = np.stack([top[0] + splay * t * length, top[1] - t * length, np.full(s, top[2])], 1)
    return _tube(centres, radii_profile, np.array([1.0, 0, 0]), np.array([0, 0, 1.0]))


def _sleeve(shoulder: Sequence[float], side: float, length: float, r0: float, r1: float, droop: float):
    """A sleeve from ``shoulder`` outwards along ``side`` (+1 / -1) x, dropping ``droop`` metres over its length."""
    s = 6
    t = np.linspace(0, 1, s)
    centres = np.stack([shoulder[0] + side * t * length, shoulder[1] - droop * t, np.full(s, shoulder[2])], 1)
    r = np.linspace(r0, r1, s)
    return _tube(centres, np.stack([r, r * 0.9], 1), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))


def _profile(widths: Sequence[float], depth_ratio: float, stations: int) -> np.ndarray:
    """``[stations, 2]`` half-axes interpolated through ``widths`` (x half-widths); z half-depth = ratio * x."""
    x = np.interp(np.linspace(0, 1, stations), np.linspace(0, 1, len(widths)), widths)
    return np.stack([x, x * depth_ratio], 1)


def canonical_mesh(category: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random instance of ``category``: canonical vertices (metres) and faces, a union of tubes."""
    u = lambda: rng.uniform(0.9, 1.1)  # noqa: E731  per-size variation
    depth = rng.uniform(0.5, 0.65)
    parts = []
    if category == "top":
        w, h = 0.2 * u(), 0.55 * u()
        parts.append(_vertical((0, 0.3, 0), h, _profile([w * 0.9, w, w * 0.95, w * 1.05], depth, 8)))
    elif category == "dress":
        w, h, hem = 0.17 * u(), 1.0 * u(), 0.38 * u()
        parts.append(_vertical((0, 0.35, 0), h, _profile([w, w * 0.85, w * 1.2, hem * 0.8, hem], depth, 12)))
    elif category == "skirt":
        waist, hem, h = 0.17 * u(), 0.33 * u(), 0.6 * u()
        parts.append(_vertical((0, 0.25, 0), h, _profile([waist, hem], 0.75, 8)))
    elif category == "shirt":
        w, h = 0.2 * u(), 0.6 * u()
        parts.append(_vertical((0, 0.35, 0), h, _profile([w, w, w * 1.05], depth, 8)))
        length, droop = 0.42 * u(), rng.uniform(0.0, 0.1)
        for side in (-1, 1):
            parts.append(_sleeve((side * w * 0.97, 0.27, 0), side, length, 0.075, 0.055, droop))
    elif category == "pants":
        w, leg = 0.19 * u(), 0.85 * u()
        parts.append(_vertical((0, 0.45, 0), 0.16, _profile([w, w * 1.02], 0.7, 3)))
        for side in (-1, 1):
            parts.append(_vertical((side * w * 0.5, 0.32, 0), leg, _profile([w * 0.52, w * 0.4], 1.0, 9),
                                   splay=side * rng.uniform(0.0, 0.1)))
    elif category == "jumpsuit":
        w, h, leg = 0.19 * u(), 0.5 * u(), 0.75 * u()
        parts.append(_vertical((0, 0.6, 0), h, _profile([w, w * 0.95, w * 1.05], depth, 7)))
        for side in (-1, 1):
            parts.append(_sleeve((side * w * 0.97, 0.52, 0), side, 0.22 * u(), 0.075, 0.065, 0.03))
            parts.append(_vertical((side * w * 0.5, 0.12, 0), leg, _profile([w * 0.52, w * 0.4], 1.0, 8)))
    else:
        raise UsageError(f"unknown garment category {category!r}; choose one of {', '.join(GARMENT_CATEGORIES)}")
    verts, faces, offset = [], [], 0
    for v, f in parts:
        verts.append(v)
        faces.append(f + offset)
        offset += len(v)
    return np.concatenate(verts), np.concatenate(faces)


def to_nocs(category: str, points: np.ndarray) -> np.ndarray:
    centre, side = NOCS_BOXES[category]
    return (points - np.asarray(centre)) / side + 0.5


def from_nocs(category: str, nocs: np.ndarray) -> np.ndarray:
    centre, side = NOCS_BOXES[category]
    return (nocs - 0.5) * side + np.asarray(centre)


# ---------------------------------------------------------------- winding number
def winding_number(vertices: np.ndarray, faces: np.ndarray, queries: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Generalised winding number ``[Q]`` of the triangle mesh at ``queries [Q, 3]``: sum of solid angles / 4 pi.

    Van Oosterom & Strackee's solid angle of each triangle; exact 1 / 0 inside / outside a closed
    outward mesh, a smooth field for an open one.
    """
    import torch  # vectorised over (query, face) pairs: numpy's einsum is ~5x slower here

    tri = torch.from_numpy(np.asarray(vertices, dtype=np.float32)[np.asarray(faces)])  # [F, 3, 3]
    q = torch.from_numpy(np.asarray(queries, dtype=np.float32))
    out = []
    for i in range(0, len(q), chunk):
        d = tri[None] - q[i:i + chunk, None, None]  # [q, F, 3, 3]
        a, b, c = d[:, :, 0], d[:, :, 1], d[:, :, 2]
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.linalg.cross(b, c)).sum(-1)
        den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        out.append((2 * torch.atan2(det, den)).sum(1) / (4 * math.pi))
    return torch.cat(out).double().numpy()


# ---------------------------------------------------------------- hanging and viewing
def _rotation_to(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The rotation matrix taking unit vector ``u`` to unit vector ``v`` (Rodrigues)."""
    axis, c = np.cross(u, v), float(np.dot(u, v))
    s = np.linalg.norm(axis)
    if s < 1e-9:
        if c > 0:
            return np.eye(3)
        perp = np.array([1.0, 0, 0]) if abs(u[0]) < 0.9 else np.array([0, 0, 1.0])
        axis = np.cross(u, perp)
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)  # a half turn about an axis perpendicular to u
    k = axis / s
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * kx + (1 - c) * kx @ kx


YAW_JITTER = 0.25  # radians, the default spread of the hanging yaw (module docstring)


def hang(vertices: np.ndarray, grasp: int, rng: np.random.Generator, yaw_jitter: float = YAW_JITTER) -> np.ndarray:
    """World positions ``[V, 3]`` of the garment held at vertex ``grasp`` (module docstring): metres, grasp at 0."""
    q = vertices - vertices[grasp]
    down = np.array([0.0, -1.0, 0.0])
    com = q.mean(0)
    if np.linalg.norm(com) > 1e-9:  # rigid pendulum: centre of mass below the grasp point
        q = q @ _rotation_to(com / np.linalg.norm(com), down).T
    r = np.linalg.norm(q, axis=1, keepdims=True)
    r_max = max(float(r.max()), 1e-9)
    sag = rng.uniform(0.3, 0.6) * (r / r_max) ** 0.5  # far cloth sags more
    direction = (1 - sag) * q / np.maximum(r, 1e-12) + sag * down
    q = r * direction / np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    amp, wavelength = rng.uniform(0.015, 0.04), rng.uniform(0.18, 0.35)
    phase = rng.uniform(0, 2 * np.pi, 2)
    fold = amp * (r[:, 0] / r_max)
    q[:, 0] += fold * np.sin(2 * np.pi * q[:, 1] / wavelength + phase[0])
    q[:, 2] += fold * np.sin(2 * np.pi * q[:, 1] / wavelength + phase[1])
    yaw = rng.uniform(-yaw_jitter, yaw_jitter)
    c, s = math.cos(yaw), math.sin(yaw)
    return q @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]).T


def _surface_samples(world: np.ndarray, canonical: np.ndarray, faces: np.ndarray, count: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform on the hanging surface and the canonical points at the same barycentrics."""
    stacked = np.concatenate([world, canonical], 1)  # sample both at once: same triangle, same barycentrics
    tri = world[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], 1)
    out = np.einsum("nk,nkd->nd", w, stacked[faces[pick]])
    return out[:, :3], out[:, 3:]


def render_partial(world: np.ndarray, canonical: np.ndarray, faces: np.ndarray, num_points: int,
                   rng: np.random.Generator, cell: float = 0.02, depth_tol: float = 0.015,
                   per_cell: float = 20.0) -> tuple[np.ndarray, np.ndarray, float]:
    """The camera's view from +z: ``(points [N, 3], their canonical coordinates [N, 3], visible fraction)``.

    The hanging surface is sampled uniformly, ``per_cell`` samples per ``cell^2`` of its area (dense
    enough that a cell covered by a front surface almost surely holds a front sample, so the back does
    not leak through); a sample is visible when its z is within ``depth_tol`` of the largest z of its
    ``cell x cell`` (x, y) cell. ``num_points`` are drawn from the visible samples (with replacement
    only if fewer are visible).
    """
    tri = world[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    samples = max(1000, int(math.ceil(per_cell * area / cell ** 2)))
    pts, can = _surface_samples(world, canonical, faces, samples, rng)
    ij = np.floor(pts[:, :2] / cell).astype(np.int64)
    ij -= ij.min(0)
    cell_id = ij[:, 0] * (ij[:, 1].max() + 1) + ij[:, 1]
    zmax = np.full(cell_id.max() + 1, -np.inf)
    np.maximum.at(zmax, cell_id, pts[:, 2])
    visible = np.flatnonzero(pts[:, 2] >= zmax[cell_id] - depth_tol)
    pick = rng.choice(visible, size=num_points, replace=len(visible) < num_points)
    return pts[pick], can[pick], len(visible) / samples


def grid_centres(grid: int) -> np.ndarray:
    """``[G^3, 3]`` NOCS voxel centres ``(i + 1/2) / G``, in (x, y, z) index order (x slowest)."""
    c = (np.arange(grid) + 0.5) / grid
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)


def garment_fields(category: str, canonical_m: np.ndarray, world: np.ndarray, faces: np.ndarray, grid: int,
                   rng: np.random.Generator, samples: int = 4000,
                   winding: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Winding number ``[G, G, G]`` and warp field ``[3, G, G, G]`` on the canonical grid (module docstring).

    ``winding``: the field of this canonical mesh if already computed (it does not depend on the hanging)."""
    centres_m = from_nocs(category, grid_centres(grid))
    if winding is None:
        winding = winding_number(canonical_m, faces, centres_m).reshape(grid, grid, grid)
    surf_w, surf_c = _surface_samples(world, canonical_m, faces, samples, rng)
    import torch

    nearest = torch.cdist(torch.from_numpy(centres_m), torch.from_numpy(surf_c)).argmin(1).numpy()
    warp = surf_w[nearest].T.reshape(3, grid, grid, grid)
    return winding, warp


def _check_category(category: str) -> None:
    if category not in GARMENT_CATEGORIES:
        raise UsageError(f"unknown garment category {category!r}; choose one of {', '.join(GARMENT_CATEGORIES)}")


def make_garments(category: str, rng: np.random.Generator, num_points: int = 512, grid: int = 16, grasps: int = 1,
                  yaw_jitter: float = YAW_JITTER) -> list[Garment]:
    """One canonical instance of ``category`` hung from ``grasps`` random vertices (module docstring), from ``rng``."""
    _check_category(category)
    verts_m, faces = canonical_mesh(category, rng)
    canonical = to_nocs(category, verts_m)
    if canonical.min() < 0 or canonical.max() > 1:  # a bug in the templates or NOCS_BOXES, never the user's
        raise AssertionError(f"{category}: canonical mesh leaves the NOCS cube ({canonical.min()}, {canonical.max()})")
    out, winding = [], None
    for _ in range(grasps):
        grasp = int(rng.integers(len(verts_m)))
        world = hang(verts_m, grasp, rng, yaw_jitter)
        points, nocs, visible = render_partial(world, canonical, faces, num_points, rng)
        winding, warp = garment_fields(category, verts_m, world, faces, grid, rng, winding=winding)
        out.append(Garment(GARMENT_CATEGORIES.index(category), canonical.astype(np.float32),
                           world.astype(np.float32), faces, points.astype(np.float32), nocs.astype(np.float32),
                           winding.astype(np.float32), warp.astype(np.float32), grasp, visible))
    return out


def make_garment(category: str, rng: np.random.Generator, num_points: int = 512, grid: int = 16,
                 yaw_jitter: float = YAW_JITTER) -> Garment:
    """One generated example of ``category`` (see the module docstring), drawn from ``rng``."""
    return make_garments(category, rng, num_points, grid, 1, yaw_jitter)[0]


def generate_garments(per_category: int, categories: Sequence[str] = GARMENT_CATEGORIES, seed: int = 0,
                      num_points: int = 512, grid: int = 16, grasps: int = 1,
                      yaw_jitter: float = YAW_JITTER) -> list[Garment]:
    """``per_category`` instances of each category, each hung from ``grasps`` grasp points (so
    ``per_category * grasps`` garments per category), deterministic in ``seed`` (one generator per category)."""
    if per_category < 1 or num_points < 1 or grid < 2 or grasps < 1:
        raise UsageError(f"generate_garments: per_category, num_points and grasps must be >= 1 and grid >= 2, got "
                         f"{per_category}, {num_points}, {grasps}, {grid}")
    if not (yaw_jitter >= 0 and math.isfinite(yaw_jitter)):
        raise UsageError(f"generate_garments: yaw_jitter must be a finite angle >= 0 (radians), got {yaw_jitter}")
    out = []
    for category in categories:
        _check_category(category)
        rng = np.random.default_rng([seed, GARMENT_CATEGORIES.index(category)])
        for _ in range(per_category):
            out += make_garments(category, rng, num_points, grid, grasps, yaw_jitter)
    return out


def collate(garments: Sequence[Garment], indices: Optional[Sequence[int]] = None):
    """Training tensors of ``garments``: points ``[B, 3, N]``, nocs ``[B, 3, N]``, winding ``[B, 1, G, G, G]``,
    warp ``[B, 3, G, G, G]``, category ``[B]``."""
    import torch

    items = [garments[i] for i in (range(len(garments)) if indices is None else indices)]
    return (torch.from_numpy(np.stack([g.points.T for g in items])),
            torch.from_numpy(np.stack([g.nocs.T for g in items])),
            torch.from_numpy(np.stack([g.winding for g in items]))[:, None],
            torch.from_numpy(np.stack([g.warp for g in items])),
            torch.tensor([g.category for g in items]))
