"""Semantic segmentation of indoor scenes (S3DIS blocks) with PointNet and PointNet++, in plain PyTorch.

* :class:`PointNetSemSeg`: PointNet's S3DIS network (Qi et al., CVPR 2017,
  ``sem_seg/model.py``): a shared per-point MLP on the 9 input channels, the
  max-pooled global feature through two fully connected layers, concatenated
  to every point's last per-point feature, a shared MLP head, dropout, a 1x1
  classifier. No T-Nets (the S3DIS model has none).
* :class:`PointNet2SemSeg`: PointNet++ SSG semantic segmentation (the
  ``pointnet2_sem_seg`` layout): set-abstraction levels (farthest point
  sampling, ball query in the block-centred xyz, every input channel as a
  feature), feature-propagation levels back to the points (no skip from the
  raw input, as in that code), a 1x1 head with dropout.

Both take ``points [B, 9, N]`` (the :class:`l1fx.data.S3DIS` channels) and return
logits ``[B, num_classes, N]``. The defaults are far smaller than the papers'
(64-1024 wide, 4096 points, 4 PointNet++ levels) so training runs on a CPU; every
width is an argument. The layers are ordinary ``nn.Conv1d/2d`` and ``nn.Linear``,
so ``l1fx.convert`` treats them as any user model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PointNetSemSeg", "PointNet2SemSeg", "SCENE_MODELS", "build_scene_model"]

# l1fx.models re-exports this module at its end, so its building blocks (_mlp, SetAbstraction,
# FeaturePropagation) are imported in the constructors: at module level the import would be circular.


def _fc(channels: Sequence[int]) -> nn.Sequential:
    """Fully connected (Linear -> BatchNorm1d -> ReLU) per layer, on ``[B, C]``."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Linear(c_in, c_out), nn.BatchNorm1d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class PointNetSemSeg(nn.Module):
    """PointNet semantic segmentation (PointNet's S3DIS model: 64,64,64,128,1024 / 256,128 / 512,256 at full size)."""

    def __init__(self, num_classes: int = 13, in_channels: int = 9, encoder: Sequence[int] = (32, 32, 64, 128),
                 global_mlp: Sequence[int] = (128, 64), head: Sequence[int] = (128, 64), dropout: float = 0.3):
        super().__init__()
        from .models import _mlp

        self.encoder = _mlp("1d", [in_channels, *encoder])
        self.global_mlp = _fc([encoder[-1], *global_mlp])
        self.head = _mlp("1d", [encoder[-1] + global_mlp[-1], *head])
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv1d(head[-1], num_classes, 1)

    def forward(self, points: Tensor) -> Tensor:
        n = points.shape[2]
        x = self.encoder(points)
        glob = self.global_mlp(x.max(dim=2)[0])
        x = torch.cat([x, glob[:, :, None].expand(-1, -1, n)], 1)
        return self.classifier(self.dropout(self.head(x)))


class PointNet2SemSeg(nn.Module):
    """PointNet++ SSG semantic segmentation with ``len(npoint)`` set-abstraction and as many propagation levels.

    ``sa_mlps[i]`` is level i's shared MLP; ``fp_mlps`` are the propagation MLPs from the
    deepest level up. Full size (``pointnet2_sem_seg``): npoint 1024, 256, 64, 16, radius
    0.1-0.8, nsample 32, MLPs up to 512 wide, 4096 points.
    """

    def __init__(self, num_classes: int = 13, in_channels: int = 9, npoint: Sequence[int] = (256, 64, 16),
                 radius: Sequence[float] = (0.1, 0.2, 0.4), nsample: Sequence[int] = (16, 16, 16),
                 sa_mlps: Sequence[Sequence[int]] = ((32, 32, 64), (64, 64, 128), (128, 128, 256)),
                 fp_mlps: Sequence[Sequence[int]] = ((128, 128), (128, 64), (64, 64)), head: int = 64,
                 dropout: float = 0.3):
        super().__init__()
        from .models import FeaturePropagation, SetAbstraction, _mlp

        levels = len(npoint)
        if not (len(radius) == len(nsample) == len(sa_mlps) == len(fp_mlps) == levels >= 1):
            raise ValueError(f"PointNet2SemSeg needs as many radius, nsample, sa_mlps and fp_mlps as npoint "
                             f"({levels}), got {len(radius)}, {len(nsample)}, {len(sa_mlps)}, {len(fp_mlps)}")
        widths = [in_channels] + [m[-1] for m in sa_mlps]  # feature channels at level 0 (input) .. levels
        self.sa = nn.ModuleList(SetAbstraction(npoint[i], radius[i], nsample[i], widths[i], sa_mlps[i])
                                for i in range(levels))
        fps, below = [], widths[-1]
        for k, level in enumerate(range(levels, 0, -1)):  # propagate level -> level - 1
            skip = widths[level - 1] if level > 1 else 0  # no skip from the raw input points
            fps.append(FeaturePropagation(below + skip, fp_mlps[k]))
            below = fp_mlps[k][-1]
        self.fp = nn.ModuleList(fps)
        self.head = _mlp("1d", [below, head])
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv1d(head, num_classes, 1)

    def forward(self, points: Tensor) -> Tensor:
        from .models import encode_decode  # here, not at module level: the import would be circular

        x = encode_decode(self.sa, self.fp, points[:, :3].transpose(1, 2).contiguous(), points, finest_skip=False)
        return self.classifier(self.dropout(self.head(x)))


SCENE_MODELS = {"pointnet": PointNetSemSeg, "pointnet2": PointNet2SemSeg}


def build_scene_model(name: str, num_classes: int = 13, **kwargs) -> nn.Module:
    """``SCENE_MODELS[name](num_classes, **kwargs)`` with a clear error for unknown names."""
    if name not in SCENE_MODELS:
        raise ValueError(f"unknown scene model {name!r}; choose one of {sorted(SCENE_MODELS)}")
    return SCENE_MODELS[name](num_classes, **kwargs)
