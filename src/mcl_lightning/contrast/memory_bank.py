"""Per-peer memory banks: one momentum-averaged, L2-normalised embedding per training sample."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """``num_peers`` banks of ``num_samples`` x ``dim`` rows, stored as one buffer.

    A buffer (not a parameter) so that Lightning checkpoints carry it and the optimiser never sees
    it. Stacking the peers' banks lets one indexing call gather every bank's rows for a step.

    Rows start i.i.d. Uniform(-s, s), s = 1/sqrt(dim/3), as the reference (norm about 1, not
    normalised). ``num_samples`` may be 0 at construction; :meth:`resize` sizes the banks once the
    training set is known, and loading a checkpoint sizes them from the checkpoint.
    """

    def __init__(self, num_peers: int, num_samples: int = 0, dim: int = 128, momentum: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory momentum must be in [0, 1), got {momentum}")
        self.num_peers, self.dim, self.momentum = num_peers, dim, momentum
        self.register_buffer("memory", torch.empty(num_peers, 0, dim))
        self.resize(num_samples)

    @property
    def num_samples(self) -> int:
        return self.memory.shape[1]

    def resize(self, num_samples: int) -> None:
        """Re-initialise the banks for a training set of ``num_samples`` items."""
        stdv = 1.0 / math.sqrt(self.dim / 3)
        memory = torch.rand(self.num_peers, num_samples, self.dim, device=self.memory.device)
        self.memory = memory.mul_(2 * stdv).add_(-stdv)

    def gather(self, indices: Tensor, out: Tensor | None = None) -> Tensor:
        """Rows at ``indices`` (any shape) of every bank: (num_peers, *indices.shape, dim).

        ``out``: optional float32 buffer of num_peers * indices.numel() * dim elements to write them
        into (a reused buffer spares the page faults of a fresh large allocation on CPU).
        """
        # index_select on the flat indices: on CPU several times faster than advanced indexing.
        flat = indices.reshape(-1)
        if out is None:
            rows = self.memory.index_select(1, flat)
        else:
            rows = torch.index_select(self.memory, 1, flat, out=out.view(self.num_peers, flat.numel(), self.dim))
        return rows.view(self.num_peers, *indices.shape, self.dim)

    @torch.no_grad()
    def update(self, indices: Tensor, embeddings: Tensor) -> None:
        """``m_i[idx] <- normalise(mu * m_i[idx] + (1 - mu) * z_i)`` for every peer i.

        Under DDP the (indices, embeddings) of all ranks are gathered first, so every rank keeps the
        same banks (with ``broadcast_buffers=False`` nothing else synchronises them).
        """
        gathered = _all_gather_cat(indices)
        embeddings = _all_gather_cat(embeddings.float())
        if gathered is not indices:
            # DistributedSampler pads the last batches with repeated samples. index_copy_ with
            # duplicate indices keeps an arbitrary copy (nondeterministic on CUDA), so ranks could
            # drift apart: every duplicate takes the first occurrence's embedding instead.
            indices = gathered
            position = torch.arange(len(indices), device=indices.device)
            first = torch.full((self.num_samples,), len(indices), dtype=torch.long, device=indices.device)
            first.scatter_reduce_(0, indices, position, reduce="amin")
            embeddings = embeddings[:, first[indices]]
        rows = self.memory.index_select(1, indices).mul_(self.momentum).add_(embeddings, alpha=1.0 - self.momentum)
        rows = rows / rows.pow(2).sum(-1, keepdim=True).sqrt()
        self.memory.index_copy_(1, indices, rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # A checkpoint knows the training-set size; take its shape before the usual copy.
        saved = state_dict.get(prefix + "memory")
        if saved is not None and saved.shape != self.memory.shape:
            self.memory = torch.empty_like(saved, device=self.memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (dim 0 for indices, dim 1 for stacked embeddings) over all ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0 if tensor.dim() == 1 else 1)
