"""CIFAR-10/100 as in-memory uint8 tensors, with batched on-device augmentation.

The pickles are decoded once into (N, 3, 32, 32) uint8 tensors; a batch is one gather
(``__getitems__``), and crop/flip/normalise run on the whole batch on the training device
(``on_after_batch_transfer``), so the data path does not limit a GPU run. The generic parts (the
data contract, in-memory dataset, stratified split, DDP samplers) live in ``data/base.py``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from mcl_lightning.data.resident import DeviceResidentLoader
from mcl_lightning.data.augment import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, normalize, random_crop_flip,
)
from mcl_lightning.data.base import (
    Batch, InMemoryDataset, OKDDataModule, already_batched, check_val_split, holdout_size, stratified_split,
)
from mcl_lightning.data.resumable import ResumableOrderSampler
from mcl_lightning.data.samplers import ClassBalancedBatchSampler, check_samples_per_class
from mcl_lightning.core.errors import ConfigError, DatasetIntegrityError, DatasetNotFoundError
from mcl_lightning.data.paths import default_data_root
from mcl_lightning.core.registry import check_choice

__all__ = ["CIFARDataModule", "InMemoryDataset", "stratified_split"]


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


# CIFAR-100 also accepts the md5s of a known redistributed copy whose `filenames` entries differ from
# the official files (its pixels and labels are identical to them).
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


class CIFARDataModule(OKDDataModule):
    """CIFAR-100/CIFAR-10 from torchvision's pickle layout, held in memory as uint8 tensors.

    `batch_size` is the global batch (divided by the world size under DDP). Validation uses the
    test set unless `val_split` (count or fraction) holds out a stratified part of the training set.
    Batches are `(images, labels, indices)`; `indices` index the (possibly reduced) training set.
    Crops and flips are keyed by (seed, epoch, index): the same on any number of ranks.
    """

    def __init__(self, root: str | os.PathLike | None = None, dataset: str = "cifar100",
                 num_classes: int | None = None, batch_size: int = 64, eval_batch_size: int = 256,
                 num_workers: int = 0, val_split: int | float = 0, split_seed: int = 0,
                 download: bool = True, check_integrity: bool = True, augment: bool = True,
                 pin_memory: bool = False, drop_last: bool = False, seed: int | None = None,
                 samples_per_class: int | None = None, device_resident: bool = False) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last, seed)
        check_choice("data.dataset", dataset, sorted(_SPECS))
        self.samples_per_class = check_samples_per_class(samples_per_class, batch_size)  # MCL's m-per-class batches
        self.spec = _SPECS[dataset]
        if num_classes is not None and num_classes != self.spec.num_classes:
            raise ConfigError(f"data.num_classes={num_classes} does not match {self.spec.title}, which "
                              f"has {self.spec.num_classes} classes; set data.num_classes={self.spec.num_classes}.")
        check_val_split(val_split)
        root = None if root is None else os.fspath(root)  # plain str keeps hparams YAML-friendly
        # the class count as the system records it: Lightning refuses to log a DataModule's num_classes=None
        # beside OKDSystem's 100 ("Error while merging hparams")
        num_classes = self.spec.num_classes
        self.save_hyperparameters()
        self.root, self.dataset = root, dataset
        self.val_split, self.split_seed = val_split, split_seed
        self.download, self.check_integrity, self.augment = download, check_integrity, augment
        self.device_resident = device_resident  # training set on the training device (data/resident.py)
        self.mean, self.std = self.spec.mean, self.spec.std
        self.classes: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """100 or 10; known from construction (the model config interpolates it)."""
        return self.spec.num_classes

    @property
    def validation_source(self) -> str:
        """Either "test" (validation = the test set, as in the reference) or "holdout"."""
        return "holdout" if self.val_split else "test"

    @property
    def data_dir(self) -> Path:
        """`<root>/cifar-100-python` (or `cifar-10-batches-py`); root: `root`, `$MCL_DATA_ROOT`, or
        the per-user default (`mcl_lightning.data.paths.default_data_root()`)."""
        root = self.root if self.root is not None else os.environ.get("MCL_DATA_ROOT") or default_data_root()
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

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        """Crop+flip (training only) and normalise the whole batch on its device."""
        images, labels, indices = batch
        if self.augment and self.in_training:
            images = random_crop_flip(images, keys=self.augment_keys(indices))
        return normalize(images, self.mean, self.std), labels, indices

    def collate_fn(self):  # noqa: ANN201
        return already_batched  # InMemoryDataset.__getitems__ returns whole batches

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

    def train_dataloader(self) -> DataLoader | DeviceResidentLoader:
        if self.device_resident and not self.samples_per_class:
            return self._resident_loader(self._require(self.train_dataset))
        if not self.samples_per_class:
            return super().train_dataloader()
        # class-balanced batches (data/samplers.py); each rank keeps whole classes of the global batch
        batches = ClassBalancedBatchSampler(self.train_labels, self.samples_per_class, self.batch_size,
                                            seed=self.data_seed, rank=self.rank, world_size=self.world_size)
        return DataLoader(self._require(self.train_dataset), batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, collate_fn=self.collate_fn())

    def _resident_loader(self, dataset: Any) -> DeviceResidentLoader:
        """The training set on the training device, the same batches as the DataLoader (one device only)."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            raise ConfigError("data.device_resident=true serves one device; set it false under DDP")
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        sampler = ResumableOrderSampler(dataset, self.world_size, self.rank, self.data_seed)  # the loader's order
        return DeviceResidentLoader(dataset.images, dataset.labels, self.per_device_batch_size, device,
                                    drop_last=self.drop_last, sampler=sampler)

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
        val_size = holdout_size(self.val_split, len(train_y))
        train_idx, val_idx = stratified_split(train_y, val_size, self.split_seed)
        self.train_dataset = InMemoryDataset(train_x[train_idx], train_y[train_idx])
        self.val_dataset = InMemoryDataset(train_x[val_idx], train_y[val_idx])
