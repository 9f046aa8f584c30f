"""MCL-OKD's contrastive term: CRD-style binary NCE between every ordered pair of peers."""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_scores(bank_rows: Tensor, embeddings: Tensor, tau: float) -> Tensor:
    """``s[a, b, n, k] = exp(m_a[c_{n,k}] . z_{b,n} / tau)`` for every (a, b), a != b.

    Args:
        bank_rows: (N, B, K + 1, D) rows of each peer's bank at the contrast indices (detached).
        embeddings: (N, B, D) the peers' current normalised embeddings.

    Returns:
        (N * (N - 1), B, K + 1), the ordered pairs in row-major order of (a, b) without a == b.
        One batched product over the N gathered banks replaces the reference's N(N - 1) gathers.
    """
    num_peers = embeddings.shape[0]
    logits = torch.einsum("abkd,cbd->acbk", bank_rows, embeddings)  # (a, b, n, k)
    off_diagonal = ~torch.eye(num_peers, dtype=torch.bool, device=embeddings.device)
    return torch.exp(logits[off_diagonal] / tau)


def nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """Binary NCE per term, with the reference's per-batch normaliser.

    ``scores``: (..., B, K + 1), column 0 the positive. For each term, Z = mean(scores) * N_data
    (detached, recomputed every batch as the reference; no host sync), P = scores / Z, and

        L = -(1/B) sum_n [ log(P_0 / (P_0 + K Pn + eps)) + sum_k log(K Pn / (P_k + K Pn + eps)) ]

    with Pn = 1 / N_data: negatives summed, batch averaged. Returns (...,), one loss per term.
    """
    k = scores.shape[-1] - 1
    z = scores.detach().mean(dim=(-2, -1), keepdim=True) * num_samples
    p = scores / z
    noise = k / num_samples  # K * Pn
    log_pos = torch.log(p[..., 0] / (p[..., 0] + noise + eps))
    log_neg = torch.log(noise / (p[..., 1:] + noise + eps)).sum(-1)
    return -(log_pos + log_neg).mean(-1)


def multi_view_nce(bank_rows: Tensor, embeddings: Tensor, tau: float, num_samples: int, eps: float = 1e-7) -> Tensor:
    """The contrastive loss summed over all N(N - 1) ordered peer pairs, in float32."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        scores = pairwise_scores(bank_rows.float(), embeddings.float(), tau)
        return nce_loss(scores, num_samples, eps).sum()
