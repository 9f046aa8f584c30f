"""CIFAR ResNets (He et al. 2016, §4.2) as in winycg/MCL-OKD ``models/resnet.py``.

Stem 3x3 conv 16 -> BN -> ReLU; three stages at widths 16/32/64 (x4 for bottlenecks), stages two
and three open with stride 2; a 1x1 conv + BN shortcut only where stride or width changes;
global average pooling and one linear layer. Peers share the stem and the first stage.

``resnet110`` is the classic BasicBlock [18, 18, 18] network (1.73M parameters at 100 classes).
The MCL-OKD paper's "ResNet-110" (its tables, 1.17M) is the Bottleneck [12, 12, 12] network:
``resnet110_bottleneck``.
"""

from __future__ import annotations

from torch import Tensor, nn

from mcl_lightning.models.registry import StagedBackbone, kaiming_init, register_backbone


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


def cifar_resnet(
    block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, int, int], num_classes: int
) -> StagedBackbone:
    """A CIFAR ResNet with ``depths`` blocks per stage; peers branch after the first stage."""
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    stages: list[nn.Module] = [stem]
    in_planes = 16
    for planes, depth, stride in zip((16, 32, 64), depths, (1, 2, 2)):
        blocks = []
        for i in range(depth):
            blocks.append(block(in_planes, planes, stride if i == 0 else 1))
            in_planes = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    model = StagedBackbone(stages, pool, nn.Linear(in_planes, num_classes), in_planes, branch_point=2)
    kaiming_init(model)  # Linear keeps PyTorch's default init, as the reference
    return model


@register_backbone("resnet8")
def resnet8(num_classes: int = 100) -> StagedBackbone:
    """One block per stage: the CPU reproduction proxy's backbone (docs/results.md), not a paper model."""
    return cifar_resnet(BasicBlock, (1, 1, 1), num_classes)


@register_backbone("resnet20")
def resnet20(num_classes: int = 100) -> StagedBackbone:
    return cifar_resnet(BasicBlock, (3, 3, 3), num_classes)


@register_backbone("resnet32")
def resnet32(num_classes: int = 100) -> StagedBackbone:
    return cifar_resnet(BasicBlock, (5, 5, 5), num_classes)


@register_backbone("resnet56")
def resnet56(num_classes: int = 100) -> StagedBackbone:
    return cifar_resnet(BasicBlock, (9, 9, 9), num_classes)


@register_backbone("resnet110")
def resnet110(num_classes: int = 100) -> StagedBackbone:
    """Classic BasicBlock ResNet-110 (not the network of the MCL-OKD tables)."""
    return cifar_resnet(BasicBlock, (18, 18, 18), num_classes)


@register_backbone("resnet110_bottleneck")
def resnet110_bottleneck(num_classes: int = 100) -> StagedBackbone:
    """The MCL-OKD paper's "ResNet-110": Bottleneck [12, 12, 12], feature width 256."""
    return cifar_resnet(Bottleneck, (12, 12, 12), num_classes)
