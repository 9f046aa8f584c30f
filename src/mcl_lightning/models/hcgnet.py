"""HCGNet (Yang et al., "Gated Convolutional Networks with Hybrid Connectivity", AAAI 2020) for CIFAR,
as in winycg/MCL-OKD ``models/hcgnet.py`` (HCGNet-A1; peers: ``models/mcl_okd_hcgnet.py``) and
winycg/MCL ``models/hcgnet.py`` (HCGNet-A1 and -A2).

- Stem: one 3x3 conv 3 -> 2 g1 (no BN). Three hybrid blocks of 8 SMG modules; transitions after the
  first two (x0.5 channels, stride 2). Final BN -> ReLU -> global average pool -> linear.
- Pre-activation conv ("BasicConv"): BN -> ReLU -> conv, no bias.
- SMG module, growth g: 1x1 conv -> 4g, 3x3 conv (4 groups) -> g, call it x; then the gate cell below;
  the result (g channels) is concatenated onto the module's input.
- Transition, c_in -> c_out: 1x1 conv -> c_in - (c_in - c_out) // 2, 3x3 stride-2 conv -> c_out, then
  the gate cell with reduction and forget factors 4 instead of 2; no concatenation.
- Gate cell on x (C channels): a forget gate (spatial-softmax context pooling of x -> 1x1 conv C -> C/f
  -> BN1d -> tanh -> 1x1 conv -> sigmoid) scales x per channel; an update path adds a C-vector: a
  depthwise 3x3 and a depthwise dilated 3x3 pre-activation conv, each pooled to a vector by its own
  spatial-softmax context, fused SK-style (1x1 conv 2C -> 2C/r -> BN1d -> tanh -> one 1x1 conv per
  path -> softmax across the two paths -> weighted sum). Output x * gate + fused vector.
- No explicit initialisation (PyTorch's defaults), as the reference.

``hcgnet_a1``: growth (12, 24, 36), widths 24 -> 120 -> 60 -> 252 -> 126 -> 414, 1.10M parameters.
``hcgnet_a2``: growth (24, 36, 64), widths 48 -> 240 -> 120 -> 408 -> 204 -> 716.
Stages: [stem, block1 + transition1, block2 + transition2, block3]; peers share the stem, the first
block and the first transition, as the reference's multi-branch HCGNet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcl_lightning.models.registry import StagedBackbone, bn_relu_pool, dense_stages, register_backbone


class PreActConv(nn.Sequential):
    """BN -> ReLU -> conv (no bias): the reference's ``BasicConv``."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, dilation: int = 1) -> None:
        super().__init__(
            nn.BatchNorm2d(in_planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, dilation=dilation, groups=groups,
                      bias=False),
        )


def _context_pool(x: Tensor, score: nn.Conv2d) -> Tensor:
    """Spatial-softmax weighted sum of ``x`` (B, C, H, W) -> (B, C): weights from a 1x1 conv to 1 channel."""
    weights = torch.softmax(score(x).flatten(2), dim=-1)  # (B, 1, HW)
    return torch.bmm(x.flatten(2), weights.transpose(1, 2)).squeeze(-1)


class GateCell(nn.Module):
    """HCGNet's gate on a C-channel map: ``x * forget_gate(x) + update(x)`` (module docstring)."""

    def __init__(self, channels: int, reduction: int, forget: int) -> None:
        super().__init__()
        c, hidden = channels, 2 * channels // reduction
        # update path: two depthwise convs at different receptive fields, fused by attention
        self.conv_3x3 = PreActConv(c, c, 3, padding=1, groups=c)
        self.conv_dilated = PreActConv(c, c, 3, padding=2, groups=c, dilation=2)
        self.context_3x3 = nn.Conv2d(c, 1, 1)
        self.context_dilated = nn.Conv2d(c, 1, 1)
        self.fuse = nn.Conv2d(2 * c, hidden, 1)
        self.fuse_bn = nn.BatchNorm1d(hidden)
        self.select_3x3 = nn.Conv2d(hidden, c, 1)
        self.select_dilated = nn.Conv2d(hidden, c, 1)
        # forget gate
        self.forget_context = nn.Conv2d(c, 1, 1)
        self.forget_bn = nn.BatchNorm1d(c // forget)
        self.forget_reduce = nn.Conv2d(c, c // forget, 1)
        self.forget_expand = nn.Conv2d(c // forget, c, 1)

    @staticmethod
    def _linear(conv: nn.Conv2d, v: Tensor) -> Tensor:
        """A 1x1 conv applied to vectors (B, C) -> (B, C')."""
        return torch.nn.functional.linear(v, conv.weight.flatten(1), conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        pooled = _context_pool(x, self.forget_context)
        gate = torch.tanh(self.forget_bn(self._linear(self.forget_reduce, pooled)))
        gate = torch.sigmoid(self._linear(self.forget_expand, gate))

        v_3x3 = _context_pool(self.conv_3x3(x), self.context_3x3)
        v_dilated = _context_pool(self.conv_dilated(x), self.context_dilated)
        attention = torch.tanh(self.fuse_bn(self._linear(self.fuse, torch.cat([v_3x3, v_dilated], 1))))
        select = torch.stack([self._linear(self.select_3x3, attention), self._linear(self.select_dilated, attention)])
        select = torch.softmax(select, dim=0)  # across the two paths, per channel
        update = select[0] * v_3x3 + select[1] * v_dilated
        return x * gate[:, :, None, None] + update[:, :, None, None]


class SMG(nn.Module):
    """Squeeze cell (1x1 -> grouped 3x3) + gate cell; its ``growth`` channels are concatenated onto the input."""

    def __init__(self, in_planes: int, growth: int, bottleneck: int = 4, groups: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(
            PreActConv(in_planes, bottleneck * growth, 1),
            PreActConv(bottleneck * growth, growth, 3, padding=1, groups=groups),
        )
        self.gate = GateCell(growth, reduction=2, forget=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.gate(self.squeeze(x))], 1)


class Transition(nn.Module):
    """1x1 conv, stride-2 3x3 conv, gate cell (factors 4): ``in_planes`` -> ``out_planes`` at half resolution."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        mid = in_planes - (in_planes - out_planes) // 2
        self.squeeze = nn.Sequential(
            PreActConv(in_planes, mid, 1),
            PreActConv(mid, out_planes, 3, stride=2, padding=1),
        )
        self.gate = GateCell(out_planes, reduction=4, forget=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.squeeze(x))


def hcgnet(growth: tuple[int, int, int], blocks: tuple[int, int, int], num_classes: int,
           theta: float = 0.5) -> StagedBackbone:
    def block(stage: int, c: int) -> tuple[nn.Module, int]:
        g, layers = growth[stage], blocks[stage]
        return nn.Sequential(*[SMG(c + j * g, g) for j in range(layers)]), c + layers * g

    stem = nn.Conv2d(3, 2 * growth[0], 3, 1, 1, bias=False)
    stages, c = dense_stages(stem, 2 * growth[0], len(blocks), block, Transition, theta)
    return StagedBackbone(stages, bn_relu_pool(c), nn.Linear(c, num_classes), c, branch_point=2)


@register_backbone("hcgnet_a1")
def hcgnet_a1(num_classes: int = 100) -> StagedBackbone:
    return hcgnet((12, 24, 36), (8, 8, 8), num_classes)


@register_backbone("hcgnet_a2")
def hcgnet_a2(num_classes: int = 100) -> StagedBackbone:
    return hcgnet((24, 36, 64), (8, 8, 8), num_classes)
