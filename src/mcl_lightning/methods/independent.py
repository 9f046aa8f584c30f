"""Independent training: every peer learns from the labels alone (the baseline)."""

from __future__ import annotations

from torch import Tensor

from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer
from mcl_lightning.models.contract import PeerLayout, PeerOutput


@register_method("independent")
class Independent(OKDMethod):
    """``sum_i CE(f_i, y)``: cross-entropy per peer, summed (as the reference sums it).

    Its reference (the baseline column) is N separate networks, hence the independent layout.
    """

    reference_layout = PeerLayout(topology="independent")

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        return {"ce": cross_entropy_per_peer(output.logits, labels).sum()}
