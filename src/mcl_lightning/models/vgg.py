"""CIFAR VGG-16 as in winycg/MCL-OKD ``models/vgg.py`` (peers: ``models/mcl_okd_vgg.py``).

Every convolution is 3x3 with bias, followed by BN and ReLU. Stem: conv 3->64, conv 64->64, max-pool;
then four stages of 2, 3, 3, 3 convolutions at widths 128 / 256 / 512 / 512, each closed by a 2x2
max-pool, so a 32x32 input leaves the last stage as a 512x1x1 map. It is flattened (no further
pooling) into **a single linear layer** 512 -> classes: 13 convolutions + 1 FC, 14.77M parameters
at 100 classes (the "VGG-16" of the MCL-OKD table; torchvision's VGG-16 with its three FC layers is
a different network). Built for 32x32 inputs only: larger inputs leave a map the FC does not fit.

Peers share the stem and the first two stages (conv1, conv2, layer1, layer2 in the reference); each
owns layer3, layer4 and its classifier.
"""

from __future__ import annotations

from torch import nn

from mcl_lightning.models.registry import StagedBackbone, kaiming_init, register_backbone


def _conv_bn_relu(in_planes: int, planes: int) -> list[nn.Module]:
    return [nn.Conv2d(in_planes, planes, 3, padding=1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]


def _stage(in_planes: int, planes: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += _conv_bn_relu(in_planes if i == 0 else planes, planes)
    return nn.Sequential(*layers, nn.MaxPool2d(2, 2))


@register_backbone("vgg16")
def vgg16(num_classes: int = 100) -> StagedBackbone:
    stem = nn.Sequential(*_conv_bn_relu(3, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2, 2))
    stages = [stem, _stage(64, 128, 2), _stage(128, 256, 3), _stage(256, 512, 3), _stage(512, 512, 3)]
    classifier = nn.Linear(512, num_classes)
    model = StagedBackbone(stages, nn.Flatten(1), classifier, 512, branch_point=3)
    kaiming_init(model)  # conv: Kaiming-normal fan_out, bias 0; BN 1 / 0
    nn.init.normal_(classifier.weight, 0.0, 0.01)  # the reference's Linear init
    nn.init.zeros_(classifier.bias)
    return model
