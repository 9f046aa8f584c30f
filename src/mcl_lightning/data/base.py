"""The data contract between a DataModule and the rest of mcl-lightning, and its generic parts.

The system and the entry point read four things off the DataModule (by duck typing, so any
``LightningDataModule`` with them works; ``OKDData`` states them as a protocol):

- ``num_classes`` (int): known at construction, before ``setup`` (the model is built from it);
- ``batch_size`` (int): the *global* training batch, split evenly across the DDP ranks;
- ``train_labels`` (int64 tensor, after ``setup("fit")``): the training labels in the order of the
  dataset index that batches carry (methods size memory banks and class-aware negatives from it);
- ``selection_note`` (str): how validation selects epochs, ``test-selected`` when the validation
  set is the set the results are reported on, ``holdout-selected`` otherwise.

and every batch, after ``on_after_batch_transfer``, is ``(images float (B, C, H, W), labels int64
(B,), dataset indices int64 (B,))``.

``OKDDataModule`` implements the parts that do not depend on the dataset: the global batch
split across ranks, the samplers that make a W-rank run equal to a 1-rank run and evaluate every
image exactly once (``mcl_lightning.data.sampling``), per-sample augmentation keys, and the
loaders. CIFAR (``~mcl_lightning.data.cifar``) and ImageNet (``~mcl_lightning.data.imagenet``)
are two subclasses; your own dataset is a third (docs/guide/data.md, "Your own dataset").
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mcl_lightning.core import rng
from mcl_lightning.data.augment import sample_keys
from mcl_lightning.data.resumable import ResumableLoader, ResumableOrderSampler
from mcl_lightning.data.sampling import EvalShardSampler
from mcl_lightning.core.errors import ConfigError

__all__ = ["Batch", "InMemoryDataset", "OKDData", "OKDDataModule", "already_batched", "stratified_split"]

Batch = tuple[Tensor, Tensor, Tensor]


@runtime_checkable
class OKDData(Protocol):
    """What ``~mcl_lightning.system.OKDSystem`` and ``train.py`` read off a DataModule."""

    batch_size: int

    @property
    def num_classes(self) -> int: ...

    @property
    def train_labels(self) -> Tensor: ...

    @property
    def selection_note(self) -> str: ...


class InMemoryDataset(Dataset):
    """(image uint8 (C, H, W), label int64, index int64) samples over in-memory tensors.

    ``__getitems__`` serves a whole batch with one gather (the DataLoader passes it the batch's
    indices); use it with ``collate_fn=already_batched``.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        return self.images[index], self.labels[index], torch.tensor(index, dtype=torch.long)

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx], idx


def already_batched(batch: Batch) -> Batch:
    """collate_fn for datasets whose ``__getitems__`` returns a finished batch."""
    return batch


