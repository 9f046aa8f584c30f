"""MCL-OKD (Yang, Xu, An, ICASSP 2021, arXiv 2006.04093).

    L = gamma * sum_i CE(f_i, y) + alpha * online_teacher_kd + beta * sum_{a != b} L_nce(a -> b)

- ``online_teacher_kd``: T^2 KL from the detached mean of the peers' logits into the last peer
  (reference) or into every peer (``online_teacher_targets="all"``).
- ``contrastive``: each peer's normalised projection scored against every *other* peer's memory
  bank at [positive, K class-aware negatives], binary NCE (``contrast/nce.py`` has the formula,
  ``contrast/fused.py`` computes it with its gradient in one pass); the banks are updated after
  scoring, under no-grad, before backward (reference order).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mcl_lightning.contrast import (
    MemoryBank,
    NegativeSampler,
    dense_pairwise_logits,
    float32_region,
    multi_view_nce_from_logits,
    pairwise_logits,
)
from mcl_lightning.contrast.fused import Workspace, fused_multi_view_nce
from mcl_lightning.methods.base import OKDMethod, register_method
from mcl_lightning.methods.losses import cross_entropy_per_peer, distill_kl
from mcl_lightning.models.heads import ProjectionHead
from mcl_lightning.models.contract import PeerOutput, PeerSpec
from mcl_lightning.core.registry import check_choice
from mcl_lightning.methods.options import (check_flags, check_kd_options, check_momentum, check_positive,
                                          check_projection_dim)

TEACHER_TARGETS = ("last", "all")
BANK_SCORING = ("auto", "gather", "dense")


@register_method("mcl_okd")
class MCLOKD(OKDMethod):
    """Multi-view contrastive learning for online KD. Defaults are the reference's (CIFAR script).

    Needs N >= 2 peers (the contrastive term needs pairs); they may be different backbones (each
    has its own projection head).

    Args:
        projection_dim: width of the projection heads' embeddings (the reference's feat_dim, 128).
        nce_k: negatives per anchor K (script default 16384; the README uses 256 for
            ResNet-32/110 and DenseNet).
        tau: NCE temperature (0.1 CIFAR, 0.07 ImageNet).
        bank_momentum: memory-bank momentum mu (the reference's nce_m, 0.5).
        eps: NCE epsilon (1e-7).
        positive: ``exact`` (the sample itself) or ``relax`` (a random same-class sample).
        negatives_with_replacement: False on CIFAR (distinct negatives), True for ImageNet-size sets.
        kd_temperature: T of the online-teacher term (3).
        online_teacher_targets: ``last`` (reference: only peer N-1) or ``all``.
        gamma, alpha, beta: weights of the CE sum, the online-teacher term and the NCE sum.
        bank_scoring: ``gather`` (each anchor's K + 1 bank rows, as the reference), ``dense`` (the
            whole bank against the batch in one matrix product, then the anchors' scores picked
            out; cheaper when B (K + 1) is several times the bank size) or ``auto``. Same values
            up to float rounding.
        bank_dtype: memory-bank storage, ``float32`` or ``bfloat16``/``float16`` (half the memory;
            scores and updates stay float32).
    """

    min_peers = 2
    needs_train_labels = True  # class-aware negatives and one bank row per training sample
    needs_indices = True  # the rows are addressed by dataset index

    def __init__(
        self,
        projection_dim: int = 128,
        nce_k: int = 16384,
        tau: float = 0.1,
        bank_momentum: float = 0.5,
        eps: float = 1e-7,
        positive: str = "exact",
        negatives_with_replacement: bool = False,
        kd_temperature: float = 3.0,
        online_teacher_targets: str = "last",
        gamma: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.025,
        bank_scoring: str = "auto",
        bank_dtype: str = "float32",
    ) -> None:
        super().__init__()
        check_choice("method.online_teacher_targets", online_teacher_targets, TEACHER_TARGETS)
        check_choice("method.bank_scoring", bank_scoring, BANK_SCORING)
        check_positive(tau=tau)
        check_kd_options(kd_temperature, gamma=gamma, alpha=alpha, beta=beta)
        check_projection_dim(projection_dim)
        check_momentum(bank_momentum)
        check_flags(negatives_with_replacement=negatives_with_replacement)  # bool("false") would be True
        self.tau, self.eps, self.kd_temperature = tau, eps, kd_temperature
        self.online_teacher_targets = online_teacher_targets
        self.gamma, self.alpha, self.beta = gamma, alpha, beta
        self.projection_dim, self.bank_momentum, self.bank_scoring = projection_dim, bank_momentum, bank_scoring
        self.bank_dtype = bank_dtype
        self.negatives = NegativeSampler(nce_k, positive, negatives_with_replacement)
        self._workspace = Workspace()  # scratch buffers of the contrastive term (not state)

    def build(self, spec: PeerSpec) -> None:
        self.heads = nn.ModuleList(ProjectionHead(c, self.projection_dim) for c in spec.feature_dims)
        self.memory_bank = MemoryBank(spec.num_peers, 0, self.projection_dim, self.bank_momentum, dtype=self.bank_dtype)

    def setup_data(self, train_labels: Tensor) -> None:
        self.negatives.bind(train_labels)
        if self.memory_bank.num_samples != len(train_labels):
            self.memory_bank.resize(len(train_labels))

    def online_teacher_kd(self, logits: Tensor) -> Tensor:
        """T^2 KL(softmax(mean logits / T) || softmax(f / T)) into the last peer or all peers."""
        teacher = logits.detach().mean(0)
        students = logits[-1] if self.online_teacher_targets == "last" else logits
        return distill_kl(students, teacher, self.kd_temperature)

    def contrastive(self, features: Sequence[Tensor], labels: Tensor, indices: Tensor) -> Tensor:
        """Sum over ordered peer pairs of the binary NCE; updates the banks afterwards."""
        if self.memory_bank.num_samples == 0:
            raise RuntimeError("MCLOKD.setup_data(train_labels) must be called before training")
        with float32_region(labels.device):  # heads, scores and bank update all in float32
            z = torch.stack([head(f.float()) for head, f in zip(self.heads, features)])  # (N, B, D)
            contrast_idx = self.negatives(indices, labels)  # (B, K + 1)
            if self._one_pass(z):
                loss = self._one_pass_nce(z, contrast_idx)
            else:
                loss = self._autograd_nce(z, contrast_idx)
            self.memory_bank.update(indices, z.detach())
        return loss

    def _one_pass(self, z: Tensor) -> bool:
        """The one-pass loss (contrast/fused.py) on one process with float32 banks; under DDP the
        autograd path, whose normaliser Z is the global batch's (contrast/nce.py ``score_means``)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        return not distributed and self.memory_bank.memory.dtype == torch.float32 and z.dtype == torch.float32

    def _one_pass_nce(self, z: Tensor, contrast_idx: Tensor) -> Tensor:
        # Loss and its gradient in one pass: nothing of the scores or the banks is kept for
        # backward, so the in-place bank update that follows needs no snapshot.
        workspace = Workspace.for_device(self._workspace, z.device)  # CPU: reused scratch buffers
        if self._dense_scoring(contrast_idx.shape):
            scoring, bank = "dense", self.memory_bank.memory  # the whole banks, one GEMM each
        else:
            scoring = "gather"  # (N, B, K + 1, D): one gather for all banks
            rows = None if workspace is None else workspace.get(
                "rows", (self.num_peers * contrast_idx.numel() * self.projection_dim,), z.dtype, z.device)
            bank = self.memory_bank.gather(contrast_idx, out=rows)
        return fused_multi_view_nce(z, bank, contrast_idx, self.tau, self.memory_bank.num_samples, self.eps,
                                    scoring, workspace)

    def _autograd_nce(self, z: Tensor, contrast_idx: Tensor) -> Tensor:
        memory = self.memory_bank
        if self._dense_scoring(contrast_idx.shape):
            # a float32 snapshot: the product saves the bank for backward, and the update is in place
            bank = memory.memory.clone() if memory.memory.dtype == torch.float32 else memory.memory.float()
            logits = dense_pairwise_logits(bank, contrast_idx, z)
        else:
            logits = pairwise_logits(memory.gather(contrast_idx).float(), z)  # (N, B, K + 1, D), one gather
        return multi_view_nce_from_logits(logits, self.tau, memory.num_samples, self.eps)

    def _dense_scoring(self, contrast_shape: torch.Size) -> bool:
        """Score the whole bank (one GEMM) rather than gather rows, when the gathered rows would
        outnumber the bank a few times over (``bank_scoring="auto"``); shapes only, no host sync."""
        if self.bank_scoring != "auto":
            return self.bank_scoring == "dense"
        batch, k1 = contrast_shape
        return batch * k1 > 4 * self.memory_bank.num_samples and k1 * 4 > self.memory_bank.num_samples

    def forward(self, output: PeerOutput, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        return {
            "ce": self.gamma * cross_entropy_per_peer(output.logits, labels).sum(),
            "online_teacher_kd": self.alpha * self.online_teacher_kd(output.logits),
            "contrastive": self.beta * self.contrastive(output.features, labels, indices),
        }
