"""A training loader that a checkpoint can stop and resume in the middle of an epoch.

Lightning saves ``state_dict()`` of a training loader that has one in every checkpoint and calls
``load_state_dict`` on restart, before the loader is iterated (it does not fast-forward a plain
``DataLoader``: a mid-epoch restart would start the epoch's order again). The order of
``~mcl_lightning.data.sampling.GlobalOrderSampler`` is a pure function of ``(seed, epoch)``, so
the state is ``(seed, epoch, samples of this rank that training consumed)`` and a resumed run
continues with the next batch of the same order, on one device or W. The loader counts the batches
it *returned*: with ``num_workers > 0`` the workers prefetch batches ahead of training, so the
sampler has handed out more than was trained on (the sampler's own count is right only without
workers). Creating the iterator draws nothing from the global RNG either (the loader has its own
generator for the workers' base seed).

    sampler = ResumableOrderSampler(dataset, world_size, rank, seed)
    loader = ResumableLoader(dataset, batch_size=64, sampler=sampler, ...)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from mcl_lightning.data.sampling import GlobalOrderSampler

__all__ = ["ResumableLoader", "ResumableOrderSampler"]


class ResumableOrderSampler(GlobalOrderSampler):
    """``GlobalOrderSampler`` that records how far the current epoch got and can skip that far."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0  # samples of `epoch` to leave out of the next pass (a mid-epoch resume)
        self._pass = {"epoch": self.epoch, "yielded": 0}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0  # resuming into a later epoch: it starts from the top
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator:
        skip, self._skip = self._skip, 0
        current = self._pass = {"epoch": self.epoch, "yielded": skip}
        for item in itertools.islice(super().__iter__(), skip, None):
            current["yielded"] += 1
            yield item

    @property
    def pending_skip(self) -> int:
        """Samples of ``epoch`` the next pass leaves out (a mid-epoch resume; 0 otherwise)."""
        return self._skip

    def state_dict(self) -> dict[str, int]:
        return {"seed": int(self.seed), "epoch": self._pass["epoch"], "yielded": self._pass["yielded"],
                "num_replicas": int(self.num_replicas)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        yielded = int(state["yielded"])
        if int(state.get("num_replicas", self.num_replicas)) != self.num_replicas:
            # another world size: this rank's share of the order differs; convert through the global count
            yielded = yielded * int(state["num_replicas"]) // self.num_replicas
        self._skip = yielded if yielded < len(self) else 0
        self._pass = {"epoch": self.epoch, "yielded": yielded}


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose ``state_dict`` is its sampler's, with the samples of the batches it has
    returned (Lightning puts it in checkpoints)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:  # the workers' base seed: not from the global RNG
            kwargs["generator"] = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        super().__init__(*args, **kwargs)
        self._consumed: dict[str, int] | None = None  # {"epoch", "samples"} of the pass being iterated

    def __iter__(self) -> Iterator:
        sampler = self.sampler
        if not isinstance(sampler, ResumableOrderSampler) or self.batch_size is None:
            return super().__iter__()
        # read before the workers start: they draw the sampler (and clear its pending skip) at once
        position = {"epoch": sampler.epoch, "samples": sampler.pending_skip}
        return self._counted(super().__iter__(), position, len(sampler))

    def _counted(self, batches: Iterator, position: dict[str, int], total: int) -> Iterator:
        self._consumed = position
        while True:
            if self.sampler.epoch != position["epoch"]:
                # Resuming from an epoch-end checkpoint, Lightning creates this iterator (the workers
                # start on the old epoch's order) before it sets the next epoch: start that epoch's pass
                position.update(epoch=self.sampler.epoch, samples=self.sampler.pending_skip)
                batches = super().__iter__()
            try:
                batch = next(batches)
            except StopIteration:
                return
            # the i-th batch returned holds the i-th slice of the order (DataLoader keeps the order)
            position["samples"] = min(position["samples"] + self.batch_size, total)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if not isinstance(self.sampler, ResumableOrderSampler):
            return {}
        state = self.sampler.state_dict()
        if self._consumed is not None and self._consumed["epoch"] == state["epoch"]:
            state["yielded"] = self._consumed["samples"]  # consumed by training, not handed to the workers
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and isinstance(self.sampler, ResumableOrderSampler):
            self.sampler.load_state_dict(state)
