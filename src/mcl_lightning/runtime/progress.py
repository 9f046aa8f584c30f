"""A TQDM progress bar that shows the latest value of every loss term (``ce=2.31 contrastive=0.41``).

The terms come from ``training_step``'s ``outputs["terms"]`` (device tensors, detached). They are read
on the host only when the bar refreshes (``refresh_rate`` steps), not in the step itself.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class LossTermsProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._terms: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if isinstance(outputs, dict) and isinstance(outputs.get("terms"), dict):
            self._terms = outputs["terms"]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for name, value in self._terms.items():
            items[name] = f"{float(value):.3g}"
        return items
