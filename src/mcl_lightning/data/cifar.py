"""CIFAR-10/100 as in-memory uint8 tensors, with batched on-device augmentation.

The pickles are decoded once into (N, 3, 32, 32) uint8 tensors; a batch is one gather
(``__getitems__``), and crop/flip/normalise run on the whole batch on the training device
(``on_after_batch_transfer``), so the data path does not limit a GPU run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from mcl_lightning.data.augment import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, normalize, random_crop_flip,
)
from mcl_lightning.data.samplers import ClassBalancedBatchSampler, check_samples_per_class
from mcl_lightning.errors import ConfigError, DatasetIntegrityError, DatasetNotFoundError

__all__ = ["CIFARDataModule", "InMemoryDataset", "stratified_split"]

Batch = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class _Spec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    md5s: dict[str, frozenset[str]]  # accepted md5s per file
    url: str
    archive: str
    archive_md5: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# CIFAR-100 also accepts the md5s of the shared copy (its synthetic `filenames` differ from the
# official files; the pixels and labels are identical, see ../shared/data/README.md).
_CIFAR100_MD5S = {
    "train": frozenset({"16019d7e3df5f24257cddd939b257f8d", "0edb6f95ed32e77e76793933524424b2"}),
    "test": frozenset({"f0ef6b0ae62326f3e7ffdfab6717acfc", "e07c7d01aa5daebda8420b8b6820aadd"}),
    "meta": frozenset({"7973b15100ade9c7d40fb424638fde48"}),
}
_CIFAR10_MD5S = {name: frozenset({md5}) for name, md5 in CIFAR10.train_list + CIFAR10.test_list}
_CIFAR10_MD5S[CIFAR10.meta["filename"]] = frozenset({CIFAR10.meta["md5"]})

_SPECS = {
    "cifar100": _Spec(
        title="CIFAR-100", folder="cifar-100-python", train_files=("train",), test_files=("test",),
        meta_file="meta", label_key="fine_labels", names_key="fine_label_names", num_classes=100,
        md5s=_CIFAR100_MD5S, url=CIFAR100.url, archive=CIFAR100.filename, archive_md5=CIFAR100.tgz_md5,
        mean=CIFAR100_MEAN, std=CIFAR100_STD,
    ),
    "cifar10": _Spec(
        title="CIFAR-10", folder="cifar-10-batches-py", train_files=tuple(n for n, _ in CIFAR10.train_list),
        test_files=("test_batch",), meta_file="batches.meta", label_key="labels", names_key="label_names",
        num_classes=10, md5s=_CIFAR10_MD5S, url=CIFAR10.url, archive=CIFAR10.filename,
        archive_md5=CIFAR10.tgz_md5, mean=CIFAR10_MEAN, std=CIFAR10_STD,
    ),
}


class InMemoryDataset(Dataset):
    """(image uint8 (3,32,32), label int64, index int64) samples over in-memory tensors."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        return self.images[index], self.labels[index], torch.tensor(index, dtype=torch.long)

    def __getitems__(self, indices: list[int]) -> Batch:
        # DataLoader calls this with the whole batch's indices: one gather instead of B lookups.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx], idx


def _already_batched(batch: Batch) -> Batch:
    """collate_fn for `InMemoryDataset.__getitems__`, which returns a finished batch."""
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
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sorted_labels, pos = torch.sort(labels[perm], stable=True)  # classes grouped, random within
    shuffled = perm[pos]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_labels]
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[shuffled[rank < take[sorted_labels]]] = True  # the first `take` of each class
    return (~in_val).nonzero().squeeze(1), in_val.nonzero().squeeze(1)


