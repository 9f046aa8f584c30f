"""CL-ILR: collaborative learning with intermediate-level representation sharing (Song & Chai,
"Collaborative Learning for Deep Neural Networks", NeurIPS 2018), as in winycg/MCL-OKD
``main_cifar_cl_ilr.py`` and ``models/cl_ilr_resnet.py``.

    L = gamma * sum_i CE(f_i, y) + alpha * sum_i T^2 KL(softmax(t_i / T) || softmax(f_i / T)),
    t_i = mean_{j != i} f_j, detached

with gamma = alpha = 0.5 and T = 2. The peers share layers as a binary tree (stem and first stage
shared by all, the next stage by pairs of peers (0, 1), (2, 3), ...) and ILR divides the gradient at
every split by its number of children (identity forward); both are the network's job
(``PeerLayout(pair_stage=True, rescale_split_gradients=True)``), selected by ``reference_layout``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mcl_lightning.contrast import float32_region
from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer, distill_kl
from mcl_lightning.models.contract import PeerLayout, PeerOutput
from mcl_lightning.core.registry import check_choice
from mcl_lightning.methods.options import check_kd_options

SHARING = ("tree", "single")
ENSEMBLES = ("all_but_last", "all")

_LAYOUTS = {
    # winycg/MCL-OKD: layer1 shared by all, layer2 by pairs, gradient / 2 at each split.
    "tree": PeerLayout(pair_stage=True, rescale_split_gradients=True),
    # The OKDDip authors' CL-ILR: one split after layer2 (as ONE), gradient / N there.
    "single": PeerLayout(branch_offset=1, rescale_split_gradients=True),
}


def leave_one_out_mean(logits: Tensor) -> Tensor:
    """(N, B, K) -> (N, B, K): entry i is the mean of the other peers' logits (N >= 2)."""
    n = logits.shape[0]
    weights = (1.0 - torch.eye(n, dtype=logits.dtype, device=logits.device)) / (n - 1)
    return torch.einsum("ij,jbk->ibk", weights, logits)


@register_method("cl_ilr")
class CLILR(OKDMethod):
    """Collaborative learning: each peer distils the detached mean of the other peers' logits.

    Peers of one backbone only (the reference shares layers between them); ``topology=independent``
    is allowed (no sharing, so ILR has nothing to rescale).

    Args:
        sharing: ``tree`` (reference: binary tree, the stage after the trunk shared by pairs of peers,
            gradient / 2 at each split) or ``single`` (one split one stage later, gradient / N: the
            OKDDip authors' version).
        ensemble: ``all_but_last`` (reference "Ens": mean of peers 0..N-2, the last teacher left over
            in its ``test()``) or ``all`` (mean of every peer's logits).
        kd_temperature: T (reference: 2).
        gamma: weight of each peer's CE (reference: 0.5).
        alpha: weight of each peer's KL (reference: 0.5).
    """

    min_peers = 2
    accepts_heterogeneous = False

    def __init__(
        self,
        sharing: str = "tree",
        ensemble: str = "all_but_last",
        kd_temperature: float = 2.0,
        gamma: float = 0.5,
        alpha: float = 0.5,
    ) -> None:
        super().__init__()
        check_choice("method.sharing", sharing, SHARING)
        check_choice("method.ensemble", ensemble, ENSEMBLES)
        check_kd_options(kd_temperature, gamma=gamma, alpha=alpha)
        self.sharing, self.ensemble_peers = sharing, ensemble
        self.kd_temperature, self.gamma, self.alpha = kd_temperature, gamma, alpha

    @property
    def reference_layout(self) -> PeerLayout:  # an instance property: the layout follows `sharing`
        return _LAYOUTS[self.sharing]

    @property
    def ensemble_description(self) -> str:
        if self.ensemble_peers == "all":
            return "mean of the peers' logits"
        return "mean of peers 0..N-2's logits (the reference's CL-ILR Ens: the last peer's KD teacher)"

    def ensemble(self, output: PeerOutput) -> Tensor:
        logits = output.logits
        return logits[:-1].mean(0) if self.ensemble_peers == "all_but_last" else logits.mean(0)

    def collaborative_kd(self, logits: Tensor) -> Tensor:
        """sum_i T^2 KL(softmax(mean_{j != i} f_j / T), detached || softmax(f_i / T)), batch mean."""
        with float32_region(logits.device):
            logits = logits.float()
            return distill_kl(logits, leave_one_out_mean(logits.detach()), self.kd_temperature)

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        return {
            "ce": self.gamma * cross_entropy_per_peer(output.logits, labels).sum(),
            "collaborative_kd": self.alpha * self.collaborative_kd(output.logits),
        }
