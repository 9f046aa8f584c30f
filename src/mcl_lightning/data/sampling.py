"""Samplers that make a W-rank run see what a 1-rank run sees.

- Training: ``GlobalOrderSampler``, torch's ``DistributedSampler`` used on every world size
  (one rank included): one seeded permutation per epoch, rank r takes positions r, r + W, ... So
  the union of the W ranks' step-t batches (per-device batch B/W) is exactly the 1-rank run's
  step-t batch (batch B). ``yield_epoch=True`` yields ``(index, epoch)`` pairs, for datasets whose
  augmentation runs in worker processes and is keyed by the epoch.
- Evaluation: ``EvalShardSampler``, rank r takes r, r + W, ... *without padding*, so every
  image is evaluated exactly once whatever the world size (the torchmetrics states are summed
  over ranks). Lightning's own DistributedSampler would repeat images to even out the ranks.

Both subclass ``DistributedSampler``, so Lightning keeps them as they are under DDP
(``use_distributed_sampler`` only replaces samplers that are not).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler

__all__ = ["EvalShardSampler", "GlobalOrderSampler"]


class GlobalOrderSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True)`` with an explicit world; optionally tags the epoch."""

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, seed: int, yield_epoch: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.yield_epoch = yield_epoch

    def __iter__(self) -> Iterator:
        indices = super().__iter__()
        if not self.yield_epoch:
            return indices
        epoch = self.epoch
        return ((index, epoch) for index in indices)


class EvalShardSampler(DistributedSampler):
    """Rank ``r`` of ``W`` gets indices r, r + W, r + 2W, ... in order: no padding, no repeats."""

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
