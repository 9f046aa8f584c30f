"""ImageNet ResNet-18 / ResNet-34: torchvision's networks, split into stages.

The references (winycg/MCL-OKD ``models/mcl_okd_resnet_imagenet.py``, winycg/MCL
``models/resnet_imagenet.py``) use torchvision's layout and initialisation unchanged: 7x7 stride-2
conv 64 -> BN -> ReLU -> 3x3 stride-2 max-pool; BasicBlock stages [2, 2, 2, 2] or [3, 4, 6, 3] at
widths 64 / 128 / 256 / 512; global average pooling; FC 512 -> classes. So the network here *is*
``torchvision.models.resnet18`` / ``resnet34`` (same modules, same init, same parameter count),
regrouped as stages [stem (conv1, bn1, relu, maxpool), layer1, layer2, layer3, layer4].

Peers share the stem, layer1 and layer2 and each owns layer3, layer4 and its classifier (the
references' multi-branch ImageNet ResNet). Any input of at least 32x32 works; the references train
at 224x224.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision import models

from mcl_lightning.models.registry import StagedBackbone, register_backbone


def from_torchvision_resnet(net: models.ResNet) -> StagedBackbone:
    """Regroup a torchvision ResNet's own modules into a `StagedBackbone` (nothing re-created)."""
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    pool = nn.Sequential(net.avgpool, nn.Flatten(1))
    return StagedBackbone(stages, pool, net.fc, net.fc.in_features, branch_point=3)


def _build(factory: Callable[..., models.ResNet], num_classes: int) -> StagedBackbone:
    return from_torchvision_resnet(factory(weights=None, num_classes=num_classes))


@register_backbone("resnet18")
def resnet18(num_classes: int = 1000) -> StagedBackbone:
    """torchvision ResNet-18 (11.69M parameters at 1000 classes)."""
    return _build(models.resnet18, num_classes)


@register_backbone("resnet34")
def resnet34(num_classes: int = 1000) -> StagedBackbone:
    """torchvision ResNet-34 (21.80M parameters at 1000 classes)."""
    return _build(models.resnet34, num_classes)
