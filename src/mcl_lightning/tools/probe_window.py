"""A concurrency probe's timing window: every job of a level timed over the same stretch of time.

The study's probe (``mcl_lightning.reproduce``) starts c training jobs at once to measure how fast they
train while sharing the device. Started as separate processes, they reach their first step seconds
apart, and a fast recipe would finish its steps before a slow one began: the figures would mostly be
of jobs running alone. With ``+callbacks.probe_window={_target_: ...ProbeWindow, dir: <folder>, jobs: <c>, steps: <n>}``
each job, after ``warmup`` steps, waits for all c jobs to get there (a file each in ``dir``), times its
next ``steps`` steps, then keeps training untimed until every job has timed its steps, and stops. So
each job's figure is measured while all c jobs run. results.json's ``probe_window`` holds it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

BARRIER_TIMEOUT_S = 180.0  # a job that never arrives (it failed): time the others anyway, marked


class ProbeWindow(L.Callback):
    results_key = "probe_window"  # results.json's entry (runtime/results.py)

    def __init__(self, dir: str, jobs: int, steps: int = 150, warmup: int = 5) -> None:  # noqa: A002 (config key)
        self.dir, self.jobs, self.steps, self.warmup = Path(dir), int(jobs), int(steps), int(warmup)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.me = f"{os.getpid()}-{time.time_ns()}"
        self.batches = 0
        self.images = 0
        self.first_batch: float | None = None
        self.start: float | None = None
        self.seconds: float | None = None
        self.waited_s = 0.0
        self.overlapped = True
        self.train_s: float | None = None
        self.peak_memory_bytes: int | None = None

    def _count(self, kind: str) -> int:
        return sum(1 for name in os.listdir(self.dir) if name.startswith(kind + "-"))

    def _arrive(self, kind: str) -> None:
        (self.dir / f"{kind}-{self.me}").touch()

    @staticmethod
    def _now(module: L.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        if self.first_batch is None:
            self.first_batch = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches += 1
        if self.batches == self.warmup:  # wait for the level's other jobs, then open the window
            self._arrive("ready")
            began = time.monotonic()
            while self._count("ready") < self.jobs:
                if time.monotonic() - began > BARRIER_TIMEOUT_S:
                    self.overlapped = False
                    break
                time.sleep(0.02)
            self.waited_s = time.monotonic() - began
            self.start = self._now(module)
        elif self.start is not None and self.seconds is None:
            self.images += len(batch[0]) * trainer.world_size
            if self.batches == self.warmup + self.steps:
                self.seconds = self._now(module) - self.start
                self._arrive("done")
        if self.seconds is not None and self._count("done") >= self.jobs:
            trainer.should_stop = True
        elif self.seconds is not None and not self.overlapped:
            trainer.should_stop = True  # a job is missing: nothing to keep company

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.train_s = time.perf_counter() - (self.first_batch or time.perf_counter())
        if module.device.type == "cuda":
            self.peak_memory_bytes = torch.cuda.max_memory_reserved(module.device)

    def summary(self, trainer: Any = None, datamodule: Any = None) -> dict[str, Any]:
        """This job's images/s over its window (None when it did not finish the window)."""
        return {"images_per_s": round(self.images / self.seconds, 1) if self.seconds else None,
                "timed_steps": self.steps if self.seconds else self.batches - self.warmup,
                "timed_seconds": None if self.seconds is None else round(self.seconds, 3),
                "jobs": self.jobs, "overlapped": self.overlapped, "waited_s": round(self.waited_s, 2),
                "train_s": None if self.train_s is None else round(self.train_s, 2),
                "peak_memory_bytes": self.peak_memory_bytes}
