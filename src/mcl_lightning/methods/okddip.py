"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng, Chen, AAAI 2020),
as compared in MCL-OKD.

Peers 0 ... N-2 are auxiliary peers, peer N-1 is the group leader. Shared query and key projections
(no bias, width C // 8) read each auxiliary peer's pooled feature h_i; a softmax over the auxiliary
peers turns their dot products into per-peer aggregation weights, and each auxiliary peer is
distilled from its own weighted mixture of the auxiliary peers' logits. The leader is distilled from
their plain mean:

    a_ij   = softmax_j((W_q h_i) . (W_k h_j))                   i, j < N-1 (no 1/sqrt(d) scaling)
    t_i    = sum_j a_ij f_j
    L = ce_weight * sum_{i<N} CE(f_i, y)
        + kd_weight * w(e) * [ sum_{i<N-1} T^2 KL(softmax(t_i/T) || softmax(f_i/T))        (peer_kd)
                               + T^2 KL(softmax(mean_{i<N-1} f_i / T) || softmax(f_{N-1}/T)) ]  (leader_kd)

with T = 3 and w(e) = exp(-5 (1 - min(e, 80) / 80)^2) (winycg/MCL-OKD ``main_cifar_okddip.py:130-173``,
``models/okddip_resnet.py:146-147, 196-234``). The targets are not detached, as the reference: the
projections learn only through them. The ensemble is the sum of all N peers' logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcl_lightning.contrast import float32_region
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer, distill_kl
from mcl_lightning.methods.one import sigmoid_rampup
from mcl_lightning.methods.options import check_flags, check_kd_options
from mcl_lightning.models.contract import PeerLayout, PeerOutput, PeerSpec


@register_method("okddip")
class OKDDip(OKDMethod):
    """Online KD with diverse peers. Defaults are winycg/MCL-OKD's ``main_cifar_okddip.py``.

    Needs N >= 2 peers of one backbone (the projections are shared, so the widths must agree); with
    N = 2 the single auxiliary peer's target is itself and only the leader term is left.

    Args:
        kd_temperature: T of both distillation terms (3, ``main_cifar_okddip.py:40``).
        ce_weight: weight of the CE sum over all N peers (1).
        kd_weight: weight of the two distillation terms (1; DefangChen/OKDDip's ``--alpha``).
        rampup_epochs: R of the consistency ramp on both distillation terms (80,
            ``main_cifar_okddip.py:157``); 0 = weight 1 from the start.
        attention_factor: the projections map C to C // attention_factor (8).
        detach_targets: stop the gradient at the targets (the reference does not). The projections
            then receive no gradient at all and the attention stays at its initialisation.
    """

    reference_layout = PeerLayout(branch_offset=1)
    min_peers = 2
    accepts_heterogeneous = False
    ensemble_description = "sum of all N peers' logits (the auxiliary peers and the group leader)"

    def __init__(
        self,
        kd_temperature: float = 3.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        rampup_epochs: float = 80,
        attention_factor: int = 8,
        detach_targets: bool = False,
    ) -> None:
        super().__init__()
        check_kd_options(kd_temperature, rampup_epochs, ce_weight=ce_weight, kd_weight=kd_weight)
        check_flags(detach_targets=detach_targets)  # bool("false") would be True
        if int(attention_factor) != attention_factor or attention_factor < 1:
            raise ConfigError(f"method.attention_factor must be an integer >= 1, got {attention_factor}")
        self.kd_temperature, self.ce_weight, self.kd_weight = kd_temperature, ce_weight, kd_weight
        self.rampup_epochs, self.attention_factor = rampup_epochs, int(attention_factor)
        self.detach_targets = detach_targets

    def build(self, spec: PeerSpec) -> None:
        channels = spec.feature_dims[0]
        width = channels // self.attention_factor
        if width < 1:
            raise ConfigError(
                f"method.attention_factor={self.attention_factor} leaves no projection width for {channels}-d "
                f"features; set it to at most {channels}"
            )
        self.query = nn.Linear(channels, width, bias=False)
        self.key = nn.Linear(channels, width, bias=False)

    def consistency_weight(self) -> float:
        """w(e) at the current epoch (``set_epoch``)."""
        return sigmoid_rampup(self.epoch, self.rampup_epochs)

    def attention(self, features: Tensor) -> Tensor:
        """(B, M, M) aggregation weights of M peers from their (M, B, C) features, float32."""
        with float32_region(features.device):
            h = features.float()
            energy = torch.einsum("ibd,jbd->bij", self.query(h), self.key(h))
            return torch.softmax(energy, dim=-1)

    def targets(self, output: PeerOutput) -> tuple[Tensor, Tensor]:
        """(auxiliary peers' aggregated targets (N-1, B, classes), the leader's target (B, classes))."""
        auxiliary = output.logits[:-1]
        weights = self.attention(output.stacked_features()[:-1])
        with float32_region(weights.device):
            logits = auxiliary.float()
            peer_targets = torch.einsum("bij,jbk->ibk", weights, logits)
            leader_target = logits.mean(0)
        if self.detach_targets:
            return peer_targets.detach(), leader_target.detach()
        return peer_targets, leader_target

    def ensemble(self, output: PeerOutput) -> Tensor:
        return output.logits.sum(0)

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        peer_targets, leader_target = self.targets(output)
        weight = self.kd_weight * self.consistency_weight()
        temperature = self.kd_temperature
        return {
            "ce": self.ce_weight * cross_entropy_per_peer(output.logits, labels).sum(),
            "peer_kd": weight * distill_kl(output.logits[:-1], peer_targets, temperature),
            "leader_kd": weight * distill_kl(output.logits[-1], leader_target, temperature),
        }
