"""Class-balanced batches: m samples of each of B/m classes in every batch (MCL's ``MPerClassSampler``).

In-batch supervised contrastive losses (``method=mutual_cl``) need every anchor to have a same-class
partner in the batch; with B = 128 drawn at random from CIFAR-100's 100 classes many have none.
winycg/MCL trains with ``MPerClassSampler(labels, m=2, batch_size=128, length_before_new_iter=50000)``
(``main_cifar.py:99-101``, ``dataset/class_sampler.py``); ``ClassBalancedBatchSampler`` draws
batches the same way, from a seeded torch generator, and splits them across DDP ranks.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DistributedSampler

from mcl_lightning.core.errors import ConfigError

__all__ = ["ClassBalancedBatchSampler", "check_samples_per_class"]


def check_samples_per_class(samples_per_class: int | None, batch_size: int) -> int | None:
    """The ``data.samples_per_class`` setting, checked against the (global) batch size; ``None``/0 = off."""
    if samples_per_class in (None, 0):
        return None
    m = samples_per_class
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"data.samples_per_class must be null (plain shuffling) or an integer >= 1, got {m!r}")
    if batch_size % m:
        raise ConfigError(
            f"data.samples_per_class={m} must divide data.batch_size={batch_size} (each batch holds batch_size / "
            f"samples_per_class classes); e.g. data.samples_per_class=2 with an even batch size"
        )
    return m


class _EpochClock:
    """Where the batch sampler reads its epoch: Lightning calls ``batch_sampler.sampler.set_epoch(e)`` at
    the start of every training epoch (on this object, or on the ``DistributedSampler`` it injects)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class ClassBalancedBatchSampler(BatchSampler):
    """Batches of exactly ``samples_per_class`` (m) samples of each of ``batch_size / m`` distinct classes.

    Drawn as winycg/MCL's ``MPerClassSampler`` with ``length_before_new_iter = len(dataset)``:

    - an epoch is ``len(labels) // batch_size`` batches (the reference trims its index list to a
      multiple of the batch size: 390 batches of 128 on CIFAR-100);
    - every batch is drawn independently: B/m classes uniformly without replacement, then m samples of
      each uniformly without replacement (with replacement for a class that has fewer than m). So, as
      in the reference, an epoch does not visit every sample exactly once (about 63 % of them at m = 2);
    - samples of one class are consecutive within a batch.

    Randomness: a ``torch.Generator`` seeded from ``(seed, epoch)``, so a run is reproducible and a
    resumed run draws the batches an uninterrupted one would (the reference uses NumPy's global RNG).
    ``seed=None`` takes ``PL_GLOBAL_SEED`` (set by ``seed_everything``, as Lightning's own distributed
    sampler does), else 0. The epoch comes from ``set_epoch``, which Lightning calls every epoch.

    DDP: ``batch_size`` is the global batch. Every rank draws the same global batch and keeps its own
    ``batch_size / m / world_size`` classes, so the ranks' batches together are exactly the
    single-device batch and each rank's batch is class-balanced on its own. ``rank``/``world_size``
    default to those of a ``DistributedSampler`` passed as ``sampler`` (Lightning injects one under
    DDP and re-creates this object with it), else to a single process.

    Args:
        labels: (N,) class labels of the dataset, in index order.
        samples_per_class: m.
        batch_size: the global batch size B (a multiple of m; B / m <= number of classes).
        seed, rank, world_size, sampler: see above; ``sampler`` is only read for its rank, world
            size and epoch, never iterated.
    """

    def __init__(
        self,
        labels: Tensor | Sequence[int],
        samples_per_class: int,
        batch_size: int,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        sampler: object | None = None,
    ) -> None:  # BatchSampler.__init__ is not called: there is no index sampler to batch
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        m = check_samples_per_class(samples_per_class, batch_size)
        if m is None or labels.dim() != 1:
            raise ConfigError("ClassBalancedBatchSampler needs samples_per_class >= 1 and labels of shape (N,)")
        if isinstance(sampler, DistributedSampler):
            for name, given, found in (("rank", rank, sampler.rank), ("world_size", world_size, sampler.num_replicas)):
                if given is not None and given != found:
                    raise ValueError(f"{name}={given} disagrees with the DistributedSampler's {found}")
            rank, world_size = sampler.rank, sampler.num_replicas
        rank, world_size = (0 if rank is None else int(rank)), (1 if world_size is None else int(world_size))
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        per_batch = batch_size // m
        if per_batch > len(classes):
            raise ConfigError(
                f"data.batch_size={batch_size} with data.samples_per_class={m} needs {per_batch} classes per batch, "
                f"but the training set has {len(classes)}; lower the batch size or raise samples_per_class"
            )
        if per_batch % world_size:
            raise ConfigError(
                f"class-balanced batches are split across the {world_size} devices by whole classes: "
                f"data.batch_size / data.samples_per_class = {per_batch} classes must divide by {world_size}; "
                f"change data.batch_size or data.samples_per_class"
            )
        if len(labels) < batch_size:
            raise ConfigError(f"the training set ({len(labels)} samples) is smaller than data.batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.labels, self.samples_per_class, self.global_batch_size = labels, m, batch_size
        self.rank, self.world_size, self.classes_per_batch = rank, world_size, per_batch
        self.batch_size, self.drop_last = batch_size // world_size, True  # BatchSampler's attributes, per rank
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
        self.sampler = sampler if sampler is not None else _EpochClock()
        # Each class's sample indices as one row of a padded (classes, largest class) table.
        order = torch.argsort(inverse, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        column = torch.arange(len(labels)) - starts[inverse[order]]
        self._table = torch.zeros(len(classes), int(counts.max()), dtype=torch.long)
        self._table[inverse[order], column] = order
        self._counts = counts
        self._any_small = bool((counts < m).any())

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (Lightning does this every epoch)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.labels) // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        per_rank = self.classes_per_batch // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        for _ in range(len(self)):
            rows = self._global_batch(generator)  # (B / m, m): every rank draws the same
            yield rows[mine].reshape(-1).tolist()

    def _global_batch(self, generator: torch.Generator) -> Tensor:
        """(B / m, m) dataset indices: B / m distinct classes, m distinct samples of each."""
        m = self.samples_per_class
        chosen = torch.randperm(len(self._counts), generator=generator)[: self.classes_per_batch]
        counts = self._counts[chosen]
        # m distinct positions per class, uniformly: the j-th draw is a rank among the n - j positions
        # not taken yet, mapped to a position by stepping over the taken ones in increasing order.
        taken = torch.empty(len(chosen), 0, dtype=torch.long)
        for j in range(m):
            position = (torch.rand(len(chosen), generator=generator) * (counts - j).clamp(min=1)).long()
            for t in range(j):
                position += (position >= taken[:, t]).long()
            taken = torch.sort(torch.cat([taken, position[:, None]], 1), dim=1).values
        if self._any_small:  # classes with fewer than m samples: with replacement, as the reference
            anywhere = (torch.rand(len(chosen), m, generator=generator) * counts[:, None]).long()
            taken = torch.where((counts < m)[:, None], anywhere, taken)
        columns = taken[:, torch.randperm(m, generator=generator)] if m > 1 else taken  # not sorted within a class
        return self._table[chosen[:, None], columns]
