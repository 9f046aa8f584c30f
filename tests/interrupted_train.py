"""The training CLI (``mcl_lightning.train``) that interrupts itself once at a chosen point, for the
soak test (test_long_runs.py): ``INTERRUPT=<point>:<epoch>:<n>:<signal>`` with point one of

- ``batch``: after training batch ``n`` of ``epoch`` (its step checkpoint, if any, written)
- ``validation``: in validation batch ``n`` of ``epoch``
- ``write``: while writing the ``n``-th checkpoint of ``epoch`` (half of it on disk)
- ``epoch_end``: right after ``epoch``'s end-of-epoch checkpoint, before its training row is logged

and signal ``KILL`` or ``TERM`` (sent to this process). ``ORDER_LOG=<file>``: each training step appends
``<global step> <dataset indices>`` to the file (the data order). Without either it is the plain CLI:
the maths is the CLI's own, so a run interrupted here can be compared with an uninterrupted one.
"""

from __future__ import annotations

import io
import os
import signal
from typing import Any

import torch

from mcl_lightning import system, train
from mcl_lightning.runtime import checkpointing


def _signal(name: str) -> None:
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def install(point: str, epoch: int, n: int, sig: str) -> None:
    """Patch the one hook where the interruption happens."""
    if point == "batch":
        original = checkpointing.LastCheckpoint.on_train_batch_end

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            original(self, trainer, pl_module, outputs, batch, batch_idx)
            if trainer.current_epoch == epoch and batch_idx == n:
                _signal(sig)
        checkpointing.LastCheckpoint.on_train_batch_end = on_train_batch_end
    elif point == "validation":
        original_step = system.OKDSystem.validation_step

        def validation_step(self, batch, batch_idx):
            if self.current_epoch == epoch and batch_idx == n and not self.trainer.sanity_checking:
                _signal(sig)
            return original_step(self, batch, batch_idx)
        system.OKDSystem.validation_step = validation_step
    elif point == "write":
        original_save, writes = torch.save, {"count": 0}

        def half_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(obj, dict) and obj.get("epoch") == epoch and hasattr(handle, "fileno"):
                writes["count"] += 1
                if writes["count"] == n:
                    buffer = io.BytesIO()
                    original_save(obj, buffer, *args, **kwargs)
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    _signal(sig)
            original_save(obj, handle, *args, **kwargs)
        torch.save = half_save  # atomic_save calls torch.save(obj, handle)
    elif point == "epoch_end":
        original_end = checkpointing.LastCheckpoint.on_train_epoch_end

        def on_train_epoch_end(self, trainer, pl_module):
            original_end(self, trainer, pl_module)
            if trainer.current_epoch == epoch:
                _signal(sig)
        checkpointing.LastCheckpoint.on_train_epoch_end = on_train_epoch_end
    else:
        raise SystemExit(f"unknown INTERRUPT point {point!r}")


def record_order(path: str) -> None:
    original_step = system.OKDSystem.training_step

    def training_step(self, batch, batch_idx):
        with open(path, "a") as handle:
            handle.write(f"{self.global_step} {' '.join(map(str, batch[2].tolist()))}\n")
        return original_step(self, batch, batch_idx)
    system.OKDSystem.training_step = training_step


if __name__ == "__main__":
    if os.environ.get("ORDER_LOG"):
        record_order(os.environ["ORDER_LOG"])
    if os.environ.get("INTERRUPT"):
        where, at_epoch, at_n, name = os.environ["INTERRUPT"].split(":")
        install(where, int(at_epoch), int(at_n), name)
    train.main()
