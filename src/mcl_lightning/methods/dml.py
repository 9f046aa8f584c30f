"""Deep Mutual Learning (Zhang et al., CVPR 2018), as in winycg/MCL-OKD ``main_cifar_dml.py``.

    L = sum_i CE(f_i, y) + sum_i sum_{j != i} T^2 KL(p_j || p_i) / (N - 1),   p = softmax(f / T)

every peer learns from each other peer's detached prediction. As the MCL-OKD reference, the peers
are branches of one network (stem + first stage shared); ``topology=independent`` gives DML's own
separate networks, and peers may then be different backbones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mcl_lightning.contrast import float32_region
from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer
from mcl_lightning.models.contract import PeerOutput
from mcl_lightning.methods.options import check_kd_options


def mutual_kl(logits: Tensor, temperature: float) -> Tensor:
    """``sum_i sum_{j != i} T^2 KL(softmax(f_j/T), detached || softmax(f_i/T)) / (N - 1)``.

    ``logits``: (N, B, classes); KL is the batch mean, as the reference's ``DistillKL``.
    """
    n = logits.shape[0]
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)  # students (with gradient)
    log_q = log_p.detach()  # teachers
    q = log_q.exp()
    # kl[j, i, b] = sum_k q_j (log q_j - log p_i): every (teacher j, student i) pair in one product
    kl = (q * log_q).sum(-1)[:, None, :] - torch.einsum("jbk,ibk->jib", q, log_p)
    off_diagonal = 1.0 - torch.eye(n, dtype=kl.dtype, device=kl.device)
    return (kl.mean(-1) * off_diagonal).sum() * temperature**2 / (n - 1)


@register_method("dml")
class DML(OKDMethod):
    """Deep mutual learning: CE per peer plus KL from every other peer's detached prediction.

    Args:
        kd_temperature: T (the reference DML script: 2).
        gamma: weight of the CE sum (1).
        alpha: weight of the mutual KL sum (1).
    """

    min_peers = 2

    def __init__(self, kd_temperature: float = 2.0, gamma: float = 1.0, alpha: float = 1.0) -> None:
        super().__init__()
        check_kd_options(kd_temperature, gamma=gamma, alpha=alpha)
        self.kd_temperature, self.gamma, self.alpha = kd_temperature, gamma, alpha

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        with float32_region(labels.device):
            kd = mutual_kl(output.logits, self.kd_temperature)
        return {
            "ce": self.gamma * cross_entropy_per_peer(output.logits, labels).sum(),
            "mutual_kd": self.alpha * kd,
        }
