"""Data: the DataModule contract (base.py), CIFAR-10/100 (cifar.py), ImageNet folders (imagenet.py), and
``WithIndex`` (indexed.py), which adds the dataset index memory-bank methods need to any dataset."""

from mcl_lightning.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    random_crop_flip,
    random_resized_crop_box,
    sample_key,
    sample_keys,
)
from mcl_lightning.data.base import InMemoryDataset, OKDData, OKDDataModule, already_batched, stratified_split
from mcl_lightning.data.cifar import CIFARDataModule
from mcl_lightning.data.imagenet import ImageNetDataModule
from mcl_lightning.data.indexed import WithIndex
from mcl_lightning.data.sampling import EvalShardSampler, GlobalOrderSampler
from mcl_lightning.data.resident import DeviceResidentLoader

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFARDataModule",
    "DeviceResidentLoader",
    "EvalShardSampler",
    "GlobalOrderSampler",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetDataModule",
    "InMemoryDataset",
    "OKDData",
    "OKDDataModule",
    "already_batched",
    "normalize",
    "random_crop_flip",
    "random_resized_crop_box",
    "sample_key",
    "sample_keys",
    "stratified_split",
    "WithIndex",
]
