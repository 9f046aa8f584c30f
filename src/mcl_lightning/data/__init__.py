"""Data: CIFAR-10/100 datamodule and batched on-device augmentation."""

from mcl_lightning.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    normalize,
    random_crop_flip,
)
from mcl_lightning.data.cifar import CIFARDataModule, InMemoryDataset, stratified_split
from mcl_lightning.data.resident import DeviceResidentLoader

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFARDataModule",
    "DeviceResidentLoader",
    "InMemoryDataset",
    "normalize",
    "random_crop_flip",
    "stratified_split",
]
