"""Small point networks in plain PyTorch, the way users write them.

* :class:`PointNetPartSeg`: PointNet part segmentation (Qi et al., CVPR 2017),
  shared MLPs as kernel-1 ``Conv1d``, max-pooled global feature, category one-hot.
* :class:`PointNet2PartSeg`: PointNet++ SSG part segmentation (Qi et al.,
  NeurIPS 2017): set abstraction (farthest point sampling, ball query, shared
  MLP as 1x1 ``Conv2d``, max pool) and feature propagation (3-NN inverse-distance
  interpolation, ``Conv1d``).
* :class:`VoxelCNNSeg`: a voxel 3D CNN segmenter (``Conv3d`` encoder-decoder
  on an occupancy grid, grid features read back at the points).

All take ``points [B, 3, N]`` and ``category [B]`` (int64) and return part
logits ``[B, num_parts, N]``. The defaults are small so that training runs on
a CPU in seconds; widths are arguments. The models contain only ordinary
``nn.Conv*``/``nn.Linear`` layers, so ``l1fx.convert`` sees them as any user
model; the data-dependent geometry (sampling, grouping, voxelisation) is in
functions marked with ``torch.fx.wrap`` so that torch.fx keeps each as one call.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .data import devoxelize, voxelize

__all__ = ["PointNetPartSeg", "PointNet2PartSeg", "VoxelCNNSeg", "MODELS", "build_model",
           "farthest_point_sample", "ball_query", "index_points", "three_nn_interpolate"]

# Imported helpers must be registered in this module's globals to stay leaves when traced here.
torch.fx.wrap("voxelize")
torch.fx.wrap("devoxelize")


def _mlp(kind: str, channels: Sequence[int]) -> nn.Sequential:
    """Shared MLP: (conv 1x1 -> BatchNorm -> ReLU) per layer; ``kind`` is '1d', '2d' or '3d'."""
    conv = {"1d": nn.Conv1d, "2d": nn.Conv2d, "3d": nn.Conv3d}[kind]
    norm = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[kind]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 1), norm(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _one_hot(category: Tensor, num_categories: int, like: Tensor) -> Tensor:
    return F.one_hot(category, num_categories).to(like.dtype)


# ------------------------------------------------------------------ PointNet

class PointNetPartSeg(nn.Module):
    """PointNet part segmentation (without the T-Nets, which part segmentation barely needs).

    Per-point features of every encoder layer, the max-pooled global feature
    and the category one-hot are concatenated and classified per point.
    """

    def __init__(self, num_parts: int, num_categories: int, in_channels: int = 3,
                 encoder: Sequence[int] = (32, 64, 128), head: Sequence[int] = (128, 64)):
        super().__init__()
        self.num_categories = num_categories
        chans = [in_channels, *encoder]
        self.encoder = nn.ModuleList(_mlp("1d", chans[i:i + 2]) for i in range(len(encoder)))
        concat = sum(encoder) + encoder[-1] + num_categories
        self.head = _mlp("1d", [concat, *head])
        self.classifier = nn.Conv1d(head[-1], num_parts, 1)

    def forward(self, points: Tensor, category: Tensor) -> Tensor:
        n = points.shape[2]
        feats, x = [], points
        for layer in self.encoder:
            x = layer(x)
            feats.append(x)
        glob = x.max(dim=2, keepdim=True)[0].expand(-1, -1, n)
        onehot = _one_hot(category, self.num_categories, x)[:, :, None].expand(-1, -1, n)
        return self.classifier(self.head(torch.cat([*feats, glob, onehot], 1)))


# ------------------------------------------------------------------ PointNet++ geometry

@torch.fx.wrap
def farthest_point_sample(xyz: Tensor, npoint: int) -> Tensor:
    """Indices ``[B, npoint]`` of farthest point sampling of ``xyz [B, N, 3]``, starting at point 0."""
    b, n, _ = xyz.shape
    idx = torch.zeros(b, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), device=xyz.device, dtype=xyz.dtype)
    farthest = torch.zeros(b, dtype=torch.long, device=xyz.device)
    batch = torch.arange(b, device=xyz.device)
    for i in range(npoint):
        idx[:, i] = farthest
        d = ((xyz - xyz[batch, farthest][:, None]) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        farthest = dist.argmax(-1)
    return idx


@torch.fx.wrap
def index_points(points: Tensor, idx: Tensor) -> Tensor:
    """``points [B, N, C]`` gathered at ``idx [B, ...]`` -> ``[B, ..., C]``."""
    b = points.shape[0]
    flat = idx.reshape(b, -1)
    out = points.gather(1, flat[..., None].expand(-1, -1, points.shape[-1]))
    return out.reshape(*idx.shape, points.shape[-1])


@torch.fx.wrap
def ball_query(radius: float, nsample: int, xyz: Tensor, centers: Tensor) -> Tensor:
    """Indices ``[B, S, nsample]`` of up to ``nsample`` points of ``xyz`` within ``radius`` of each centre.

    The first ``nsample`` in index order, padded with the first one found (as
    in PointNet++); a centre is always a point of ``xyz``, so one is found.
    """
    n = xyz.shape[1]
    sq = torch.cdist(centers, xyz) ** 2  # [B, S, N]
    order = torch.arange(n, device=xyz.device).expand_as(sq)
    idx = torch.where(sq > radius ** 2, torch.full_like(order, n), order)
    idx = idx.topk(min(nsample, n), dim=-1, largest=False, sorted=True)[0]
    first = idx[..., :1].expand_as(idx)
    idx = torch.where(idx == n, first, idx)
    if nsample > n:
        idx = torch.cat([idx, idx[..., :1].expand(-1, -1, nsample - n)], -1)
    return idx


@torch.fx.wrap
def three_nn_interpolate(xyz: Tensor, known_xyz: Tensor, known_feats: Tensor) -> Tensor:
    """Features ``[B, C, N]`` at ``xyz [B, N, 3]`` by inverse-distance weights of the 3 nearest known points."""
    if known_xyz.shape[1] == 1:
        return known_feats.expand(-1, -1, xyz.shape[1])
    k = min(3, known_xyz.shape[1])
    dist, idx = torch.cdist(xyz, known_xyz).topk(k, dim=-1, largest=False)  # [B, N, k]
    w = 1.0 / (dist ** 2 + 1e-8)
    w = w / w.sum(-1, keepdim=True)
    gathered = index_points(known_feats.transpose(1, 2), idx)  # [B, N, k, C]
    return (gathered * w[..., None]).sum(2).transpose(1, 2)


class SetAbstraction(nn.Module):
    """Sample ``npoint`` centres, group ``nsample`` neighbours within ``radius``, shared MLP, max pool.

    ``npoint=None`` groups all points around the origin (the last PointNet++ level).
    """

    def __init__(self, npoint, radius: float, nsample: int, in_channels: int, mlp: Sequence[int]):
        super().__init__()
        self.npoint, self.radius, self.nsample = npoint, radius, nsample
        self.mlp = _mlp("2d", [in_channels + 3, *mlp])

    def forward(self, xyz: Tensor, feats):
        # xyz [B, N, 3], feats [B, C, N] or None -> new_xyz [B, S, 3], new_feats [B, C', S]
        if self.npoint is None:
            new_xyz = xyz[:, :1] * 0
            grouped = xyz[:, None]  # [B, 1, N, 3]
            if feats is not None:
                grouped = torch.cat([grouped, feats.transpose(1, 2)[:, None]], -1)
        else:
            new_xyz = index_points(xyz, farthest_point_sample(xyz, self.npoint))
            idx = ball_query(self.radius, self.nsample, xyz, new_xyz)
            grouped = index_points(xyz, idx) - new_xyz[:, :, None]  # [B, S, K, 3]
            if feats is not None:
                grouped = torch.cat([grouped, index_points(feats.transpose(1, 2), idx)], -1)
        x = self.mlp(grouped.permute(0, 3, 2, 1))  # [B, C, K, S]
        return new_xyz, x.max(dim=2)[0]


class FeaturePropagation(nn.Module):
    def __init__(self, in_channels: int, mlp: Sequence[int]):
        super().__init__()
        self.mlp = _mlp("1d", [in_channels, *mlp])

    def forward(self, xyz: Tensor, known_xyz: Tensor, skip, known_feats: Tensor) -> Tensor:
        x = three_nn_interpolate(xyz, known_xyz, known_feats)
        if skip is not None:
            x = torch.cat([skip, x], 1)
        return self.mlp(x)


def encode_decode(sa: Sequence[SetAbstraction], fp: Sequence[FeaturePropagation], xyz: Tensor, feats: Tensor,
                  finest_skip: bool = True) -> Tensor:
    """PointNet++'s U-shaped pass: the set abstractions down from ``xyz [B, N, 3]`` / ``feats [B, C, N]``, then
    one feature propagation per level back up to the N input points (``fp[0]`` from the coarsest level). The
    skip features of the finest level are ``feats`` itself, or none with ``finest_skip=False``."""
    xyzs, levels = [xyz], [feats]
    for block in sa:
        new_xyz, new_feats = block(xyzs[-1], levels[-1])
        xyzs.append(new_xyz)
        levels.append(new_feats)
    x = levels[-1]
    for k, block in enumerate(fp):
        level = len(sa) - k
        skip = levels[level - 1] if level > 1 or finest_skip else None
        x = block(xyzs[level - 1], xyzs[level], skip, x)
    return x


class PointNet2PartSeg(nn.Module):
    """PointNet++ single-scale-grouping part segmentation (three SA levels, three FP levels)."""

    def __init__(self, num_parts: int, num_categories: int, in_channels: int = 3,
                 npoint: Sequence[int] = (128, 32), radius: Sequence[float] = (0.2, 0.4),
                 nsample: Sequence[int] = (16, 16),
                 sa_mlps: Sequence[Sequence[int]] = ((32, 32, 64), (64, 64, 128), (128, 256)),
                 fp_mlps: Sequence[Sequence[int]] = ((128,), (128,), (64, 64)), head: int = 64):
        super().__init__()
        self.num_categories = num_categories
        self.extra = in_channels - 3  # per-point features beyond xyz (e.g. normals)
        s1, s2, s3 = sa_mlps
        self.sa1 = SetAbstraction(npoint[0], radius[0], nsample[0], self.extra, s1)
        self.sa2 = SetAbstraction(npoint[1], radius[1], nsample[1], s1[-1], s2)
        self.sa3 = SetAbstraction(None, 0.0, 0, s2[-1], s3)
        f3, f2, f1 = fp_mlps
        self.fp3 = FeaturePropagation(s3[-1] + s2[-1], f3)
        self.fp2 = FeaturePropagation(f3[-1] + s1[-1], f2)
        self.fp1 = FeaturePropagation(f2[-1] + num_categories + in_channels, f1)
        self.head = _mlp("1d", [f1[-1], head])
        self.classifier = nn.Conv1d(head, num_parts, 1)

    def forward(self, points: Tensor, category: Tensor) -> Tensor:
        n = points.shape[2]
        xyz = points[:, :3].transpose(1, 2).contiguous()
        feats0 = points[:, 3:] if self.extra else None
        xyz1, f1 = self.sa1(xyz, feats0)
        xyz2, f2 = self.sa2(xyz1, f1)
        xyz3, f3 = self.sa3(xyz2, f2)
        f2 = self.fp3(xyz2, xyz3, f2, f3)
        f1 = self.fp2(xyz1, xyz2, f1, f2)
        onehot = _one_hot(category, self.num_categories, points)[:, :, None].expand(-1, -1, n)
        f0 = self.fp1(xyz, xyz1, torch.cat([onehot, points], 1), f1)
        return self.classifier(self.head(f0))


# ------------------------------------------------------------------ voxel 3D CNN

def _conv3d_block(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=kernel // 2),
                         nn.BatchNorm3d(c_out), nn.ReLU())


class VoxelCNNSeg(nn.Module):
    """A two-level 3D CNN on a ``resolution``³ grid; grid features are read back at the points.

    Input channels of the grid: occupancy and the mean xyz of the points in
    each voxel. The point head also sees the point's own xyz and the category.
    """

    def __init__(self, num_parts: int, num_categories: int, resolution: int = 12,
                 widths: Sequence[int] = (16, 32), head: int = 64):
        super().__init__()
        if resolution % 2:
            raise ValueError(f"VoxelCNNSeg resolution must be even (one stride-2 level), got {resolution}")
        self.num_categories, self.resolution = num_categories, resolution
        w0, w1 = widths
        self.enc1 = _conv3d_block(4, w0, 3)
        self.enc2 = nn.Sequential(_conv3d_block(w0, w1, 3, stride=2), _conv3d_block(w1, w1, 3))
        self.dec = _conv3d_block(w0 + w1, w0, 1)
        self.head = _mlp("1d", [w0 + 3 + num_categories, head])
        self.classifier = nn.Conv1d(head, num_parts, 1)

    def forward(self, points: Tensor, category: Tensor) -> Tensor:
        n = points.shape[2]
        xyz = points[:, :3]
        grid, index = voxelize(xyz, self.resolution)
        e1 = self.enc1(grid)
        e2 = self.enc2(e1)
        d = self.dec(torch.cat([e1, F.interpolate(e2, scale_factor=2.0, mode="nearest")], 1))
        onehot = _one_hot(category, self.num_categories, points)[:, :, None].expand(-1, -1, n)
        x = torch.cat([devoxelize(d, index), xyz, onehot], 1)
        return self.classifier(self.head(x))


MODELS = {"pointnet": PointNetPartSeg, "pointnet2": PointNet2PartSeg, "voxelcnn": VoxelCNNSeg}


def build_model(name: str, num_parts: int, num_categories: int, **kwargs) -> nn.Module:
    """``MODELS[name](num_parts, num_categories, **kwargs)`` with a clear error for unknown names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_parts, num_categories, **kwargs)
from .models_scene import SCENE_MODELS, PointNet2SemSeg, PointNetSemSeg, build_scene_model  # noqa: E402,F401
from .models_garment import GarmentNets, extract_mesh, scatter_to_grid, warp_points  # noqa: E402,F401
