"""Training batches served from tensors that live on the training device (no host round trip).

CIFAR's training set is 150 MB of uint8: on a GPU it fits many times over, and serving batches
there (one ``index_select`` per batch) removes the per-step host-to-device copy and the Python
collation. ``CIFARDataModule(device_resident=True)`` (``data.device_resident=true``; on in
``perf=gpu_fast``) returns this loader for training; augmentation stays where it is
(``on_after_batch_transfer``, on the device).

Same batches as the DataLoader: given the DataModule's training ``sampler`` (the seeded, resumable
global order), batches take its indices in the same order; without one, each epoch draws its
shuffle exactly as ``DataLoader(shuffle=True)`` does (one int64 from the default CPU generator for
the iterator's base seed, then one for the ``RandomSampler``'s generator, then ``randperm``).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor, Tensor]


class DeviceResidentLoader:
    """(images uint8, labels int64, dataset indices int64) batches indexed on ``device``.

    Args:
        images, labels: the whole training set (moved to ``device`` once, here).
        batch_size: per-device batch.
        device: where the tensors and the batches live.
        shuffle: a new random order each epoch (as ``DataLoader(shuffle=True)``).
        drop_last: drop the last, smaller batch (static shapes, for CUDA graphs).
        sampler: an iterable of dataset indices (with ``set_epoch``, which Lightning calls through
            ``loader.sampler``); read one batch at a time, so a resumable sampler knows how far
            the epoch got. ``None``: ``shuffle`` as above.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, device: torch.device | str,
                 shuffle: bool = True, drop_last: bool = False, sampler: Any = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last, self.sampler = batch_size, shuffle, drop_last, sampler

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> Tensor:
        """This epoch's sample order, drawn as torch's DataLoader + RandomSampler draw it."""
        n = len(self.labels)
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
        if not self.shuffle:
            return torch.arange(n)
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # a CPU value: no device sync
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[Batch]:
        if self.sampler is not None:
            yield from self._from_sampler()
            return
        order = self._order().to(self.device, non_blocking=True)  # one small copy per epoch
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index), index

    def _from_sampler(self) -> Iterator[Batch]:
        indices = iter(self.sampler)
        while True:
            chunk = list(itertools.islice(indices, self.batch_size))
            if not chunk or (self.drop_last and len(chunk) < self.batch_size):
                return
            index = torch.tensor(chunk, dtype=torch.long).to(self.device, non_blocking=True)  # B ints
            yield self.images.index_select(0, index), self.labels.index_select(0, index), index
