"""ImageNet (or any ``train/`` + ``val/`` class-folder dataset, torchvision's ImageFolder layout).

    <root>/train/<class>/*.JPEG      <root>/val/<class>/*.JPEG

The reference recipe (docs/guide/imagenet.md): training ``RandomResizedCrop(224)`` + horizontal flip,
evaluation ``Resize(256)`` + ``CenterCrop(224)``, ImageNet mean/std. Batches are
``(images, labels, dataset indices)``.

Two decoding paths (``decode=``):

- ``cpu`` (default): worker processes read, decode (libjpeg-turbo through ``torchvision.io``),
  crop and resize every image and hand over uint8 224x224 tensors; normalisation runs on the
  training device.
- ``device``: workers only read the files; decoding (nvJPEG on a GPU, batched) and the crops run
  on the training device in ``on_after_batch_transfer``, so the CPU does not limit a GPU run.

Either way an image's crop and flip are keyed by (seed, epoch, dataset index), so both paths and
every world size draw the same crops.

Everything that can be wrong with the folders is reported before any training, in one message
naming what and where: no root, no ``train/`` or ``val/``, train and val class lists that differ, a
class folder without images (``setup``), and unreadable images (``prepare_data``, by path; a file
that only fails to decode later names its path then too).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from mcl_lightning.core.errors import ConfigError, DatasetIntegrityError
from mcl_lightning.data.augment import (
    IMAGENET_MEAN, IMAGENET_STD, center_crop_eval, normalize, random_resized_crop_box, resized_crop_flip, sample_key,
)
from mcl_lightning.data.base import Batch, OKDDataModule, check_val_split, holdout_size, per_class_subset, stratified_split
from mcl_lightning.data.image_folder import (
    IMG_EXTENSIONS, VERIFY_MODES, FolderIndex, count_classes, decode_file, find_classes, index_split, listing,
    read_encoded, resolve_root, select_classes, split_dirs, verify_images,
)

__all__ = ["IMG_EXTENSIONS", "ImageFolderFiles", "ImageNetDataModule", "count_classes"]

log = logging.getLogger("mcl_lightning")

DECODE_MODES = ("cpu", "device")


# ---- dataset --------------------------------------------------------------------------------------
class ImageFolderFiles(Dataset):
    """Samples of one split, decoded (and augmented) in the DataLoader worker.

    ``mode``: ``train`` (keyed RandomResizedCrop + flip; items are ``(index, epoch)`` pairs),
    ``eval`` (Resize + CenterCrop), or ``encoded`` (the file's bytes, decoded later on the device).
    Samples are ``(image, label, index)``; ``encoded`` adds the path.
    """

    def __init__(self, index: FolderIndex, mode: str, image_size: int, resize_size: int, seed: int = 0) -> None:
        self.index, self.mode, self.image_size, self.resize_size, self.seed = index, mode, image_size, resize_size, seed

    @property
    def labels(self) -> Tensor:
        return self.index.labels

    def __len__(self) -> int:
        return len(self.index.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        path, label = self.index.path(index), self.index.labels[index]
        if self.mode == "encoded":
            return read_encoded(path), label, torch.tensor(index), str(path)
        image = decode_file(path)
        if self.mode == "train":
            box = random_resized_crop_box(sample_key(self.seed, epoch, index), image.shape[1], image.shape[2])
            image = resized_crop_flip(image, *box, self.image_size)
        else:
            image = center_crop_eval(image, self.resize_size, self.image_size)
        return image, label, torch.tensor(index)


def collate_encoded(samples: list[tuple]) -> tuple[list[Tensor], Tensor, Tensor, list[str]]:
    encoded, labels, indices, paths = zip(*samples)
    return list(encoded), torch.stack(labels), torch.stack(indices), list(paths)


def decode_on_device(encoded: list[Tensor], paths: list[str], device: torch.device) -> list[Tensor]:
    """Decode a batch of files on ``device``: batched nvJPEG on CUDA (per image, then on the CPU,
    for files it rejects, e.g. PNGs named .JPEG or CMYK JPEGs), torchvision's CPU decoder otherwise."""
    if device.type == "cuda":
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        images = []
        for data, path in zip(encoded, paths):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(decode_file(Path(path), data).to(device))
        return images
    return [decode_file(Path(path), data) for data, path in zip(encoded, paths)]


# ---- DataModule ------------------------------------------------------------------------------------
class ImageNetDataModule(OKDDataModule):
    """ImageNet-style class folders, decoded in worker processes or on the training device.

    Args:
        root: folder with ``train/`` and ``val/`` (or ``$MCL_IMAGENET_ROOT``).
        num_classes: expected class count (checked); ``None``: counted from the folders.
        classes: ``None`` (all), ``n`` (the first n classes in sorted order), a list of class folder
            names, or a text file with one name per line (ImageNet-100-style runs).
        train_fraction: keep this seeded random fraction of every class's training images.
        batch_size: global training batch (reference 128); eval_batch_size per device.
        num_workers: decoding processes per device (reference 8).
        image_size, resize_size: the crop (224) and the evaluation resize (256).
        decode: ``cpu`` (in the workers) or ``device`` (on the training device; nvJPEG on a GPU).
        verify_images: ``header`` (open every image's header before training), ``decode`` (decode
            every image: thorough, slow) or ``none``.
        val_split: 0 validates on ``val/`` (the reported set: "test-selected"); a count or fraction
            holds out a class-stratified part of ``train/`` instead ("holdout-selected").
        split_seed: seed of the holdout and of ``train_fraction``.
        augment: RandomResizedCrop + flip for training (else the evaluation transform).
        seed: key of the data order and the crops; ``None`` takes the run's seed.
    """

    def __init__(self, root: str | os.PathLike | None = None, num_classes: int | None = None, classes: Any = None,
                 train_fraction: float = 1.0, batch_size: int = 128, eval_batch_size: int = 128, num_workers: int = 8,
                 image_size: int = 224, resize_size: int = 256, decode: str = "cpu", verify_images: str = "header",
                 val_split: int | float = 0, split_seed: int = 0, augment: bool = True, pin_memory: bool = True,
                 drop_last: bool = False, seed: int | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, drop_last, seed)
        if decode not in DECODE_MODES:
            raise ConfigError(f"data.decode={decode!r}; choose one of: {', '.join(DECODE_MODES)}.")
        if verify_images not in VERIFY_MODES:
            raise ConfigError(f"data.verify_images={verify_images!r}; choose one of: {', '.join(VERIFY_MODES)}.")
        if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) or not 0 < train_fraction <= 1:
            raise ConfigError(f"data.train_fraction must be in (0, 1], got {train_fraction!r}.")
        for name, value in (("image_size", image_size), ("resize_size", resize_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}.")
        if resize_size < image_size:
            raise ConfigError(f"data.resize_size={resize_size} is smaller than data.image_size={image_size}: "
                              f"evaluation resizes to resize_size, then center-crops image_size.")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ConfigError(f"data.num_classes must be a positive integer or null, got {num_classes!r}.")
        check_val_split(val_split)
        if isinstance(classes, bool) or (isinstance(classes, int) and classes < 1):
            raise ConfigError(f"data.classes must be null, a count >= 1, a list of class names or a file, "
                              f"got {classes!r}.")
        if classes is not None and not isinstance(classes, (int, str, os.PathLike)):
            classes = [str(c) for c in classes]  # a list or a ListConfig from Hydra
        root = None if root is None else os.fspath(root)
        # num_classes=None (count the folders) is left out: Lightning refuses to log it beside OKDSystem's count
        self.save_hyperparameters(ignore=["num_classes"] if num_classes is None else None)
        self.root, self._num_classes, self.classes_option = root, num_classes, classes
        self.train_fraction, self.image_size, self.resize_size = float(train_fraction), image_size, resize_size
        self.decode, self.verify_images, self.val_split, self.split_seed = decode, verify_images, val_split, split_seed
        self.augment = augment
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.classes: list[str] | None = None
        self._index: tuple[FolderIndex, FolderIndex] | None = None
        self._verified = False

    # -- the contract ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = count_classes(self.root, self.classes_option)
        return self._num_classes

    @property
    def validation_source(self) -> str:
        return "holdout" if self.val_split else "test"

    @property
    def train_sampler_yields_epoch(self) -> bool:  # type: ignore[override]
        return self.decode == "cpu"  # crops in the workers are keyed by the epoch

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Check the folders, then every image (``verify_images``), once per node before training."""
        train, val = self.scan()
        if self.verify_images == "none" or self._verified:
            return
        paths = [train.path(i) for i in range(len(train.paths))] + [val.path(i) for i in range(len(val.paths))]
        log.info("checking %d images (data.verify_images=%s; `none` skips this)", len(paths), self.verify_images)
        verify_images(paths, self.verify_images, threads=max(4, self.num_workers))
        self._verified = True  # fit, then test: once

    def train_dataloader(self):  # noqa: ANN201
        self._require(self.train_dataset).seed = self.data_seed  # the workers copy it
        return super().train_dataloader()

    def collate_fn(self) -> Callable | None:
        return collate_encoded if self.decode == "device" else default_collate

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.decode == "device":  # the encoded bytes stay on the host: nvJPEG reads host memory
            encoded, labels, indices, paths = batch  # (host indices kept: crop parameters need no sync)
            return encoded, labels.to(device), indices.to(device), paths, indices
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        if self.decode == "device":
            encoded, labels, indices, paths, host_indices = batch
            images = decode_on_device(encoded, paths, labels.device)
            if self.augment and self.in_training:
                images = self._train_crops(images, host_indices)
            else:
                images = [center_crop_eval(image, self.resize_size, self.image_size) for image in images]
            batch = torch.stack(images), labels, indices
        images, labels, indices = batch
        return normalize(images, self.mean, self.std), labels, indices

    # -- internals ---------------------------------------------------------------------------
    def scan(self) -> tuple[FolderIndex, FolderIndex]:
        """The train and val file lists after the class selection; every folder check (cached)."""
        if self._index is None:
            root = resolve_root(self.root)
            train_dir, val_dir = split_dirs(root)
            train_classes, val_classes = find_classes(train_dir), find_classes(val_dir)
            if not train_classes:
                raise DatasetIntegrityError(f"{train_dir} has no class folders (expected train/<class>/*.JPEG).")
            if train_classes != val_classes:
                only_train = sorted(set(train_classes) - set(val_classes))
                only_val = sorted(set(val_classes) - set(train_classes))
                raise DatasetIntegrityError(
                    f"train/ and val/ under {root} have different class folders: "
                    f"only in train/: {listing(only_train) or 'none'}; only in val/: {listing(only_val) or 'none'}. "
                    f"Both need the same classes (the labels are the sorted folder names).")
            classes = select_classes(train_classes, self.classes_option, train_dir)
            if self._num_classes is not None and self._num_classes != len(classes):
                raise ConfigError(f"data.num_classes={self._num_classes} but {train_dir} gives {len(classes)} "
                                  f"classes{' with data.classes' if self.classes_option is not None else ''}; "
                                  f"set data.num_classes={len(classes)} (or null to count them).")
            self.classes = classes
            self._index = index_split(train_dir, classes), index_split(val_dir, classes)
        return self._index

    def _load(self) -> None:
        train, val = self.scan()
        self._num_classes = len(self.classes)
        test = ImageFolderFiles(val, "encoded" if self.decode == "device" else "eval", self.image_size,
                                self.resize_size)
        eval_mode = test.mode
        if self.val_split:
            rest, held = stratified_split(train.labels, holdout_size(self.val_split, len(train.labels)),
                                          self.split_seed)
            self.val_dataset = ImageFolderFiles(train.subset(held), eval_mode, self.image_size, self.resize_size)
            train = train.subset(rest)
        else:
            self.val_dataset = test
        if self.train_fraction < 1:
            train = train.subset(per_class_subset(train.labels, self.train_fraction, self.split_seed))
        train_mode = "encoded" if self.decode == "device" else ("train" if self.augment else "eval")
        self.train_dataset = ImageFolderFiles(train, train_mode, self.image_size, self.resize_size, self.data_seed)
        self.test_dataset = test

    def _train_crops(self, images: list[Tensor], host_indices: Tensor) -> list[Tensor]:
        # The boxes from the host copy of the indices: no device-to-host sync.
        seed, epoch = self.data_seed, int(getattr(self.trainer, "current_epoch", 0) or 0)
        boxes = [random_resized_crop_box(sample_key(seed, epoch, index), image.shape[1], image.shape[2])
                 for image, index in zip(images, host_indices.tolist())]
        return [resized_crop_flip(image, *box, self.image_size) for image, box in zip(images, boxes)]
