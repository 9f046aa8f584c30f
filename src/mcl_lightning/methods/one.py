"""ONE: On-the-fly Native Ensemble (Lan, Zhu, Gong, NeurIPS 2018), as compared in MCL-OKD.

The peers are branches of one network: the stem and the first two stages are shared (one stage
more than MCL-OKD's, ``PeerLayout(branch_offset=1)``). A gate reads the shared trunk and weighs the
branches; their gated sum is the teacher, trained with the labels and distilled into every branch:

    g = softmax(ReLU(BN1d(Linear(avgpool(trunk)))))            (B, N)
    t = sum_i g_i * f_i                                         (B, classes)
    L = ce_weight * sum_i CE(f_i, y) + ensemble_ce_weight * CE(t, y)
        + kd_weight * w(e) * sum_i T^2 KL(softmax(t.detach() / T) || softmax(f_i / T))

with T = 3 and w(e) = 1 (winycg/MCL-OKD ``main_cifar_one.py:152-158``), or the original ONE's
consistency ramp w(e) = exp(-5 (1 - min(e, R) / R)^2) with ``rampup_epochs`` R = 80. The gated
output is ONE's ensemble ("Ens" in the MCL-OKD tables).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcl_lightning.contrast import float32_region
from mcl_lightning.methods.options import check_kd_options
from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer, distill_kl
from mcl_lightning.models.contract import PeerLayout, PeerOutput, PeerSpec


def sigmoid_rampup(epoch: float, length: float) -> float:
    """The consistency ramp of ONE and OKDDip (from Laine & Aila's temporal ensembling):
    ``exp(-5 (1 - e / length)^2)`` for ``0 <= e <= length``, 1 after; 1 throughout when ``length == 0``."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(float(epoch), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * phase * phase)


class ONEGate(nn.Module):
    """``softmax(ReLU(BN1d(Linear(avgpool(trunk)))))``: one weight per branch, summing to 1.

    The reference's ``gate_fc`` / ``gate_norm`` (``models/one_resnet.py:145-146, 205-206``): default
    ``Linear`` and ``BatchNorm1d`` initialisation. Runs in float32 under autocast.
    """

    def __init__(self, channels: int, num_peers: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_peers)
        self.norm = nn.BatchNorm1d(num_peers)

    def forward(self, trunk: Tensor) -> Tensor:
        with float32_region(trunk.device):
            pooled = trunk.float().flatten(2).mean(-1) if trunk.dim() > 2 else trunk.float()
            return torch.softmax(F.relu(self.norm(self.fc(pooled))), dim=1)


@register_method("one")
class ONE(OKDMethod):
    """On-the-fly Native Ensemble. Defaults are winycg/MCL-OKD's ``main_cifar_one.py``.

    Needs N >= 2 branches of one backbone on a shared trunk (the gate reads the trunk's output).

    Args:
        kd_temperature: T of the distillation from the gated ensemble (3, ``main_cifar_one.py:40``).
        ce_weight: weight of the branches' CE sum (1: the reference adds them unweighted).
        ensemble_ce_weight: weight of the gated ensemble's CE (1).
        kd_weight: weight of the distillation sum (1).
        rampup_epochs: R of the consistency ramp on the distillation term; 0 (the MCL-OKD reference)
            keeps its weight at 1, 80 is the original ONE (Lan1991Xu/ONE_NeurIPS2018).
    """

    reference_layout = PeerLayout(branch_offset=1)
    min_peers = 2
    accepts_heterogeneous = False
    requires_shared_trunk = True
    ensemble_description = "gated sum of the peers' logits (ONE's gate on the pooled shared trunk)"

    def __init__(
        self,
        kd_temperature: float = 3.0,
        ce_weight: float = 1.0,
        ensemble_ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        rampup_epochs: float = 0,
    ) -> None:
        super().__init__()
        check_kd_options(kd_temperature, rampup_epochs, ce_weight=ce_weight,
                         ensemble_ce_weight=ensemble_ce_weight, kd_weight=kd_weight)
        self.kd_temperature = kd_temperature
        self.ce_weight, self.ensemble_ce_weight, self.kd_weight = ce_weight, ensemble_ce_weight, kd_weight
        self.rampup_epochs = rampup_epochs

    def build(self, spec: PeerSpec) -> None:
        self.gate = ONEGate(spec.trunk_channels, spec.num_peers)

    def consistency_weight(self) -> float:
        """w(e) at the current epoch (``set_epoch``)."""
        return sigmoid_rampup(self.epoch, self.rampup_epochs)

    def gated_logits(self, output: PeerOutput) -> Tensor:
        """The teacher ``sum_i g_i f_i`` (B, classes), float32."""
        if output.trunk is None:
            raise ValueError("ONE's gate reads the shared trunk, but this PeerOutput has none (trunk=None)")
        weights = self.gate(output.trunk)  # (B, N)
        with float32_region(weights.device):
            return torch.einsum("bn,nbk->bk", weights, output.logits.float())

    def ensemble(self, output: PeerOutput) -> Tensor:
        return self.gated_logits(output)

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        teacher = self.gated_logits(output)
        kd = distill_kl(output.logits, teacher.detach(), self.kd_temperature)
        return {
            "ce": self.ce_weight * cross_entropy_per_peer(output.logits, labels).sum(),
            "ensemble_ce": self.ensemble_ce_weight * F.cross_entropy(teacher, labels),
            "kd": (self.kd_weight * self.consistency_weight()) * kd,
        }
