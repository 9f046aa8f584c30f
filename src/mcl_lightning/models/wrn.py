"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) as in winycg/MCL ``models/wrn.py``: WRN-16-2,
WRN-40-2, WRN-28-4.

Pre-activation wide basic blocks, n = (d - 4) / 6 per stage, widths 16 / 16k / 32k / 64k, no
dropout, final BN -> ReLU -> global average pooling -> linear. Peers share the stem and the first
stage (the MCL repository's branch point).
"""

from __future__ import annotations

from torch import Tensor, nn

from mcl_lightning.models.registry import StagedBackbone, kaiming_init, register_backbone


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.equal_in_out = in_planes == out_planes
        # A projection shortcut only where the width changes (then it sees the pre-activated input).
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(depth: int, widen: int, num_classes: int) -> StagedBackbone:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    stages: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
    for i, stride in enumerate((1, 2, 2)):
        blocks = [WideBasicBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1) for j in range(n)]
        stages.append(nn.Sequential(*blocks))
    c = widths[3]
    pool = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    classifier = nn.Linear(c, num_classes)
    model = StagedBackbone(stages, pool, classifier, c, branch_point=2)
    kaiming_init(model)
    nn.init.zeros_(classifier.bias)
    return model


@register_backbone("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> StagedBackbone:
    return wide_resnet(16, 2, num_classes)


@register_backbone("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> StagedBackbone:
    return wide_resnet(40, 2, num_classes)


@register_backbone("wrn_28_4")
def wrn_28_4(num_classes: int = 100) -> StagedBackbone:
    """WRN-28-4 (winycg/MCL ``wrn_28_4``): feature width 256."""
    return wide_resnet(28, 4, num_classes)
