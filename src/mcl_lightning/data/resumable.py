"""A shuffled training loader that a checkpoint can stop and resume in the middle of an epoch.

Lightning saves ``state_dict()`` of a training loader that has one in every checkpoint and calls
``load_state_dict`` on restart, before the loader is iterated (it does not fast-forward a plain
``DataLoader``: a mid-epoch restart would start a fresh order). Here the order of epoch ``e`` is a
pure function of ``(seed, e)`` and the state is ``(seed, epoch, samples already handed out)``, so a
resumed run continues with the next batch of the same order. Nothing here draws from the global
RNGs, so restoring those (``OKDSystem`` saves them) stays exact whether the checkpoint was written at
an epoch end or mid-epoch.

    loader = ResumableLoader(dataset, batch_size=64, sampler=ResumableSampler(len(dataset)), ...)
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

_SEED_MOD = 2**63


class ResumableSampler(Sampler[int]):
    """A random permutation per epoch, seeded by ``(seed, epoch)``, that can skip what was consumed.

    Args:
        num_samples: dataset length.
        seed: base seed; default ``torch.initial_seed()`` (what ``seed_everything`` / ``seed=`` set).

    Lightning calls :meth:`set_epoch` before every epoch; without it (e.g. wrapped by another
    sampler) every pass still advances the epoch, so orders never repeat.
    """

    def __init__(self, num_samples: int, seed: int | None = None) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(torch.initial_seed() if seed is None else seed) % _SEED_MOD
        self.epoch = 0
        self._skip = 0  # samples of `epoch` to leave out of the next pass (a mid-epoch resume)
        self._pass = {"epoch": 0, "yielded": 0}  # the pass in progress

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0  # resuming into a later epoch: it starts from the top
        self.epoch = epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed + epoch) % _SEED_MOD)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        self.epoch += 1  # the next pass shuffles anew even if nobody calls set_epoch
        current = self._pass = {"epoch": epoch, "yielded": skip}
        for index in self.permutation(epoch)[skip:].tolist():
            current["yielded"] += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """The pass in progress: its epoch and how many samples it has handed out."""
        return {"seed": self.seed, "epoch": self._pass["epoch"], "yielded": self._pass["yielded"]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        yielded = int(state["yielded"])
        self._skip = yielded if yielded < self.num_samples else 0
        self._pass = {"epoch": self.epoch, "yielded": yielded}


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose ``state_dict`` is its ``ResumableSampler``'s (Lightning checkpoints it).

    It gets its own ``torch.Generator`` for the per-iterator base seed, so creating an iterator
    draws nothing from the global RNG either.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(torch.initial_seed() % _SEED_MOD)
        super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict() if isinstance(self.sampler, ResumableSampler) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state)
