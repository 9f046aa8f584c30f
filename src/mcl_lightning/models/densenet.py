"""DenseNet-BC for CIFAR as in winycg/MCL-OKD ``models/densenet.py`` (peers: ``models/mcl_okd_densenet.py``).

``densenet40_12``: growth 12, three dense blocks of 6 bottleneck layers, bottleneck width 4 x 12,
compression 0.5, 24 initial features, no dropout. Stem: one 3x3 conv 3 -> 24 (no BN or ReLU, the
reference's small-input stem). Dense layer: BN -> ReLU -> 1x1 conv (48) -> BN -> ReLU -> 3x3 conv
(12), concatenated onto its input. Transition: BN -> ReLU -> 1x1 conv (x0.5) -> 2x2 average pool.
Widths 24 -> 96 -> 48 -> 120 -> 60 -> 132; final BN -> ReLU -> global average pool -> linear.
0.19M parameters at 100 classes.

Stages: [stem, block1 + transition1, block2 + transition2, block3]; peers share the stem, the first
block and the first transition (the reference's ``features``), each owns the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcl_lightning.models.registry import StagedBackbone, bn_relu_pool, dense_stages, register_backbone


class DenseLayer(nn.Module):
    """Bottleneck dense layer: its ``growth`` new channels are concatenated onto the input."""

    def __init__(self, in_planes: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_planes, bottleneck * growth, 1, bias=False),
            nn.BatchNorm2d(bottleneck * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.layers(x)], 1)


def _dense_block(in_planes: int, layers: int, growth: int) -> nn.Sequential:
    return nn.Sequential(*[DenseLayer(in_planes + i * growth, growth) for i in range(layers)])


def _transition(in_planes: int, out_planes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.Conv2d(in_planes, out_planes, 1, bias=False),
        nn.AvgPool2d(2, 2),
    )


def densenet_bc(growth: int, blocks: tuple[int, int, int], num_classes: int, init_features: int = 24,
                compression: float = 0.5) -> StagedBackbone:
    def block(stage: int, c: int) -> tuple[nn.Module, int]:
        return _dense_block(c, blocks[stage], growth), c + blocks[stage] * growth

    stem = nn.Conv2d(3, init_features, 3, 1, 1, bias=False)
    stages, c = dense_stages(stem, init_features, len(blocks), block, _transition, compression)
    pool = bn_relu_pool(c)
    classifier = nn.Linear(c, num_classes)
    model = StagedBackbone(stages, pool, classifier, c, branch_point=2)
    for m in model.modules():  # the reference's init: conv Kaiming-normal (fan_in), BN 1 / 0, Linear bias 0
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.zeros_(classifier.bias)
    return model


@register_backbone("densenet40_12")
def densenet40_12(num_classes: int = 100) -> StagedBackbone:
    """DenseNet-BC, depth 40, growth 12 (the MCL-OKD table's "DenseNet-40-12"): feature width 132."""
    return densenet_bc(12, (6, 6, 6), num_classes)
