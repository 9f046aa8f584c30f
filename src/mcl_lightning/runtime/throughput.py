"""Training images/s of a run, as results.json's ``throughput`` (the study planner reads it).

Timed: from the end of the ``warmup_steps``-th training batch (compilation, cuDNN autotuning and
allocator warm-up behind it) to the start of each validation pass or the end of each training epoch,
data loading included, validation excluded. The device is synchronised only at those span ends (two
per epoch), so timing does not stall an asynchronous GPU step.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class TrainThroughput(L.Callback):
    """Global training images/s over the timed spans of this process's fit (see module docstring)."""

    results_key = "throughput"  # results.json's entry (runtime/results.py)

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.batches_seen = 0
        self.images = 0
        self.seconds = 0.0
        self._open: tuple[float, int] | None = None  # (start time, images counted since)

    @staticmethod
    def _now(module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches_seen += 1
        if self._open is not None:
            start, images = self._open
            self._open = (start, images + len(batch[0]) * trainer.world_size)
        elif self.batches_seen >= self.warmup_steps:
            self._open = (self._now(module), 0)

    def _close(self, module: L.LightningModule) -> None:
        if self._open is not None:
            start, images = self._open
            self.seconds += self._now(module) - start
            self.images += images
            self._open = None

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._close(module)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._close(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._close(module)  # a run stopped by max_steps in the middle of an epoch

    def summary(self, trainer: L.Trainer, datamodule: Any) -> dict[str, Any]:
        """Images/s (None when no span was timed) and what an epoch of this run holds."""
        def size(name: str, loaders: Any) -> int | None:
            """The library's DataModules name their sets; any other: the first loader's dataset, if sized."""
            dataset = getattr(datamodule, name, None)
            if dataset is None:
                loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
                dataset = getattr(loader, "dataset", None)
            try:
                return len(dataset) if dataset is not None else None
            except TypeError:  # an iterable dataset
                return None

        batches = trainer.num_training_batches
        return {
            "train_images_per_s": round(self.images / self.seconds, 1) if self.seconds > 0 and self.images else None,
            "timed_images": self.images,
            "timed_seconds": round(self.seconds, 3),
            "warmup_steps": self.warmup_steps,
            "train_batches_per_epoch": batches if isinstance(batches, int) else None,
            "train_dataset_size": size("train_dataset", trainer.train_dataloader),
            "val_dataset_size": size("val_dataset", trainer.val_dataloaders),
        }
