"""A TQDM progress bar that shows the latest value of every loss term (``ce=2.31 contrastive=0.41``).

The terms come from ``training_step``'s ``outputs["terms"]`` (device tensors, detached). They are read
on the host only at logging steps (every ``trainer.log_every_n_steps``-th batch of an epoch) and at the
last batch of an epoch, never in the steps between: a read waits for the device
(tests/test_host_sync.py). The bar's count and speed still move every ``refresh_rate`` batches.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from mcl_lightning.runtime.guards import is_logging_step


class LossTermsProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._shown: dict[str, str] = {}  # the terms as last read, formatted

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        terms = outputs.get("terms") if isinstance(outputs, dict) else None
        if isinstance(terms, dict) and (is_logging_step(trainer, batch_idx) or batch_idx + 1 == self.total_train_batches):
            self._shown = {name: f"{float(value):.3g}" for name, value in terms.items()}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(self._shown)
        return items
