"""Clocks, the Trainer's step timer and peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """CPU: the resident set's high-water mark above its level at ``start`` (freed heap memory is
    returned first, and the mark reset through /proc/self/clear_refs). GPU: max allocated above
    the allocation at ``start``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss_delta"

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            self.kind = "cpu_max_rss_delta (high-water mark not resettable: an upper bound is not known)"
        self.base = _proc_status("VmRSS") or 0

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = _proc_status("VmHWM")
        return None if peak is None else max(peak - self.base, 0)


class Clock:
    """Marks the end of every timed step (wall and process CPU time). On CPU a run's figure is the
    median step times the step count: a burst of other load on a shared machine spoils a step or
    two, not the run. On CUDA it is the whole span (timing single steps would need a
    synchronisation per step, which stalls the GPU's pipeline)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def mark(self) -> None:
        self.walls.append(time.perf_counter())
        self.cpus.append(time.process_time())

    def seconds(self) -> tuple[float, float]:
        steps = len(self.walls) - 1
        if steps < 1:
            return float("nan"), float("nan")
        if self.device.type == "cuda":
            return self.walls[-1] - self.walls[0], self.cpus[-1] - self.cpus[0]
        per_step = lambda marks: statistics.median(b - a for a, b in zip(marks, marks[1:]))  # noqa: E731
        return per_step(self.walls) * steps, per_step(self.cpus) * steps


class StepTimer(L.Callback):
    """Times optimizer steps ``warmup`` .. ``total - 1`` of a Trainer run (each from the end of the
    previous one: its batch's loading and augmentation included), and their peak memory; on CUDA it
    also counts the synchronising calls made inside them (``torch.cuda.set_sync_debug_mode``)."""

    def __init__(self, warmup: int, total: int, device: torch.device, profiler: Any = None) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.profiler = profiler  # a torch.profiler.profile, run over the timed steps
        self.clock = Clock(device)
        self.peak: int | None = None
        self.memory = PeakMemory(device)
        self.host_syncs: int | None = None
        self._catch: Any = None
        self._caught: list[warnings.WarningMessage] = []
        self.began: float | None = None
        self.warmup_s: float | None = None

    def on_train_batch_start(self, *_: Any) -> None:
        if self.began is None:
            self.began = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        step = trainer.global_step  # optimizer steps done, this one included
        if step == self.warmup:
            self.memory.start()
            sync(self.device)
            self.warmup_s = time.perf_counter() - (self.began or time.perf_counter())  # compilation included
            if self.device.type == "cuda":
                self._catch = warnings.catch_warnings(record=True)
                self._caught = self._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            if self.profiler is not None:
                self.profiler.start()
            self.clock.mark()
        elif self.warmup < step < self.total:
            self.clock.mark()
        elif step == self.total:
            if self._catch is not None:
                torch.cuda.set_sync_debug_mode("default")
            sync(self.device)
            self.clock.mark()
            if self.profiler is not None:
                self.profiler.stop()
            self.peak = self.memory.stop()
            if self._catch is not None:
                self._catch.__exit__(None, None, None)
                self.host_syncs = sum("synchroniz" in str(w.message) for w in self._caught)
                self._catch = None



@dataclass
class Run:
    wall: float  # seconds of the timed steps (CPU: median step x steps)
    cpu: float  # process CPU seconds over them (all threads; CPU: median step x steps)
    peak: int | None  # peak memory, bytes
    warmup_s: float | None = None  # the untimed warm-up steps (compilation included), from the first step

