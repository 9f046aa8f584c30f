"""ShuffleNetV2 (Ma et al., ECCV 2018) for CIFAR as in winycg/MCL ``models/shufflenetv2.py``.

- Stem: 3x3 stride-1 conv 3 -> 24 -> BN -> ReLU, no max-pool (32x32 inputs).
- Three stages, each a stride-2 down-sampling block followed by (3, 7, 3) basic blocks, at widths
  (48, 96, 192) for 0.5x and (116, 232, 464) for 1x.
- Basic block: split the channels in half; the second half goes 1x1 conv -> BN -> ReLU -> depthwise
  3x3 -> BN -> 1x1 conv -> BN -> ReLU; concatenate with the untouched half; channel shuffle (2 groups).
- Down-sampling block: left, depthwise 3x3 stride 2 -> BN -> 1x1 conv -> BN -> ReLU; right, 1x1 conv
  -> BN -> ReLU -> depthwise 3x3 stride 2 -> BN -> 1x1 conv -> BN -> ReLU; each to half the output
  width; concatenate; channel shuffle.
- Last stage: 1x1 conv -> 1024 -> BN -> ReLU; global average pooling; linear. Feature width 1024.
- No explicit initialisation (PyTorch's defaults), as the reference.

Stages: [stem, stage1, stage2, stage3, 1x1 conv 1024]; peers share the stem and the first stage (the
reference's multi-branch ``ShuffleNetV2_b``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcl_lightning.models.registry import StagedBackbone, register_backbone


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Basic unit: half the channels pass through, the other half through 1x1 / dw 3x3 / 1x1; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        keep, transform = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(transform)], 1))


class DownBlock(nn.Module):
    """Stride-2 unit: two branches, each to half of ``out_planes``, concatenated and shuffled."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        mid = out_planes // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_planes, in_planes, 3, 2, 1, groups=in_planes, bias=False), nn.BatchNorm2d(in_planes),
            nn.Conv2d(in_planes, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_planes, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


def shufflenetv2(widths: tuple[int, int, int], num_classes: int, blocks: tuple[int, int, int] = (3, 7, 3),
                 feature_dim: int = 1024) -> StagedBackbone:
    stages: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24),
                                             nn.ReLU(inplace=True))]
    in_planes = 24
    for width, n in zip(widths, blocks):
        stages.append(nn.Sequential(DownBlock(in_planes, width), *[ShuffleBlock(width) for _ in range(n)]))
        in_planes = width
    stages.append(nn.Sequential(nn.Conv2d(in_planes, feature_dim, 1, bias=False), nn.BatchNorm2d(feature_dim),
                                nn.ReLU(inplace=True)))
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return StagedBackbone(stages, pool, nn.Linear(feature_dim, num_classes), feature_dim, branch_point=2)


@register_backbone("shufflenetv2_0_5")
def shufflenetv2_0_5(num_classes: int = 100) -> StagedBackbone:
    """ShuffleNetV2 0.5x (winycg/MCL ``ShuffleNetV2_05x``)."""
    return shufflenetv2((48, 96, 192), num_classes)


@register_backbone("shufflenetv2_1_0")
def shufflenetv2_1_0(num_classes: int = 100) -> StagedBackbone:
    """ShuffleNetV2 1x (winycg/MCL ``ShuffleNetV2_1x``)."""
    return shufflenetv2((116, 232, 464), num_classes)
