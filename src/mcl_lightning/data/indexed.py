"""The batch contract seen from the system: ``(images, labels)`` or ``(images, labels, dataset indices)``.

Methods with memory banks (MCL-OKD, mutual CL with ``contrast=bank``) keep one row per training image and
so need each sample's index in the training set; every other method trains on plain ``(images, labels)``
batches. The library's DataModules always yield the index; ``WithIndex`` adds it to any map-style dataset.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mcl_lightning.core.errors import ConfigError

__all__ = ["WithIndex", "batch_images", "split_batch"]


class WithIndex(Dataset):
    """``dataset[i] = (image, label)`` served as ``(image, label, i)``: the index memory banks need.

        train_set = WithIndex(torchvision.datasets.CIFAR100(root, train=True, transform=...))
        self.train_labels = train_set.labels   # in your DataModule's setup("fit"): the banks' class labels
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        sample = self.dataset[index]
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise TypeError(f"WithIndex needs a dataset of (image, label) samples; {type(self.dataset).__name__}"
                            f"[{index}] is {_describe(sample)}")
        return sample[0], sample[1], index

    @property
    def labels(self) -> Tensor:
        """Every label, int64, in index order (``targets``/``labels`` if the dataset has them, else read)."""
        known = getattr(self.dataset, "targets", None)
        if known is None:
            known = getattr(self.dataset, "labels", None)
        if known is None:
            known = [self.dataset[i][1] for i in range(len(self))]
        return torch.as_tensor(known, dtype=torch.long)


def split_batch(batch: Any, needs_indices: bool, who: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(images, labels, indices)``; ``indices`` is None for a 2-tuple batch, which ``who`` (a method
    that ``needs_indices``) refuses in one line naming the fix."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[0], batch[1], batch[2]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        if needs_indices:
            raise ConfigError(
                f"{who} needs each training sample's dataset index (its memory banks hold one row per training "
                "image), but the batches are (images, labels); wrap the training dataset as "
                "mcl_lightning.data.WithIndex(dataset) so that batches are (images, labels, indices)")
        return batch[0], batch[1], None
    raise ValueError(f"a batch must be (images, labels) or (images, labels, dataset indices); got {_describe(batch)}")


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def batch_images(batch: Any) -> Tensor:
    """The images of a batch for prediction: a tensor alone, or the first item of a tuple/list."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch
