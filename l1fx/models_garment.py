"""GarmentNets (Chi & Song, ICCV 2021) in plain PyTorch: category-level garment pose from a partial point cloud.

The pipeline of the authors' code (``networks/pointnet2_nocs.py``, ``networks/
conv_implicit_wnf.py``), at CPU size:

1. **Canonicalisation**: a PointNet++ (SSG set abstraction + feature propagation,
   :mod:`l1fx.models`' building blocks) on the observed points ``[B, 3, N]``
   (world, metres) gives every point a feature and its NOCS coordinate: regressed (a
   sigmoid per axis, the default ``nocs_bins=0``), or, as the authors do, classified per
   axis into ``nocs_bins`` bins (``3 * nocs_bins`` logits a point, cross-entropy against the
   bin of the true coordinate, :func:`garment_losses`) and read out as the softmax
   expectation of the bin centres (``nocs_readout="expectation"``, the default: lower test
   NOCS error in every stage-one probe, examples/RESULTS.md) or the centre of the most likely
   bin (``"argmax"``, the authors' read-out).
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
returns ``(nocs [B, 3, N], winding [B, 1, G, G, G], warp [B, 3, G, G, G])``, and with
``nocs_bins=K`` a fourth output, the NOCS logits ``[B, 3, K, N]``.
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

__all__ = ["GarmentNets", "scatter_to_grid", "extract_mesh", "warp_points", "garment_losses", "nocs_from_logits",
           "nocs_bin_targets", "nocs_cross_entropy", "NOCS_READOUTS"]

NOCS_READOUTS = ("argmax", "expectation")


def nocs_bin_targets(nocs: Tensor, bins: int) -> Tensor:
    """The bin of each NOCS coordinate (``[..]`` in [0, 1] -> ``[..]`` int64 in ``0 .. bins-1``): bin ``k`` covers
    ``[k/K, (k+1)/K)``, 1 itself falls into the last bin."""
    return (nocs.detach() * bins).floor().long().clamp_(0, bins - 1)


def nocs_from_logits(logits: Tensor, readout: str = "argmax") -> Tensor:
    """NOCS coordinates ``[B, 3, N]`` from per-axis bin logits ``[B, 3, K, N]``: the centre ``(k + 1/2) / K`` of the
    most likely bin (``"argmax"``, not differentiable) or the expectation of the bin centres under the softmax
    (``"expectation"``, differentiable; between two likely bins it lands between them)."""
    k = logits.shape[2]
    if readout == "argmax":
        return (logits.argmax(2).to(logits.dtype) + 0.5) / k
    if readout == "expectation":
        centres = (torch.arange(k, dtype=logits.dtype, device=logits.device) + 0.5) / k
        return (logits.softmax(2) * centres[:, None]).sum(2)
    raise ValueError(f"unknown NOCS read-out {readout!r}; choose from {', '.join(NOCS_READOUTS)}")


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
                 unet: Sequence[int] = (16, 32, 64), nocs_bins: int = 0,
                 nocs_readout: str = "expectation"):
        super().__init__()
        from .models import FeaturePropagation, SetAbstraction, _mlp

        levels = len(npoint)
        if not (len(radius) == len(nsample) == len(sa_mlps) == len(fp_mlps) == levels >= 1):
            raise ValueError(f"GarmentNets needs as many radius, nsample, sa_mlps and fp_mlps as npoint ({levels}), "
                             f"got {len(radius)}, {len(nsample)}, {len(sa_mlps)}, {len(fp_mlps)}")
        if grid % 2 ** (len(unet) - 1):
            raise ValueError(f"GarmentNets grid {grid} must be divisible by 2^{len(unet) - 1} (the U-Net's poolings)")
        if nocs_bins < 0 or nocs_bins == 1:
            raise ValueError(f"GarmentNets nocs_bins must be 0 (regression) or at least 2, got {nocs_bins}")
        if nocs_readout not in NOCS_READOUTS:
            raise ValueError(f"unknown NOCS read-out {nocs_readout!r}; choose from {', '.join(NOCS_READOUTS)}")
        self.grid, self.nocs_bins, self.nocs_readout = grid, nocs_bins, nocs_readout
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
        self.nocs_head = nn.Conv1d(features, 3 * nocs_bins if nocs_bins else 3, 1)
        self.unet = UNet3D(features + 3 + 1, 4, unet)  # features, world xyz, occupancy -> winding, warp

    def canonicalize(self, points: Tensor):
        """Stage one alone: ``(features [B, F, N], nocs [B, 3, N], logits [B, 3, K, N] or None)``."""
        from .models import encode_decode  # here, not at module level: the import would be circular

        # the raw xyz are the finest skip: NOCS regression needs the fine position
        x = self.point_head(encode_decode(self.sa, self.fp, points.transpose(1, 2).contiguous(), points))
        head = self.nocs_head(x)
        if not self.nocs_bins:
            return x, torch.sigmoid(head), None
        logits = head.reshape(head.shape[0], 3, self.nocs_bins, head.shape[-1])
        return x, nocs_from_logits(logits, self.nocs_readout), logits

    def forward(self, points: Tensor):
        x, nocs, logits = self.canonicalize(points)
        volume = scatter_to_grid(torch.cat([x, points], 1), nocs, self.grid)
        out = self.unet(volume)
        if logits is None:
            return nocs, out[:, :1], out[:, 1:]
        return nocs, out[:, :1], out[:, 1:], logits


def garment_losses(outputs, nocs: Tensor, winding: Tensor, warp: Tensor) -> dict:
    """The three mean squared errors (NOCS, winding number, warp field in metres) of a forward pass, and for a
    binned model (four outputs) ``"nocs_ce"``, the cross-entropy of the NOCS bin logits against the bins of the
    true coordinates, averaged over points and axes (``"nocs"`` is then the MSE of the read-out, which with the
    argmax read-out carries no gradient)."""
    p_nocs, p_winding, p_warp = outputs[:3]
    parts = {"nocs": F.mse_loss(p_nocs, nocs), "winding": F.mse_loss(p_winding, winding),
             "warp": F.mse_loss(p_warp, warp)}
    if len(outputs) == 4:
        parts["nocs_ce"] = nocs_cross_entropy(outputs[3], nocs)
    return parts


def nocs_cross_entropy(logits: Tensor, nocs: Tensor) -> Tensor:
    """Cross-entropy of NOCS bin logits ``[B, 3, K, N]`` against the bins of the true ``nocs [B, 3, N]``, averaged
    over points and axes."""
    return F.cross_entropy(logits.transpose(1, 2), nocs_bin_targets(nocs, logits.shape[2]))


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
