"""Stop on a non-finite loss before that state reaches a checkpoint.

``OKDSystem.training_step`` returns its loss terms (``outputs["terms"]``). On the CPU every step is
checked as it ends. On an accelerator the check of step k runs at the end of step k + 1, when the
device has (almost always) finished it, so the step never waits for the device; and every
checkpoint first checks whatever is pending, so a non-finite state is never saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from mcl_lightning.core.errors import NonFiniteLossError


@dataclass
class _Pending:
    step: int
    epoch: int
    batch: int
    names: list[str]
    values: Tensor


class NonFiniteLossGuard(L.Callback):
    """Raises ``NonFiniteLossError`` naming the first non-finite loss term, its step, epoch and batch."""

    def __init__(self) -> None:
        self._pending: _Pending | None = None
        self.failure: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "loss" not in outputs:
            return
        terms = outputs.get("terms") or {"loss": outputs["loss"]}
        values = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in terms.values()])
        entry = _Pending(trainer.global_step, trainer.current_epoch, batch_idx, list(terms), values)
        previous, self._pending = self._pending, entry
        if previous is not None:
            self._check(previous)
        if values.device.type == "cpu":
            self.flush()

    def flush(self) -> None:
        """Check what is pending now (waits for the device)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._check(pending)

    def _check(self, entry: _Pending) -> None:
        finite = torch.isfinite(entry.values)
        if bool(finite.all()):
            return
        values = entry.values.cpu().tolist()
        bad = [(name, value) for name, value, ok in zip(entry.names, values, finite.tolist()) if not ok]
        name, value = bad[0]
        kind = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        self.failure = {"error": "non_finite_loss", "term": name, "value": kind, "step": entry.step,
                        "epoch": entry.epoch, "batch": entry.batch, "terms": [n for n, _ in bad]}
        raise NonFiniteLossError(
            f"loss term {name!r} became {kind} at optimizer step {entry.step} (epoch {entry.epoch}, batch "
            f"{entry.batch}); training stopped without saving that state. Lower optim.lr or the term's weight, "
            "check the data, or resume from the last good checkpoint with ckpt_path=last"
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.flush()  # runs while the checkpoint is assembled, before anything is written

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()
