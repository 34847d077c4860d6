"""GarmentNets (Chi & Song, ICCV 2021) in plain PyTorch: category-level garment pose from a partial point cloud.

The pipeline of the authors' code (``networks/pointnet2_nocs.py``, ``networks/
conv_implicit_wnf.py``), at CPU size:

1. **Canonicalisation**: a PointNet++ (SSG set abstraction + feature propagation,
   :mod:`l1fx.models`' building blocks) on the observed points ``[B, 3, N]``
   (world, metres) gives every point a feature and its NOCS coordinate. The authors
   classify each NOCS axis into 64 bins; here the NOCS coordinate is regressed (a
   sigmoid per axis), which needs no bin count for a 16-32^3 grid.
2. **Feature scattering** (:func:`scatter_to_grid`): the per-point features, the
   points' world xyz and an occupancy channel are averaged into the voxels of a
   ``G^3`` grid over the NOCS cube, at the *predicted* NOCS coordinates (detached:
   the index is discrete; the features carry the gradient).
3. **Shape completion**: a 3D U-Net (Conv3d + BatchNorm3d + ReLU twice per level,
   max-pool down, ``nn.ConvTranspose3d`` up, skip connections) predicts on the grid
   the winding-number field (1 channel) and the warp field (3 channels: the world
   position of the canonical point at each voxel).

:func:`extract_mesh` runs marching cubes (scikit-image) on a winding-number field at
level 1/2 for the canonical mesh, and :func:`warp_points` moves its vertices to the
world through the warp field (trilinear), as GarmentNets does. ``forward(points)``
returns ``(nocs [B, 3, N], winding [B, 1, G, G, G], warp [B, 3, G, G, G])``.
The layers are ordinary ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose3d`` and ``nn.Linear``,
so ``l1fx.convert`` treats the pipeline as any user model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GarmentNets", "scatter_to_grid", "extract_mesh", "warp_points", "garment_losses"]


@torch.fx.wrap
def scatter_to_grid(feats: Tensor, nocs: Tensor, grid: int) -> Tensor:
    """Mean of ``feats [B, C, N]`` per voxel of a ``grid^3`` NOCS grid at ``nocs [B, 3, N]`` (in [0, 1]),
    plus an occupancy channel: ``[B, C + 1, G, G, G]``, voxel ``(i, j, k)`` covering x, y, z in ``[i/G, (i+1)/G)``."""
    b, c, n = feats.shape
    ijk = (nocs.detach() * grid).floor().long().clamp_(0, grid - 1)
    flat = (ijk[:, 0] * grid + ijk[:, 1]) * grid + ijk[:, 2]  # [B, N]
    index = flat[:, None].expand(-1, c, -1)
    total = feats.new_zeros(b, c, grid ** 3).scatter_add(2, index, feats)
    count = feats.new_zeros(b, 1, grid ** 3).scatter_add(2, flat[:, None], feats.new_ones(b, 1, n))
    mean = total / count.clamp(min=1.0)
    return torch.cat([mean, (count > 0).to(feats.dtype)], 1).reshape(b, c + 1, grid, grid, grid)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(),
                         nn.Conv3d(c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU())


class UNet3D(nn.Module):
    """A 3D U-Net: ``len(widths)`` levels, max-pool down, ConvTranspose3d (kernel 2, stride 2) up, skips."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        self.down = nn.ModuleList(_double_conv(c_in, c_out) for c_in, c_out in zip([in_channels, *widths], widths))
        ups = list(zip(widths[::-1][:-1], widths[::-1][1:]))  # (deeper, shallower)
        self.up = nn.ModuleList(nn.ConvTranspose3d(deep, shallow, 2, stride=2) for deep, shallow in ups)
        self.dec = nn.ModuleList(_double_conv(2 * shallow, shallow) for _, shallow in ups)
        self.head = nn.Conv3d(widths[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, skips[-2::-1]):
            x = dec(torch.cat([skip, up(x)], 1))
        return self.head(x)


class GarmentNets(nn.Module):
    """The two-stage pipeline (module docstring); full size is a 128^3 grid, 6000 points and 64-bin NOCS."""

    def __init__(self, grid: int = 16, npoint: Sequence[int] = (128, 32), radius: Sequence[float] = (0.1, 0.25),
                 nsample: Sequence[int] = (16, 16),
                 sa_mlps: Sequence[Sequence[int]] = ((32, 32, 64), (64, 64, 128)),
                 fp_mlps: Sequence[Sequence[int]] = ((128, 64), (64, 64)), features: int = 32,
                 unet: Sequence[int] = (16, 32, 64)):
        super().__init__()
        from .models import FeaturePropagation, SetAbstraction, _mlp

        levels = len(npoint)
        if not (len(radius) == len(nsample) == len(sa_mlps) == len(fp_mlps) == levels >= 1):
            raise ValueError(f"GarmentNets needs as many radius, nsample, sa_mlps and fp_mlps as npoint ({levels}), "
                             f"got {len(radius)}, {len(nsample)}, {len(sa_mlps)}, {len(fp_mlps)}")
        if grid % 2 ** (len(unet) - 1):
            raise ValueError(f"GarmentNets grid {grid} must be divisible by 2^{len(unet) - 1} (the U-Net's poolings)")
        self.grid = grid
        widths = [3] + [m[-1] for m in sa_mlps]
        self.sa = nn.ModuleList(SetAbstraction(npoint[i], radius[i], nsample[i], widths[i], sa_mlps[i])
                                for i in range(levels))
        fps, below = [], widths[-1]
        for k, level in enumerate(range(levels, 0, -1)):
            skip = widths[level - 1]  # the raw xyz too: NOCS regression needs the fine position
            fps.append(FeaturePropagation(below + skip, fp_mlps[k]))
            below = fp_mlps[k][-1]
        self.fp = nn.ModuleList(fps)
        self.point_head = _mlp("1d", [below, features])
        self.nocs_head = nn.Conv1d(features, 3, 1)
        self.unet = UNet3D(features + 3 + 1, 4, unet)  # features, world xyz, occupancy -> winding, warp

    def forward(self, points: Tensor):
        from .models import encode_decode  # here, not at module level: the import would be circular

        # the raw xyz are the finest skip: NOCS regression needs the fine position
        x = self.point_head(encode_decode(self.sa, self.fp, points.transpose(1, 2).contiguous(), points))
        nocs = torch.sigmoid(self.nocs_head(x))
        volume = scatter_to_grid(torch.cat([x, points], 1), nocs, self.grid)
        out = self.unet(volume)
        return nocs, out[:, :1], out[:, 1:]


def garment_losses(outputs, nocs: Tensor, winding: Tensor, warp: Tensor) -> dict:
    """The three mean squared errors (NOCS, winding number, warp field in metres) of a forward pass."""
    p_nocs, p_winding, p_warp = outputs
    return {"nocs": F.mse_loss(p_nocs, nocs), "winding": F.mse_loss(p_winding, winding),
            "warp": F.mse_loss(p_warp, warp)}


def extract_mesh(winding: np.ndarray, level: float = 0.5) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Marching cubes of ``winding [G, G, G]`` at ``level``: ``(vertices [V, 3] in NOCS, faces [F, 3])``,
    or ``None`` when the field does not cross ``level`` (no surface)."""
    from skimage.measure import marching_cubes

    winding = np.asarray(winding, dtype=np.float32)
    if not (winding.min() < level < winding.max()):
        return None
    g = winding.shape[0]
    verts, faces, _, _ = marching_cubes(winding, level=level)
    return (verts + 0.5) / g, faces.astype(np.int64)  # voxel centres are at (i + 1/2) / G


def warp_points(warp: Tensor, nocs: Tensor) -> Tensor:
    """Trilinear samples ``[P, 3]`` of a warp field ``[3, G, G, G]`` (x, y, z index order) at NOCS points ``[P, 3]``."""
    # grid_sample's grid is (x -> last axis W, y -> H, z -> first axis D): our axes are (x, y, z) = (D, H, W)
    g = (2 * nocs.to(warp.dtype) - 1).flip(-1).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(warp[None], g, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(3, -1).T
