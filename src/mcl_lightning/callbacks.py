"""The library's Lightning callbacks: what ``python -m mcl_lightning.train`` adds to its Trainer
(``conf/callbacks/default.yaml``), for any Lightning project's own Trainer.

    from mcl_lightning.callbacks import (AtomicCheckpointIO, BestCheckpoint, LastCheckpoint, LossTermsProgressBar,
                                         NonFiniteLossGuard, TrainThroughput)
    trainer = L.Trainer(callbacks=[NonFiniteLossGuard(), BestCheckpoint(dirpath="ckpt", monitor=MONITOR, mode="max"),
                                   LastCheckpoint("ckpt", every_n_steps=500), TrainThroughput(), LossTermsProgressBar()],
                        plugins=[AtomicCheckpointIO()])

- ``NonFiniteLossGuard``: stops the run with ``NonFiniteLossError`` (naming the step, epoch, batch and
  loss term) when a loss term is NaN or infinite, before that state reaches a checkpoint. It reads the
  terms on the host only at logging steps. List it before the checkpoint callbacks.
- ``LastCheckpoint(dirpath, every_n_steps=0)``: ``<dirpath>/last.ckpt`` at each epoch end, every
  ``every_n_steps`` optimizer steps and on SIGTERM (the step finishes, the checkpoint is written, the
  run stops): relaunching with ``ckpt_path=<dirpath>/last.ckpt`` continues it. List it after
  ``BestCheckpoint`` so that its state includes the best score.
- ``AtomicCheckpointIO`` (a Trainer plugin, not a callback): every checkpoint is written to a temporary
  file and renamed, so a process killed while writing leaves the previous checkpoint whole.
- ``BestCheckpoint``: Lightning's ``ModelCheckpoint`` that, in a run stopped before its first
  validation, says once that there is no best checkpoint yet instead of warning each step.
- ``TrainThroughput(warmup_steps=...)``: training images/s over the fit, validation excluded, with two
  device synchronisations per epoch; ``summary(trainer, datamodule)`` returns it.
- ``LossTermsProgressBar``: Lightning's TQDM bar with every loss term (``ce=2.31 contrastive=0.41``),
  read at logging steps only.
- ``RankBatchNormStats``: DDP without ``sync_batchnorm``: each rank's BatchNorm running statistics go
  into the checkpoint and come back to that rank on resume.
- ``RunHistory``: the logged rows, tracker run ids and a mid-epoch checkpoint's running means in
  every checkpoint, so that a resumed run's logs equal an uninterrupted run's (with the CLI's loggers).

``MONITOR`` is the metric the CLI's best checkpoint selects on (the best peer's validation top-1).
"""

from __future__ import annotations

from mcl_lightning.core.errors import NonFiniteLossError
from mcl_lightning.runtime.checkpointing import AtomicCheckpointIO, BestCheckpoint, LastCheckpoint, Preempted
from mcl_lightning.runtime.guards import NonFiniteLossGuard
from mcl_lightning.runtime.history import RunHistory
from mcl_lightning.runtime.progress import LossTermsProgressBar
from mcl_lightning.runtime.rank_stats import RankBatchNormStats
from mcl_lightning.runtime.throughput import TrainThroughput
from mcl_lightning.system import MONITOR

__all__ = [
    "MONITOR",
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "LastCheckpoint",
    "LossTermsProgressBar",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "Preempted",
    "RankBatchNormStats",
    "RunHistory",
    "TrainThroughput",
]