def stratified_split(labels: Tensor, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded class-stratified split; returns sorted (train_indices, val_indices).

    Each class gets its share of `val_size` (largest-remainder rounding, ties to the lower class
    id), drawn uniformly at random within the class.
    """
    n = len(labels)
    counts = torch.bincount(labels)
    quota = counts * val_size
    take = quota // n
    # Hand out the rounding remainder to the classes with the largest fractional share.
    short = val_size - int(take.sum())
    order = sorted(range(len(counts)), key=lambda c: (-int(quota[c] % n), c))
    take[order[:short]] += 1
    return _first_of_each_class(labels, take, seed)


def per_class_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a seeded random ``fraction`` of every class (at least one per class)."""
    counts = torch.bincount(labels)
    take = torch.clamp((counts.double() * fraction).round().long(), min=1)
    take = torch.minimum(take, counts)
    return _first_of_each_class(labels, take, seed)[1]


def _first_of_each_class(labels: Tensor, take: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(rest, chosen): ``take[c]`` random samples of each class c chosen, both sorted."""
    n = len(labels)
    counts = torch.bincount(labels, minlength=len(take))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sorted_labels, pos = torch.sort(labels[perm], stable=True)  # classes grouped, random within
    shuffled = perm[pos]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_labels]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[shuffled[rank < take[sorted_labels]]] = True  # the first `take` of each class
    return (~chosen).nonzero().squeeze(1), chosen.nonzero().squeeze(1)


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"data.{name} must be an integer >= {low}, got {value!r}.")


def check_val_split(val_split: Any) -> None:
    if (isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or val_split < 0
            or (isinstance(val_split, float) and val_split >= 1)):
        raise ConfigError(f"data.val_split must be 0, a sample count >= 1 or a fraction in (0, 1); "
                          f"got {val_split!r}.")


def holdout_size(val_split: int | float, n: int) -> int:
    size = val_split if isinstance(val_split, int) else round(val_split * n)
    if not 1 <= size < n:
        raise ConfigError(f"data.val_split={val_split} gives {size} validation images out of {n} training "
                          f"images; it must leave at least one on each side.")
    return size


class OKDDataModule(lightning.LightningDataModule):
    """Base class of the DataModules: the global batch, DDP-exact samplers, augmentation keys.

    Subclasses implement ``num_classes`` and ``_load()`` (which sets ``train_dataset``,
    ``val_dataset``, ``test_dataset``; the train dataset has a ``labels`` tensor), and may override
    ``validation_source``, ``collate_fn`` and ``on_after_batch_transfer``.

    Args:
        batch_size: the global training batch; each of W ranks gets ``batch_size / W``.
        eval_batch_size: per-device evaluation batch.
        num_workers, pin_memory, drop_last: DataLoader options (``drop_last`` for training).
        seed: key of the data order and the augmentation; ``None`` takes the run's seed
            (``lightning.seed_everything``, as Lightning's own DistributedSampler does).
    """

    #: the training sampler yields ``(index, epoch)`` pairs (for augmentation keyed in worker processes)
    train_sampler_yields_epoch: bool = False

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 drop_last: bool = False, seed: int | None = None) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            check_int(name, value, low)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"data.seed must be an integer or null, got {seed!r}.")
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.pin_memory, self.drop_last, self.seed = pin_memory, drop_last, seed
        self.per_device_batch_size = batch_size
        self.world_size, self.rank = 1, 0
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.test_dataset: Any = None

    # -- the contract ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def validation_source(self) -> str:
        """"test" when validation runs on the reported evaluation set, "holdout" otherwise."""
        return "test"

    @property
    def selection_note(self) -> str:
        """How checkpoints/epochs were selected: "test-selected" or "holdout-selected"."""
        return f"{self.validation_source}-selected"

    @property
    def train_labels(self) -> Tensor:
        """int64 labels of the training set, in the order of the `index` that batches carry."""
        return self._require(self.train_dataset).labels

    @property
    def num_train_samples(self) -> int:
        return len(self._require(self.train_dataset))

    @property
    def data_seed(self) -> int:
        return rng.run_seed(self.seed)

    # -- Lightning hooks ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: a resumed run keeps the data order and crops of the original one."""
        return {"seed": self.data_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "seed" in state_dict:
            self.seed = int(state_dict["seed"])

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        self.world_size = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        self.rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        if self.batch_size % self.world_size:
            raise ConfigError(f"data.batch_size={self.batch_size} is the global batch and must be divisible "
                              f"by the number of devices ({self.world_size}).")
        self.per_device_batch_size = self.batch_size // self.world_size
        if self.train_dataset is None:  # load once; later stages reuse it
            self._load()

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset)
        # GlobalOrderSampler + how far the epoch got, in checkpoints: mid-epoch resume (data/resumable.py)
        sampler = ResumableOrderSampler(dataset, self.world_size, self.rank, self.data_seed,
                                        yield_epoch=self.train_sampler_yields_epoch)
        return self._loader(dataset, self.per_device_batch_size, sampler, self.drop_last, ResumableLoader)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.val_dataset))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.test_dataset))

    # -- helpers for subclasses --------------------------------------------------------------
    def augment_keys(self, indices: Tensor) -> Tensor:
        """One augmentation key per sample of the batch: (seed, epoch, dataset index)."""
        epoch = int(getattr(self.trainer, "current_epoch", 0) or 0) if self.trainer is not None else 0
        return sample_keys(self.data_seed, epoch, indices)

    @property
    def in_training(self) -> bool:
        return bool(self.trainer is not None and getattr(self.trainer, "training", False))

    def collate_fn(self) -> Callable | None:
        return None  # the DataLoader default

    def _load(self) -> None:
        raise NotImplementedError

    def _require(self, value: Any) -> Any:
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called yet.")
        return value

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return self._loader(dataset, self.eval_batch_size, EvalShardSampler(dataset, self.world_size, self.rank), False)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any, drop_last: bool,
                loader: type[DataLoader] = DataLoader) -> DataLoader:
        return loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                      persistent_workers=self.num_workers > 0, collate_fn=self.collate_fn())
