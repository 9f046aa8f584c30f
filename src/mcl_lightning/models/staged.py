"""The backbone contract, ``StagedBackbone`` (stages, pooling head, classifier), and the building
blocks several backbone families share. Nothing here knows the registry, so a module that builds
backbones (``models/library.py``) can use it without an import circle."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn


class StagedBackbone(nn.Module):
    """A classification network as ``classifier(pool(stages(x)))``.

    Args:
        stages: the feature stages, applied in order (``stages[0]`` is the stem).
        pool: maps the last stage's output to the pooled penultimate feature vector (B, C).
        classifier: the final linear layer, C -> num_classes.
        feature_dim: C, the width of the pooled feature vector.
        branch_point: default number of leading stages that peers share in the
            ``shared_trunk`` topology (the reference's branch point for this backbone).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        pool: nn.Module,
        classifier: nn.Linear,
        feature_dim: int,
        branch_point: int,
    ) -> None:
        super().__init__()
        if not 0 <= branch_point < len(stages):
            raise ValueError(f"branch_point must be in [0, {len(stages) - 1}], got {branch_point}")
        self.stages = nn.ModuleList(stages)
        self.pool = pool
        self.classifier = classifier
        self.feature_dim = feature_dim
        self.branch_point = branch_point

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled penultimate features (B, C) that feed the classifier."""
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))

    def deployable(self) -> nn.Module:
        """The network to deploy (itself; a timm / torchvision backbone gives back the library's module)."""
        return self


def dense_stages(stem: nn.Module, channels: int, num_stages: int, make_block: Callable[[int, int], tuple[nn.Module, int]],
                 make_transition: Callable[[int, int], nn.Module], compression: float) -> tuple[list[nn.Module], int]:
    """A densely connected network's stages: the stem, then per stage ``make_block(stage, channels)``
    (the block and its output width), followed by ``make_transition(width, int(width * compression))``
    after every stage but the last. Returns the stages and the final width. Modules are created in
    that order, so seeded initialisation does not depend on who calls this."""
    stages: list[nn.Module] = [stem]
    for i in range(num_stages):
        block, channels = make_block(i, channels)
        if i < num_stages - 1:
            out = int(channels * compression)
            stages.append(nn.Sequential(block, make_transition(channels, out)))
            channels = out
        else:
            stages.append(block)
    return stages, channels


def bn_relu_pool(channels: int) -> nn.Sequential:
    """The pre-activation networks' head before the classifier: BN, ReLU, global average pool, flatten."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def kaiming_init(module: nn.Module) -> None:
    """The reference's init: conv Kaiming-normal (fan_out, ReLU), BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def feature_dim_of(module: nn.Module, input_shape: Sequence[int] = (2, 3, 32, 32)) -> int:
    """Width of a feature extractor's output, found with a dummy forward pass (as the reference)."""
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = module(torch.zeros(*input_shape, device=device))
    finally:
        module.train(was_training)
    return int(out.flatten(1).shape[1])
