"""Stop on a non-finite loss before that state reaches a checkpoint.

``OKDSystem.training_step`` returns its loss terms (``outputs["terms"]``, detached device tensors).
The guard keeps them, untouched, and checks them all at once (one host read) at every logging step,
i.e. every ``trainer.log_every_n_steps``-th batch of an epoch, and before anything else: every
checkpoint, and the end of each epoch and of training. So a training step never waits for the device
on its account, on any accelerator (tests/test_host_sync.py).

The trade-off: a loss that turns non-finite at step k is found at the next logging step, up to
``log_every_n_steps - 1`` steps later (those steps are wasted work), but it is still reported as step
k's, with its term, epoch and batch, and a non-finite state is never saved.
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
class _Step:
    step: int
    epoch: int
    batch: int
    terms: dict[str, Tensor]


def is_logging_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether batch ``batch_idx`` of an epoch ends at a logging step (every ``trainer.log_every_n_steps``-th),
    where per-step values may be read on the host (the guard, the progress bar)."""
    return (batch_idx + 1) % max(int(trainer.log_every_n_steps or 1), 1) == 0


class NonFiniteLossGuard(L.Callback):
    """Raises ``NonFiniteLossError`` naming the first non-finite loss term, its step, epoch and batch."""

    def __init__(self) -> None:
        self._pending: list[_Step] = []
        self.failure: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "loss" not in outputs:
            return
        terms = outputs.get("terms") or {"loss": outputs["loss"]}
        # kept as they are (no op per step); detached if they are not yet, so no graph is kept alive
        terms = {name: v.detach() if isinstance(v, Tensor) and v.requires_grad else v for name, v in terms.items()}
        self._pending.append(_Step(trainer.global_step, trainer.current_epoch, batch_idx, terms))
        if is_logging_step(trainer, batch_idx):
            self.flush()

    def flush(self) -> None:
        """Check what is pending now (waits for the device)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        values = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for s in pending for v in s.terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        for entry in pending:  # the rare path: find the first bad step on the host
            self._check(entry)

    def _check(self, entry: _Step) -> None:
        values = [float(v) for v in entry.terms.values()]
        bad = [(name, value) for name, value in zip(entry.terms, values) if not math.isfinite(value)]
        if not bad:
            return
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
