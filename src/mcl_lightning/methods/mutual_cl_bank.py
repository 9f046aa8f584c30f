"""Mutual CL's memory-bank contrast (``method.contrast=bank``): winycg/MCL's ImageNet loss,
``losses/imagenet_sup_mcl_loss.py`` ``ContrastMemory`` with the sampling of ``dataset/imagenet.py``
(both unchanged since 61f20d1; cited at the repository's newest commit, 236da2f).

Every network i keeps a bank m_i of one embedding per training sample. Each anchor n gets the bank
indices c_n = [n, P same-class samples, K other-class samples] (P = pos_k, drawn without
replacement; K = neg_k, drawn with replacement). With l^{ab}_n = m_a[c_n] z_{b,n} / tau, the scores
of network b's anchor against network a's bank, (1 + P + K) per anchor, and v^{i}_n = l^{ii}_n
without its first column (the instance), P + K per anchor:

    SupCon_Q(l) = mean_n -1/Q sum_{k < Q} [ l_nk - log sum_k' exp(l_nk') ]     (first Q columns positive)

    vcl      = sum_i        SupCon_P(v^i)
    soft_vcl = sum_{i != j} T^2 KL(softmax(v^j / T), detached || softmax(v^i / T))
    icl      = sum_{a != b} SupCon_{1+P}(l^{ab})
    soft_icl = sum_{a != b} T^2 KL(softmax(l^{ba} / T), detached || softmax(l^{ab} / T))

Bank rows are detached; after scoring, m_i[n] <- normalise(mu m_i[n] + (1 - mu) z_{i,n}) for the
batch's samples (the reference's order). Index draws are keyed by (seed, step, sample)
(``contrast/negatives.py``) and the bank update gathers every rank's rows, so each anchor's terms
depend on its own sample only: a DDP run equals one device with the global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcl_lightning.contrast import MemoryBank, NegativeSampler, pairwise_logits
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods.losses import row_kl
from mcl_lightning.methods.options import check_momentum



def leading_positive_supcon(logits: Tensor, num_positive: int) -> Tensor:
    """SupCon with the first ``num_positive`` columns as positives, every column in the
    denominator; mean over anchors: (..., B, C) -> (...)."""
    log_prob = logits - logits.logsumexp(-1, keepdim=True)
    return -log_prob[..., :num_positive].mean(-1).mean(-1)


class BankContrast(nn.Module):
    """Per-network memory banks and the four contrastive terms scored against them.

    Args:
        num_peers: N, one bank per network.
        dim: embedding width (the projection MLPs' output).
        pos_k: P same-class samples per anchor (reference 1); at least 1, VCL's positives.
        neg_k: K other-class samples per anchor, with replacement (reference 8192).
        bank_momentum: mu of the bank update (reference ``nce_m`` 0.5).
        tau: temperature of the scores; kd_temperature: T of the soft terms.
    """

    def __init__(self, num_peers: int, dim: int, pos_k: int, neg_k: int, bank_momentum: float, tau: float,
                 kd_temperature: float) -> None:
        super().__init__()
        self.pos_k, self.tau, self.kd_temperature = pos_k, tau, kd_temperature
        self.memory_bank = MemoryBank(num_peers, 0, dim, bank_momentum)
        self.negatives = NegativeSampler(neg_k, "exact", replacement=True, same_class=pos_k, k_option="method.neg_k")

    def setup_data(self, train_labels: Tensor) -> None:
        self.negatives.bind(train_labels)
        if self.memory_bank.num_samples != len(train_labels):
            self.memory_bank.resize(len(train_labels))

    def contrast_indices(self, labels: Tensor, indices: Tensor) -> Tensor:
        """(B, 1 + P + K) bank indices: [instance, P same-class, K other-class]; advances the draw."""
        if self.memory_bank.num_samples == 0:
            raise RuntimeError("MutualCL.setup_data(train_labels) must be called before training with contrast=bank")
        return self.negatives(indices, labels)

    def terms(self, z: Tensor, contrast_idx: Tensor) -> dict[str, Tensor]:
        """Unweighted VCL, soft VCL, ICL and soft ICL of embeddings ``z`` (N, B, D) at the given
        indices, against the banks as they are (no update)."""
        n = z.shape[0]
        rows = self.memory_bank.gather(contrast_idx).float()  # (N, B, 1 + P + K, D), one gather, a copy
        scores = pairwise_logits(rows, z) / self.tau  # [a, b]: network b's anchors against bank a
        off = 1.0 - torch.eye(n, dtype=z.dtype, device=z.device)  # a mask by product: no host sync
        intra = scores.diagonal(dim1=0, dim2=1).permute(2, 0, 1)[..., 1:]  # (N, B, P + K): instance dropped
        supcon = leading_positive_supcon(scores, 1 + self.pos_k)  # (N, N)
        soft_icl = row_kl(scores, scores.transpose(0, 1).detach(), self.kd_temperature)  # student [a, b]
        soft_vcl = row_kl(intra[:, None], intra[None, :].detach(), self.kd_temperature)  # student i, teacher j
        return {
            "vcl": leading_positive_supcon(intra, self.pos_k).sum(),
            "soft_vcl": (soft_vcl * off).sum(),
            "icl": (supcon * off).sum(),
            "soft_icl": (soft_icl * off).sum(),
        }

    def forward(self, z: Tensor, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """Draw the indices, score, then update the banks with the batch's embeddings."""
        terms = self.terms(z, self.contrast_indices(labels, indices))
        self.memory_bank.update(indices, z.detach())  # after scoring; the gathered rows are a copy
        return terms


def check_bank_options(pos_k: int, neg_k: int, bank_momentum: float) -> None:
    """One-line errors for the bank variant's options (checked whatever ``contrast`` is)."""
    if pos_k < 1:
        raise ConfigError(f"method.pos_k must be >= 1 (VCL's positives are the same-class samples), got {pos_k}")
    if neg_k < 1:
        raise ConfigError(f"method.neg_k must be >= 1, got {neg_k}")
    check_momentum(bank_momentum)
