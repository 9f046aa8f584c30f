"""Projection heads: the peers' features mapped into the contrastive embedding space."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``Linear(C, dim)`` then L2 normalisation, as the reference's ``Embed`` (no hidden layer, no BN).

    Trained with the peers and never used at inference.
    """

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        z = self.linear(features.flatten(1))
        # x / ||x||_2 with no epsilon, exactly as the reference's Normalize layer.
        return z / z.pow(2).sum(1, keepdim=True).sqrt()
