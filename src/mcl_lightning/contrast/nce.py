"""MCL-OKD's contrastive term: CRD-style binary NCE between every ordered pair of peers."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import Tensor


def float32_region(device: torch.device) -> ContextManager:
    """Switch autocast off on ``device``: exp(s / tau) reaches e^10 at tau = 0.1 and overflows fp16."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def pairwise_logits(bank_rows: Tensor, embeddings: Tensor) -> Tensor:
    """``l[a, b, n, k] = m_a[c_{n,k}] . z_{b,n}`` for every pair of peers (a, b), from gathered rows.

    Args:
        bank_rows: (N, B, K + 1, D) rows of each peer's bank at the contrast indices (detached).
        embeddings: (N, B, D) the peers' current normalised embeddings.

    Returns:
        (N, N, B, K + 1). One batched product over the N gathered banks replaces the reference's
        N(N - 1) gathers; the a == b terms are computed too (1/N extra arithmetic) and dropped by
        ``multi_view_nce`` with a mask, since selecting the off-diagonal pairs by boolean
        indexing would synchronise the host with the device.
    """
    # (N_a, B, K+1, D) @ (B, D, N_b) -> (N_a, B, K+1, N_b): no copy of the gathered rows (an einsum
    # over these operands materialises a second (N, B, K+1, D) tensor).
    return torch.matmul(bank_rows, embeddings.permute(1, 2, 0)).permute(0, 3, 1, 2)


def dense_pairwise_logits(memory: Tensor, contrast_idx: Tensor, embeddings: Tensor) -> Tensor:
    """The same (N, N, B, K + 1) logits as ``pairwise_logits``, without gathering bank rows.

    Every bank row is scored against every embedding of the batch in one matrix product
    ((N, N_data, D) x (D, N B)), then the K + 1 scores of each anchor are picked out. When the B
    anchors' K + 1 rows outnumber the bank (B (K + 1) > N_data, e.g. K = 16384 on CIFAR) this
    reads each row once instead of B (K + 1) / N_data times, and keeps N N B N_data scores
    (205 MB at N = 4, B = 64 on CIFAR) instead of N B (K + 1) D gathered floats (2.1 GB at K = 16384).
    """
    n, batch, _ = embeddings.shape
    # (1, N_b B, D) @ (N_a, D, N_data) -> (N_a, N_b B, N_data): one batched GEMM with no copy of
    # the bank (a 4-d broadcast matmul would expand the bank N_b times), contiguous along the bank.
    scores = torch.matmul(embeddings.reshape(1, n * batch, -1), memory.transpose(1, 2))
    scores = scores.view(memory.shape[0], n, batch, memory.shape[1])
    index = contrast_idx[None, None].expand(memory.shape[0], n, batch, contrast_idx.shape[1])
    return scores.gather(3, index)


def pairwise_scores(bank_rows: Tensor, embeddings: Tensor, tau: float) -> Tensor:
    """``s[a, b, n, k] = exp(m_a[c_{n,k}] . z_{b,n} / tau)``: (N, N, B, K + 1); see ``pairwise_logits``."""
    return torch.exp(pairwise_logits(bank_rows, embeddings) / tau)


def score_means(scores: Tensor, global_mean: bool = True) -> Tensor:
    """mean over (B, K + 1) of every term's detached scores: (..., 1, 1).

    Under DDP with ``global_mean`` the mean is over the *global* batch: one all-reduce of the
    per-term sums and the element count (a few floats, on the device, no host sync), so a 2-rank
    run normalises exactly as a 1-rank run with the whole batch. ``global_mean=False`` keeps each
    rank's own mean (what the reference would compute per process).
    """
    scores = scores.detach()
    if not (global_mean and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return scores.mean(dim=(-2, -1), keepdim=True)
    sums = scores.sum(dim=(-2, -1))
    count = torch.full((1,), scores.shape[-2] * scores.shape[-1], dtype=sums.dtype, device=sums.device)
    packed = torch.cat([sums.flatten(), count])
    dist.all_reduce(packed)
    return (packed[:-1] / packed[-1]).view(*sums.shape, 1, 1)


def nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7, global_normaliser: bool = True) -> Tensor:
    """Binary NCE per term, with the reference's per-batch normaliser.

    ``scores``: (..., B, K + 1), column 0 the positive. For each term, Z = mean(scores) * N_data
    (detached, recomputed every batch as the reference; no host sync), P = scores / Z, and

        L = -(1/B) sum_n [ log(P_0 / (P_0 + K Pn + eps)) + sum_k log(K Pn / (P_k + K Pn + eps)) ]

    with Pn = 1 / N_data: negatives summed, batch averaged. Returns (...,), one loss per term.
    Under DDP the mean in Z is over the global batch (``global_normaliser``, see ``score_means``);
    the average over B stays per rank, and DDP's gradient averaging makes it the global average.
    """
    k = scores.shape[-1] - 1
    z = score_means(scores, global_normaliser) * num_samples
    p = scores / z
    noise = k / num_samples  # K * Pn
    log_pos = torch.log(p[..., 0] / (p[..., 0] + noise + eps))
    log_neg = torch.log(noise / (p[..., 1:] + noise + eps)).sum(-1)
    return -(log_pos + log_neg).mean(-1)


def multi_view_nce(bank_rows: Tensor, embeddings: Tensor, tau: float, num_samples: int, eps: float = 1e-7,
                   global_normaliser: bool = True) -> Tensor:
    """The contrastive loss summed over all N(N - 1) ordered peer pairs, in float32."""
    with float32_region(embeddings.device):
        logits = pairwise_logits(bank_rows.float(), embeddings.float())
        return multi_view_nce_from_logits(logits, tau, num_samples, eps, global_normaliser)


def multi_view_nce_from_logits(logits: Tensor, tau: float, num_samples: int, eps: float = 1e-7,
                               global_normaliser: bool = True) -> Tensor:
    """Binary NCE of (N, N, B, K + 1) pair logits, summed over the ordered pairs a != b, in float32."""
    with float32_region(logits.device):
        losses = nce_loss(torch.exp(logits.float() / tau), num_samples, eps, global_normaliser)  # (N, N)
        num_peers = losses.shape[0]
        off_diagonal = 1.0 - torch.eye(num_peers, dtype=losses.dtype, device=losses.device)
        return (losses * off_diagonal).sum()