class CIFARDataModule(lightning.LightningDataModule):
    """CIFAR-100/CIFAR-10 from torchvision's pickle layout, held in memory as uint8 tensors.

    `batch_size` is the global batch (divided by the world size under DDP). Validation uses the
    test set unless `val_split` (count or fraction) holds out a stratified part of the training set.
    Batches are `(images, labels, indices)`; `indices` index the (possibly reduced) training set.
    """

    def __init__(self, root: str | os.PathLike | None = None, dataset: str = "cifar100",
                 num_classes: int | None = None, batch_size: int = 64, eval_batch_size: int = 256,
                 num_workers: int = 0, val_split: int | float = 0, split_seed: int = 0,
                 download: bool = True, check_integrity: bool = True, augment: bool = True,
                 pin_memory: bool = False, drop_last: bool = False, samples_per_class: int | None = None) -> None:
        super().__init__()
        if dataset not in _SPECS:
            raise ConfigError(f"data.dataset={dataset!r} is not supported; choose one of {sorted(_SPECS)}.")
        self.spec = _SPECS[dataset]
        if num_classes is not None and num_classes != self.spec.num_classes:
            raise ConfigError(f"data.num_classes={num_classes} does not match {self.spec.title}, which "
                              f"has {self.spec.num_classes} classes; set data.num_classes={self.spec.num_classes}.")
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name} must be an integer >= {low}, got {value!r}.")
        if (isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or val_split < 0
                or (isinstance(val_split, float) and val_split >= 1)):
            raise ConfigError(f"data.val_split must be 0, a sample count >= 1 or a fraction in (0, 1); "
                              f"got {val_split!r}.")
        root = None if root is None else os.fspath(root)  # plain str keeps hparams YAML-friendly
        self.save_hyperparameters()
        self.root, self.dataset, self.batch_size, self.eval_batch_size = root, dataset, batch_size, eval_batch_size
        self.num_workers, self.val_split, self.split_seed = num_workers, val_split, split_seed
        self.download, self.check_integrity, self.augment = download, check_integrity, augment
        self.pin_memory, self.drop_last = pin_memory, drop_last
        self.samples_per_class = check_samples_per_class(samples_per_class, batch_size)  # MCL's m-per-class batches
        self.mean, self.std = self.spec.mean, self.spec.std
        self.per_device_batch_size = batch_size
        self.classes: list[str] | None = None
        self.train_dataset: InMemoryDataset | None = None
        self.val_dataset: InMemoryDataset | None = None
        self.test_dataset: InMemoryDataset | None = None

    @property
    def num_classes(self) -> int:
        """100 or 10; known from construction (the model config interpolates it)."""
        return self.spec.num_classes

    @property
    def validation_source(self) -> str:
        """Either "test" (validation = the test set, as in the reference) or "holdout"."""
        return "holdout" if self.val_split else "test"

    @property
    def selection_note(self) -> str:
        """How checkpoints/epochs were selected: "test-selected" or "holdout-selected"."""
        return f"{self.validation_source}-selected"

    @property
    def num_train_samples(self) -> int:
        return len(self._require(self.train_dataset))

    @property
    def train_labels(self) -> Tensor:
        """int64 labels of the training set, in the order of the `index` that batches carry."""
        return self._require(self.train_dataset).labels

    @property
    def data_dir(self) -> Path:
        """`<root>/cifar-100-python` (or `cifar-10-batches-py`); raises if no root is set."""
        root = self.root if self.root is not None else os.environ.get("MCL_DATA_ROOT") or None
        if root is None:
            raise DatasetNotFoundError(
                f"No data root set for {self.spec.title}. Pass data.root=/path/to/data or "
                f"`export MCL_DATA_ROOT=/path/to/data`; that folder must contain {self.spec.folder}/ "
                f"in torchvision's layout ({', '.join(self._file_names())}).")
        return Path(root).expanduser() / self.spec.folder

    def prepare_data(self) -> None:
        """Download and extract the archive if files are missing and `download` is set."""
        folder = self.data_dir
        missing = self._missing(folder)
        if not missing:
            return
        if not self.download:
            raise DatasetNotFoundError(self._not_found(folder, missing, "download=False, so nothing was downloaded."))
        try:
            download_and_extract_archive(self.spec.url, download_root=str(folder.parent),
                                         filename=self.spec.archive, md5=self.spec.archive_md5)
        except Exception as exc:  # no network, HTTP error, bad archive...: all mean "put them there yourself"
            reason = f"{type(exc).__name__}: {exc}"[:300]
            raise DatasetNotFoundError(self._not_found(
                folder, missing, f"The download from {self.spec.url} failed ({reason}).")) from exc
        missing = self._missing(folder)
        if missing:
            raise DatasetNotFoundError(self._not_found(folder, missing, "The downloaded archive did not contain them."))

    def setup(self, stage: str | None = None) -> None:
        world_size = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        if world_size > 1 and self.batch_size % world_size:
            raise ConfigError(f"data.batch_size={self.batch_size} is the global batch and must be divisible "
                              f"by the number of devices ({world_size}).")
        self.per_device_batch_size = self.batch_size // max(world_size, 1)
        if self.train_dataset is None:  # decode once; later stages reuse the tensors
            self._load()

    def train_dataloader(self) -> DataLoader:
        if self.samples_per_class:  # class-balanced batches (data/samplers.py), split across DDP ranks
            batches = ClassBalancedBatchSampler(self.train_labels, self.samples_per_class, self.batch_size,
                                                rank=getattr(self.trainer, "global_rank", 0),
                                                world_size=getattr(self.trainer, "world_size", 1))
            return DataLoader(self.train_dataset, batch_sampler=batches, num_workers=self.num_workers,
                              pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                              collate_fn=_already_batched)
        return self._loader(self._require(self.train_dataset), self.per_device_batch_size, True, self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_dataset), self.eval_batch_size, False, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_dataset), self.eval_batch_size, False, False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        """Crop+flip (training only) and normalise the whole batch on its device."""
        images, labels, indices = batch
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images)  # default RNG: reproducible under seed_everything
        return normalize(images, self.mean, self.std), labels, indices

    def _require(self, value: Any) -> Any:
        if value is None:
            raise RuntimeError("CIFARDataModule.setup() has not been called yet.")
        return value

    def _file_names(self) -> tuple[str, ...]:
        return (*self.spec.train_files, *self.spec.test_files, self.spec.meta_file)

    def _missing(self, folder: Path) -> list[str]:
        return [name for name in self._file_names() if not (folder / name).is_file()]

    def _not_found(self, folder: Path, missing: list[str], why: str) -> str:
        layout = "\n".join(f"  {folder / name}" for name in self._file_names())
        return (f"{self.spec.title} files missing under {folder}: {', '.join(missing)}. {why}\n"
                f"Put the files there in torchvision's layout (e.g. extract {self.spec.archive} from "
                f"{self.spec.url} into {folder.parent}):\n{layout}\n"
                f"or point the data root at a folder that has them: data.root=/path/to/data "
                f"or `export MCL_DATA_ROOT=/path/to/data`.")

    def _read(self, path: Path) -> dict:
        """Read, md5-check and unpickle one file; any failure becomes a DatasetIntegrityError."""
        fix = "Re-download it (delete the folder and run with data.download=true) or copy it again."
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DatasetIntegrityError(f"Cannot read {path}: {exc}. {fix}") from exc
        if self.check_integrity:
            md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
            accepted = self.spec.md5s[path.name]
            if md5 not in accepted:
                raise DatasetIntegrityError(
                    f"{path} has md5 {md5}, expected one of {sorted(accepted)}: the file is corrupted, "
                    f"truncated or a different version. {fix} If it is a custom copy you trust, "
                    f"set data.check_integrity=false.")
        try:
            content = pickle.loads(raw, encoding="latin1")
        except Exception as exc:  # truncated/garbled pickles raise many different types
            raise DatasetIntegrityError(f"{path} is truncated or not a CIFAR pickle "
                                        f"({type(exc).__name__}: {exc}). {fix}") from exc
        if not isinstance(content, dict):
            raise DatasetIntegrityError(f"{path} is not a CIFAR pickle (a {type(content).__name__}, "
                                        f"not a dict). {fix}")
        return content

    def _decode(self, path: Path) -> tuple[Tensor, Tensor]:
        """One data file -> (N,3,32,32) uint8 images and (N,) int64 labels, shapes checked."""
        content = self._read(path)
        data, labels = content.get("data"), content.get(self.spec.label_key)
        try:
            labels = np.asarray(labels, dtype=np.int64)
        except (TypeError, ValueError):
            labels = np.zeros(0, dtype=np.int64)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            bad = f"'data' must be a uint8 array of shape (N, 3072), got {getattr(data, 'shape', type(data))}"
        elif len(data) == 0 or labels.shape != (len(data),):
            bad = f"{len(data)} images but {labels.size} usable '{self.spec.label_key}'"
        elif labels.min() < 0 or labels.max() >= self.num_classes:
            bad = f"'{self.spec.label_key}' must be class ids in [0, {self.num_classes})"
        else:
            return torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32), torch.from_numpy(labels)
        raise DatasetIntegrityError(f"{path} does not look like {self.spec.title}: {bad}. "
                                    f"Re-download it or copy it again.")

    def _decode_all(self, folder: Path, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        images, labels = zip(*(self._decode(folder / name) for name in names))
        return (images[0], labels[0]) if len(names) == 1 else (torch.cat(images), torch.cat(labels))

    def _load(self) -> None:
        folder = self.data_dir
        missing = self._missing(folder)
        if missing:
            why = ("download=True, but prepare_data() has not fetched them (a Trainer calls it before "
                   "setup; call it yourself when using the datamodule by hand)." if self.download
                   else "download=False, so nothing was downloaded.")
            raise DatasetNotFoundError(self._not_found(folder, missing, why))
        meta_path = folder / self.spec.meta_file
        names = self._read(meta_path).get(self.spec.names_key)
        if not isinstance(names, list) or len(names) != self.num_classes:
            raise DatasetIntegrityError(f"{meta_path} lacks {self.num_classes} '{self.spec.names_key}'. "
                                        f"Re-download it or copy it again.")
        self.classes = [str(n) for n in names]
        # The test files first: they are smaller, so a bad copy fails fast.
        test_x, test_y = self._decode_all(folder, self.spec.test_files)
        train_x, train_y = self._decode_all(folder, self.spec.train_files)
        self.test_dataset = InMemoryDataset(test_x, test_y)
        if not self.val_split:
            self.train_dataset, self.val_dataset = InMemoryDataset(train_x, train_y), self.test_dataset
            return
        n = len(train_y)
        val_size = self.val_split if isinstance(self.val_split, int) else round(self.val_split * n)
        if not 1 <= val_size < n:
            raise ConfigError(f"data.val_split={self.val_split} gives {val_size} validation images out of "
                              f"{n} training images; it must leave at least one on each side.")
        train_idx, val_idx = stratified_split(train_y, val_size, self.split_seed)
        self.train_dataset = InMemoryDataset(train_x[train_idx], train_y[train_idx])
        self.val_dataset = InMemoryDataset(train_x[val_idx], train_y[val_idx])

    def _loader(self, dataset: InMemoryDataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, collate_fn=_already_batched)
