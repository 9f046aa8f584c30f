"""Per-peer memory banks: one momentum-averaged, L2-normalised embedding per training sample."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mcl_lightning.core import rng
from mcl_lightning.core.errors import ConfigError


BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bank_bytes(num_peers: int, num_samples: int, dim: int = 128, dtype: str = "float32") -> int:
    """Bytes the banks take: N x N_data x dim x element size (ImageNet, N = 4, float32: 2.6 GB)."""
    return num_peers * num_samples * dim * BANK_DTYPES[dtype].itemsize


class MemoryBank(nn.Module):
    """``num_peers`` banks of ``num_samples`` x ``dim`` rows, stored as one buffer.

    A buffer (not a parameter) so that Lightning checkpoints carry it and the optimiser never sees
    it. Stacking the peers' banks lets one indexing call gather every bank's rows for a step.

    Rows start i.i.d. Uniform(-s, s), s = 1/sqrt(dim/3), as the reference (norm about 1, not
    normalised), drawn from a generator seeded by ``seed`` (``None``: the run's seed, see
    ``mcl_lightning.core.rng.run_seed``), not from the global RNG: the initial banks are the same on
    every rank and for every world size (Lightning's DDP re-seeds the global RNG during setup). ``num_samples`` may be 0 at construction; ``resize`` sizes the banks once the
    training set is known, and loading a checkpoint sizes them from the checkpoint.

    ``dtype`` is the storage type: ``float32`` (the reference), or ``bfloat16``/``float16`` to halve
    the banks at ImageNet size. Gathered rows are scored in float32 (``multi_view_nce`` upcasts
    them) and updates are computed in float32, then rounded once to the storage type.
    """

    def __init__(self, num_peers: int, num_samples: int = 0, dim: int = 128, momentum: float = 0.5,
                 dtype: str | torch.dtype = "float32", seed: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory momentum must be in [0, 1), got {momentum}")
        if isinstance(dtype, str):
            if dtype not in BANK_DTYPES:
                raise ConfigError(f"unknown memory-bank dtype {dtype!r}; choose one of: {', '.join(BANK_DTYPES)}")
            dtype = BANK_DTYPES[dtype]
        if dtype not in BANK_DTYPES.values():
            raise ConfigError(f"memory-bank dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype}")
        self.num_peers, self.dim, self.momentum, self.dtype, self.seed = num_peers, dim, momentum, dtype, seed
        self.register_buffer("memory", torch.empty(num_peers, 0, dim, dtype=dtype))
        self.resize(num_samples)

    @property
    def num_samples(self) -> int:
        return self.memory.shape[1]

    def resize(self, num_samples: int) -> None:
        """Re-initialise the banks for a training set of ``num_samples`` items."""
        stdv = 1.0 / math.sqrt(self.dim / 3)
        device = self.memory.device
        generator = None
        if device.type != "meta":
            seed = rng.key_int(rng.run_seed(self.seed), rng.STREAM_BANK_INIT)
            generator = torch.Generator(device).manual_seed(seed)
        memory = torch.rand(self.num_peers, num_samples, self.dim, device=device, generator=generator)
        self.memory = memory.mul_(2 * stdv).add_(-stdv).to(self.dtype)

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
        rows = self.memory.index_select(1, indices).float().mul_(self.momentum).add_(embeddings, alpha=1.0 - self.momentum)
        rows = rows / rows.pow(2).sum(-1, keepdim=True).sqrt()
        self.memory.index_copy_(1, indices, rows.to(self.memory.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # A checkpoint knows the training-set size; take its shape before the usual copy.
        saved = state_dict.get(prefix + "memory")
        if saved is not None and saved.shape != self.memory.shape:  # the configured dtype is kept
            self.memory = torch.empty(saved.shape, dtype=self.memory.dtype, device=self.memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (dim 0 for indices, dim 1 for stacked embeddings) over all ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0 if tensor.dim() == 1 else 1)
