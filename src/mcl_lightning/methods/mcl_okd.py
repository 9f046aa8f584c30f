"""MCL-OKD (Yang, Xu, An, ICASSP 2021, arXiv 2006.04093).

    L = gamma * sum_i CE(f_i, y) + alpha * online_teacher_kd + beta * sum_{a != b} L_nce(a -> b)

- ``online_teacher_kd``: T^2 KL from the detached mean of the peers' logits into the last peer
  (reference) or into every peer (``online_teacher_targets="all"``).
- ``contrastive``: each peer's normalised projection scored against every *other* peer's memory
  bank at [positive, K class-aware negatives], binary NCE (see ``contrast/nce.py``); the banks are
  updated after scoring, under no-grad, before backward (reference order).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcl_lightning.contrast import MemoryBank, NegativeSampler, float32_region, multi_view_nce
from mcl_lightning.errors import ConfigError
from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer, distill_kl
from mcl_lightning.models.heads import ProjectionHead
from mcl_lightning.models.peers import PeerOutput

TEACHER_TARGETS = ("last", "all")


@register_method("mcl_okd")
class MCLOKD(OKDMethod):
    """Multi-view contrastive learning for online KD. Defaults are the reference's (CIFAR script).

    Args:
        num_peers, feature_dim: from the peer network (N >= 2: the contrastive term needs pairs).
        feat_dim: projection width (128).
        nce_k: negatives per anchor K (script default 16384; the README uses 256 for
            ResNet-32/110 and DenseNet).
        tau: NCE temperature (0.1 CIFAR, 0.07 ImageNet).
        momentum: memory-bank momentum mu (0.5).
        eps: NCE epsilon (1e-7).
        positive: ``exact`` (the sample itself) or ``relax`` (a random same-class sample).
        negatives_with_replacement: False on CIFAR (distinct negatives), True for ImageNet-size sets.
        kd_temperature: T of the online-teacher term (3).
        online_teacher_targets: ``last`` (reference: only peer N-1) or ``all``.
        gamma, alpha, beta: weights of the CE sum, the online-teacher term and the NCE sum.
        bank_dtype: memory-bank storage, ``float32`` or ``bfloat16``/``float16`` (half the memory;
            scores and updates stay float32).
    """

    def __init__(
        self,
        num_peers: int,
        feature_dim: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        tau: float = 0.1,
        momentum: float = 0.5,
        eps: float = 1e-7,
        positive: str = "exact",
        negatives_with_replacement: bool = False,
        kd_temperature: float = 3.0,
        online_teacher_targets: str = "last",
        gamma: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.025,
        bank_dtype: str = "float32",
    ) -> None:
        super().__init__(num_peers, feature_dim)
        if num_peers < 2:
            raise ConfigError(
                f"mcl_okd contrasts pairs of peers and needs peers >= 2, got {num_peers}; "
                "set peers=2 or more, or use method=independent for a single network"
            )
        if online_teacher_targets not in TEACHER_TARGETS:
            raise ConfigError(
                f"unknown online_teacher_targets {online_teacher_targets!r}; choose one of: {', '.join(TEACHER_TARGETS)}"
            )
        if tau <= 0 or kd_temperature <= 0:
            raise ConfigError("method.tau and method.kd_temperature must be > 0")
        self.tau, self.eps, self.kd_temperature = tau, eps, kd_temperature
        self.online_teacher_targets = online_teacher_targets
        self.gamma, self.alpha, self.beta = gamma, alpha, beta
        self.heads = nn.ModuleList(ProjectionHead(feature_dim, feat_dim) for _ in range(num_peers))
        self.memory_bank = MemoryBank(num_peers, 0, feat_dim, momentum, dtype=bank_dtype)
        self.negatives = NegativeSampler(nce_k, positive, negatives_with_replacement)

    needs_train_labels = True  # class-aware negatives and one bank row per training sample

    def setup_data(self, train_labels: Tensor) -> None:
        self.negatives.bind(train_labels)
        if self.memory_bank.num_samples != len(train_labels):
            self.memory_bank.resize(len(train_labels))

    def online_teacher_kd(self, logits: Tensor) -> Tensor:
        """T^2 KL(softmax(mean logits / T) || softmax(f / T)) into the last peer or all peers."""
        teacher = logits.detach().mean(0)
        students = logits[-1] if self.online_teacher_targets == "last" else logits
        return distill_kl(students, teacher, self.kd_temperature)

    def contrastive(self, features: Tensor, labels: Tensor, indices: Tensor) -> Tensor:
        """Sum over ordered peer pairs of the binary NCE; updates the banks afterwards."""
        if self.memory_bank.num_samples == 0:
            raise RuntimeError("MCLOKD.setup_data(train_labels) must be called before training")
        with float32_region(features.device):  # heads, scores and bank update all in float32
            z = torch.stack([head(f.float()) for head, f in zip(self.heads, features)])  # (N, B, D)
            contrast_idx = self.negatives(indices, labels)  # (B, K + 1)
            rows = self.memory_bank.gather(contrast_idx)  # (N, B, K + 1, D): one gather per bank
            loss = multi_view_nce(rows, z, self.tau, self.memory_bank.num_samples, self.eps)
            self.memory_bank.update(indices, z.detach())
        return loss

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        self.check_output(output)
        return {
            "ce": self.gamma * cross_entropy_per_peer(output.logits, labels).sum(),
            "online_teacher_kd": self.alpha * self.online_teacher_kd(output.logits),
            "contrastive": self.beta * self.contrastive(output.features, labels, indices),
        }
