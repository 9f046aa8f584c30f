"""Training throughput of the KD machinery against its floor: ``python -m mcl_lightning.bench``.

In one process, on one device, with the same peer network for every row:

1. **floor**: a plain PyTorch loop over the peers with cross-entropy only (sum over peers), SGD
   step included, batches from the same CIFAR loader with the same on-device augmentation: the
   cheapest step these peers can take;
2. **every method through the LightningModule** (``OKDSystem`` + ``lightning.Trainer``):
   ``independent``, ``mcl_okd`` at K = 256 and K = 16384, and every other registered method;
3. **a plain loop of one method** (``mcl_okd`` K = 256 by default): Lightning against a
   hand-written loop of the same maths (1.0 = parity);
4. **the data path alone**: CIFAR training batches with augmentation, then with MCL-OKD's
   class-aware negative sampling, in images/s;
5. **peak memory** of a training step (CPU: max RSS delta; GPU: max allocated), and of the
   contrastive term alone at the reference's K = 16384 against the reference's gathered tensors.

Rows run interleaved (floor, rows..., then again) ``--repeats`` times, and the floor once more at
the end. A run's time is its median step time x its steps on CPU (a burst of other load spoils a
step, not the run), its whole span on CUDA; each figure is the median over repeats, and each ratio the median of the per-repeat
ratios to the floor interpolated between the floor runs before and after the row (by its position
in the repeat), so a shared machine that gets busier or quieter during a run does not favour the
rows that ran late. Ratios are given in wall time (``x floor``: throughput) and in process CPU
time (``(cpu t)``: the work a step costs, which other processes on a shared machine disturb much
less). ``--json`` writes every figure and the settings.

    python -m mcl_lightning.bench                       # make bench: CPU, the issue's settings
    python -m mcl_lightning.bench --preset gpu          # make bench-gpu: the whole GPU table
    python -m mcl_lightning.bench --preset tiny         # seconds: resnet20 x2, for tests

On CPU the OpenMP runtime's default busy-waiting makes 2-thread runs 5-20x slower on a loaded
machine; unless ``--omp-wait-policy inherit``, the benchmark restarts itself with
``OMP_WAIT_POLICY=PASSIVE`` (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch import Tensor

from mcl_lightning.contrast import NegativeSampler
from mcl_lightning.data import CIFARDataModule, DeviceResidentLoader, normalize, random_crop_flip
from mcl_lightning.core.errors import ConfigError, UserError
from mcl_lightning.evaluate import parse_overrides
from mcl_lightning.methods import OKDMethod, get_method, list_methods
from mcl_lightning.methods.losses import cross_entropy_per_peer
from mcl_lightning.models import PeerLayout, PeerNetwork, PeerSpec
from mcl_lightning.runtime.perf import PerfOptions, apply_perf, compile_module
from mcl_lightning.system import OKDSystem
from mcl_lightning.runtime.validation import check_data_root

SEED = 0
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)  # OKDSystem's defaults
DEFAULT_ROWS = ("independent", "mcl_okd@256", "mcl_okd@16384", "*")  # "*": every other registered method
REFERENCE_DIM = 128  # the reference's projection width, for its gathered-tensor size
TABLE_RESERVE_S = 60.0  # a further table starts only with this much of --max-seconds left


# -- settings ---------------------------------------------------------------------------------
@dataclass
class Settings:
    """One table: one network, one precision, one set of speed switches."""

    name: str = "cpu"
    device: str = "cpu"
    backbone: str = "resnet32"
    peers: int = 4
    topology: str = "shared_trunk"
    batch_size: int = 64
    rows: tuple[str, ...] = DEFAULT_ROWS
    plain: tuple[str, ...] = ("mcl_okd@256",)  # also run as a hand-written loop (Lightning vs plain)
    steps: int = 5
    warmup: int = 1
    repeats: int = 4
    precision: str = "32"  # 32 | bf16 (autocast; the contrastive term stays float32)
    compile: bool | str = False
    compile_backend: str = "inductor"
    compile_method: bool = False  # also torch.compile each method's forward
    channels_last: bool = False
    fuse_peers: bool = False
    device_resident: bool = False
    drop_last: bool = False
    data_batches: int = 60  # batches per data-path measurement (a quarter of that at K >= 4096)
    data_k: tuple[int, ...] = (256, 16384)
    memory_k: int = 16384  # the contrastive-memory check (0 = skip)
    targets: str = "cpu"  # which targets apply: cpu | gpu | none

    def perf(self) -> PerfOptions:
        return PerfOptions(fuse_peers=self.fuse_peers, channels_last=self.channels_last, compile=self.compile,
                           compile_backend=self.compile_backend, compile_method=self.compile_method)


def preset(name: str, device: str) -> list[Settings]:
    """The tables a preset runs. ``cpu``: the issue's CPU settings. ``gpu``: the paper's batch with
    the fast switches, batch 256, fused against looped independent peers, and the eager baseline.
    ``tiny``: resnet20 x2 at batch 8, a few steps (seconds; the test suite runs it)."""
    if name == "cpu":
        return [Settings(device=device)]
    if name == "tiny":
        return [Settings(name="tiny", device=device, backbone="resnet20", peers=2, batch_size=8,
                         rows=("independent", "mcl_okd@64"), plain=("mcl_okd@64",), steps=2, warmup=1, repeats=1,
                         data_batches=4, data_k=(64,), memory_k=512, targets="none")]
    if name == "gpu_headline":  # make gpu-evidence: the targets' rows only, in about 2.5 minutes
        fast = dict(device=device, precision="bf16", compile="reduce-overhead", channels_last=True,
                    device_resident=True, drop_last=True, steps=100, warmup=20, repeats=1, memory_k=0, plain=())
        # fused vs loop eager (bf16): two compilations fewer, and eager is where fusing the peers matters
        eager = {**fast, "compile": False, "topology": "independent", "batch_size": 256, "rows": ("independent",),
                 "data_k": (), "targets": "none"}
        return [
            Settings(name="gpu_paper_batch64", rows=("mcl_okd@256",), data_k=(256,), targets="gpu", **fast),
            Settings(name="gpu_batch256", batch_size=256, rows=("mcl_okd@256",), data_k=(), targets="gpu", **fast),
            Settings(name="gpu_independent_loop_b256", **eager),
            Settings(name="gpu_independent_fused_b256", fuse_peers=True, **eager),
        ]
    if name == "gpu":
        fast = dict(device=device, precision="bf16", compile="reduce-overhead", channels_last=True,
                    device_resident=True, drop_last=True, steps=200, warmup=30, repeats=3, data_batches=400)
        # in order of priority: the time budget skips the last tables first
        return [
            Settings(name="gpu_paper_batch64", targets="gpu", **fast),
            Settings(name="gpu_batch256", batch_size=256, rows=("independent", "mcl_okd@256"), plain=(),
                     memory_k=0, data_k=(256,), targets="gpu", **fast),
            Settings(name="gpu_independent_loop_b256", topology="independent", batch_size=256, rows=("independent",),
                     plain=(), memory_k=0, data_k=(), targets="none", **{**fast, "repeats": 2}),
            Settings(name="gpu_independent_fused_b256", topology="independent", batch_size=256, rows=("independent",),
                     plain=(), memory_k=0, data_k=(), fuse_peers=True, targets="none", **{**fast, "repeats": 2}),
            Settings(name="gpu_eager_fp32_b64", device=device, rows=("independent", "mcl_okd@256"), plain=(),
                     memory_k=0, data_k=(256,), steps=100, warmup=10, repeats=2, targets="none"),
            Settings(name="gpu_shared_fused_b64", rows=("mcl_okd@256",), plain=(), memory_k=0, data_k=(),
                     fuse_peers=True, targets="none", **{**fast, "repeats": 2}),
            Settings(name="gpu_compiled_method_b64", rows=("mcl_okd@256",), plain=(), memory_k=0, data_k=(),
                     compile_method=True, targets="none", **{**fast, "repeats": 2}),
        ]
    raise ConfigError(f"unknown preset {name!r}: cpu, gpu, gpu_headline or tiny")


@dataclass
class RowSpec:
    label: str
    method: str | None  # None: the floor
    options: dict[str, Any] = field(default_factory=dict)
    plain: bool = False  # a hand-written loop (else: through OKDSystem + Trainer)


def parse_row(text: str) -> tuple[str, dict[str, Any]]:
    """``name``, ``name@K`` (nce_k=K) or ``name:key=value,key=value``."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    if "@" in name:
        name, k = name.split("@", 1)
        options["nce_k"] = int(k)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "0123456789-[{tfn\"" else value
    get_method(name)  # a clear error for an unknown method
    return name, options


def row_specs(settings: Settings) -> list[RowSpec]:
    explicit = [r for r in settings.rows if r != "*"]
    names = [parse_row(r)[0] for r in explicit]
    if "*" in settings.rows:
        explicit += [m for m in list_methods() if m not in names]
    rows = [RowSpec("floor (plain CE loop)", None, plain=True)]
    for text in explicit:
        name, options = parse_row(text)
        rows.append(RowSpec(_label(name, options), name, options))
    for text in settings.plain:
        name, options = parse_row(text)
        rows.append(RowSpec(_label(name, options) + " (plain loop)", name, options, plain=True))
    return rows


def _label(name: str, options: dict[str, Any]) -> str:
    extra = [f"K={v}" if k == "nce_k" else f"{k}={v}" for k, v in options.items()]
    return " ".join([name, *extra])


# -- measurement helpers ----------------------------------------------------------------------
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

    def __init__(self, warmup: int, total: int, device: torch.device) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.clock = Clock(device)
        self.peak: int | None = None
        self.memory = PeakMemory(device)
        self.host_syncs: int | None = None
        self._catch: Any = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        step = trainer.global_step  # optimizer steps done, this one included
        if step == self.warmup:
            self.memory.start()
            sync(self.device)
            if self.device.type == "cuda":
                self._catch = warnings.catch_warnings(record=True)
                self._caught = self._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.clock.mark()
        elif self.warmup < step < self.total:
            self.clock.mark()
        elif step == self.total:
            if self._catch is not None:
                torch.cuda.set_sync_debug_mode("default")
            sync(self.device)
            self.clock.mark()
            self.peak = self.memory.stop()
            if self._catch is not None:
                self._catch.__exit__(None, None, None)
                self.host_syncs = sum("synchroniz" in str(w.message) for w in self._caught)
                self._catch = None


# -- one table --------------------------------------------------------------------------------
class Bench:
    """Runs the rows of one ``Settings`` table on one device."""

    def __init__(self, settings: Settings, dm: CIFARDataModule) -> None:
        self.s = settings
        self.device = torch.device(settings.device)
        self.dm = dm
        dm.device_resident, dm.drop_last = settings.device_resident, settings.drop_last
        self.networks: dict[tuple, tuple[Any, dict[str, Tensor]]] = {}

    # networks: one per layout, built once, compiled once, reset to the same weights per run
    def network(self, layout: PeerLayout) -> Any:
        key = (layout.pair_stage, layout.rescale_split_gradients)
        if key not in self.networks:
            L.seed_everything(SEED, verbose=False)
            peers = PeerNetwork.from_backbone(self.s.backbone, self.s.peers, self.s.topology, self.dm.num_classes,
                                              layout=replace(layout, topology=self.s.topology, branch_offset=0))
            peers, _ = apply_perf(peers, _NoMethod(), self.s.perf())
            peers.to(self.device)
            self.networks[key] = (peers, copy.deepcopy(peers.state_dict()))
        peers, state = self.networks[key]
        peers.load_state_dict(state)
        return peers

    def method(self, row: RowSpec) -> tuple[Any, OKDMethod | None]:
        if row.method is None:
            return self.network(PeerLayout()), None
        method = get_method(row.method)(**row.options)
        peers = self.network(method.reference_layout)
        method.attach(peers.spec())
        if self.s.compile_method:
            compile_module(method, self.s.perf())  # a fresh method per run: compiled per run
        return peers, method

    def batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Training batches on the device, augmented and normalised, forever."""
        dm = self.dm
        while True:
            if self.s.device_resident:
                loader = DeviceResidentLoader(dm.train_dataset.images, dm.train_dataset.labels, self.s.batch_size,
                                              self.device, drop_last=self.s.drop_last)
            else:
                loader = dm.train_dataloader()
            for images, labels, indices in loader:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                indices = indices.to(self.device, non_blocking=True)
                yield normalize(random_crop_flip(images), dm.mean, dm.std), labels, indices

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.s.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run_plain(self, row: RowSpec, profiler: Any = None) -> Run:
        """Wall and CPU seconds of the timed steps of a hand-written loop, and their peak memory
        (``profiler``: a torch.profiler.profile, started with the timed steps, stopped after them)."""
        peers, method = self.method(row)
        L.seed_everything(SEED, verbose=False)
        peers.train()
        groups = [{"params": list(peers.parameters())}]
        if method is not None:
            method.to(self.device).train()
            method.setup_data(self.dm.train_labels.to(self.device))
            groups += method.parameter_groups(dict(SGD))
        optimizer = torch.optim.SGD(groups, **SGD)
        memory = PeakMemory(self.device)
        clock = Clock(self.device)
        batches = self.batches()
        total = self.s.warmup + self.s.steps
        for step in range(total):
            images, labels, indices = next(batches)
            with self.autocast():
                output = peers(images)
                if method is None:
                    loss = cross_entropy_per_peer(output.logits, labels).sum()
                else:
                    loss = torch.stack(list(method(output, labels, indices).values())).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # as the Trainer side: each timed step runs from the end of the previous one
            if step == self.s.warmup - 1:
                memory.start()
                sync(self.device)
                if profiler is not None:
                    profiler.start()
                clock.mark()
            elif step >= self.s.warmup:
                if step == total - 1:
                    sync(self.device)
                clock.mark()
        if profiler is not None:
            profiler.stop()
        wall, cpu = clock.seconds()
        return Run(wall, cpu, memory.stop())

    def run_lightning(self, row: RowSpec, syncs: list[int] | None = None) -> Run:
        peers, method = self.method(row)
        L.seed_everything(SEED, verbose=False)
        system = OKDSystem(peers, method, num_classes=self.dm.num_classes, scheduler="constant", **SGD)
        timer = StepTimer(self.s.warmup, self.s.warmup + self.s.steps, self.device)
        trainer = L.Trainer(
            max_steps=self.s.warmup + self.s.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1,
            precision="bf16-mixed" if self.s.precision == "bf16" else "32-true", callbacks=[timer],
            benchmark=True if self.device.type == "cuda" else None,
        )
        trainer.fit(system, datamodule=self.dm)
        if syncs is not None and timer.host_syncs is not None:
            syncs.append(timer.host_syncs)
        wall, cpu = timer.clock.seconds()
        return Run(wall, cpu, timer.peak)

    def data_path(self, k: int | None, batches: int) -> float:
        """images/s of loader + transfer + augmentation (+ negatives at K = k)."""
        sampler = None
        if k is not None:
            sampler = NegativeSampler(k).to(self.device)
            sampler.bind(self.dm.train_labels.to(self.device))
        source = self.batches()
        next(source)
        if sampler is not None:
            images, labels, indices = next(source)
            sampler(indices, labels)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(batches):
            images, labels, indices = next(source)
            if sampler is not None:
                sampler(indices, labels)
        sync(self.device)
        return batches * self.s.batch_size / (time.perf_counter() - start)

    def contrastive_memory(self) -> dict[str, Any]:
        """Peak memory of MCL-OKD's contrastive term alone (forward + backward + bank update) at
        B = batch, K = memory_k, N = peers, against the reference's N(N - 1) gathered tensors."""
        n, batch, k = self.s.peers, self.s.batch_size, self.s.memory_k
        from mcl_lightning.methods import MCLOKD

        method = MCLOKD(nce_k=k)
        width = 64
        method.attach(PeerSpec(n, (width,) * n, self.dm.num_classes, self.s.topology, trunk_channels=16))
        method.to(self.device)
        method.setup_data(self.dm.train_labels.to(self.device))
        g = torch.Generator().manual_seed(SEED)
        indices = torch.randperm(len(self.dm.train_labels), generator=g)[:batch].to(self.device)
        labels = self.dm.train_labels.to(self.device).index_select(0, indices)
        features = torch.randn(n, batch, width, generator=g).to(self.device).requires_grad_(True)
        memory = PeakMemory(self.device)
        memory.start()
        loss = method.contrastive(features, labels, indices)
        loss.backward()
        peak = memory.stop()
        reference = n * (n - 1) * batch * (k + 1) * REFERENCE_DIM * 4
        scoring = "dense" if method._dense_scoring(torch.Size([batch, k + 1])) else "gather"
        del method, features, loss
        return {
            "peers": n, "batch": batch, "nce_k": k, "scoring": scoring, "peak_bytes": peak, "kind": memory.kind,
            "reference_gathered_bytes": reference,
            "ratio_to_reference": None if peak is None else peak / reference,
            "target_ratio": 1 / (n - 1),
        }

    def profile(self, row: RowSpec, steps: int = 2) -> list[dict[str, Any]]:
        """torch.profiler's top entries (self time per step) over ``steps`` plain-loop steps of ``row``
        (after one warm-up step, set-up excluded)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        probe = replace(self.s, warmup=1, steps=steps)
        bench = Bench(probe, self.dm)
        bench.networks = self.networks
        prof = profile(activities=activities)
        bench.run_plain(RowSpec(row.label, row.method, row.options, plain=True), profiler=prof)
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1.0
        return [
            {"name": e.key, "self_ms_per_step": getattr(e, key) / 1000 / steps, "calls": e.count // steps,
             "percent": 100 * getattr(e, key) / total}
            for e in events[:12]
        ]


@dataclass
class Run:
    wall: float  # seconds of the timed steps (CPU: median step x steps)
    cpu: float  # process CPU seconds over them (all threads; CPU: median step x steps)
    peak: int | None  # peak memory, bytes


class _NoMethod(OKDMethod):
    """apply_perf's method argument when only the peers are prepared."""


# -- the run ----------------------------------------------------------------------------------
def run_table(settings: Settings, dm: CIFARDataModule, deadline: float, log: Callable[[str], None],
              profile: str = "none") -> dict[str, Any]:
    bench = Bench(settings, dm)
    device = bench.device
    rows = row_specs(settings)
    results: dict[str, Any] = {"settings": table_settings(settings), "rows": [], "data_path": [], "skipped": []}

    # data path and memory first: cheap, and measured in a process not yet holding the runs' buffers
    data_rows = [("loader + augmentation", None)] + [(f"+ negative sampling K={k}", k) for k in settings.data_k]
    data_runs: dict[str, list[float]] = {label: [] for label, _ in data_rows}
    for _ in range(settings.repeats):
        for label, k in data_rows:
            n = settings.data_batches if (k or 0) < 4096 else max(settings.data_batches // 4, 2)
            data_runs[label].append(bench.data_path(k, n))
    for label, _ in data_rows:
        results["data_path"].append({"name": label, "images_per_s": statistics.median(data_runs[label]),
                                     "images_per_s_runs": data_runs[label]})
    if settings.memory_k:
        try:
            results["contrastive_memory"] = bench.contrastive_memory()
        except ConfigError as error:
            results["skipped"].append({"name": "contrastive memory", "reason": str(error)})
    gc.collect()

    runs: dict[str, list[Run]] = {row.label: [] for row in rows}
    syncs: dict[str, list[int]] = {row.label: [] for row in rows}
    failed: dict[str, str] = {}
    repeat_seconds: list[float] = []
    floor_row = rows[0]
    for repeat in range(settings.repeats):
        # a repeat, then the closing floor run, must fit in what is left
        if repeat and time.monotonic() + max(repeat_seconds) * (1 + 1 / len(rows)) > deadline:
            log(f"  time budget: stopping after {repeat} of {settings.repeats} repeats")
            break
        started = time.monotonic()
        for row in rows:
            if row.label in failed:
                continue
            try:
                if row.plain:
                    runs[row.label].append(bench.run_plain(row))
                else:
                    runs[row.label].append(bench.run_lightning(row, syncs[row.label]))
            except ConfigError as error:  # a method that cannot train this network: say so, go on
                failed[row.label] = str(error)
                results["skipped"].append({"name": row.label, "reason": str(error)})
        repeat_seconds.append(time.monotonic() - started)
        log(f"  repeat {repeat + 1}: {repeat_seconds[-1]:.0f} s")
    results["repeats_done"] = len(repeat_seconds)
    # A closing floor run: each row's ratio uses the floor interpolated between the runs before and
    # after it (by its position in the repeat), so a machine getting busier or quieter during a
    # repeat does not favour the rows that ran late.
    runs[floor_row.label].append(bench.run_plain(floor_row))

    images = settings.steps * settings.batch_size
    floor = runs[floor_row.label]

    def interpolated_ratios(position: int, runs_of_row: list[Run], attr: str) -> list[float]:
        w = position / len(rows)
        return [((1 - w) * getattr(floor[r], attr) + w * getattr(floor[r + 1], attr)) / getattr(run, attr)
                for r, run in enumerate(runs_of_row[:len(floor) - 1])]

    for position, row in enumerate(rows):
        if row.label in failed or not runs[row.label]:
            continue
        seconds = [run.wall for run in runs[row.label]]
        peaks = [run.peak for run in runs[row.label] if run.peak is not None]
        ratios = interpolated_ratios(position, runs[row.label], "wall")
        cpu_ratios = interpolated_ratios(position, runs[row.label], "cpu")
        entry = {
            "name": row.label, "method": row.method or "cross-entropy only", "options": row.options,
            "kind": "plain loop" if row.plain else "lightning",
            "images_per_s": images / statistics.median(seconds),
            "ms_per_step": 1000 * statistics.median(seconds) / settings.steps,
            "ratio_to_floor": statistics.median(ratios),
            "images_per_s_runs": [images / s for s in seconds],
            "ratio_to_floor_runs": ratios,
            # the same ratio in process CPU time: what each step costs, whatever else the machine runs
            "ratio_to_floor_cpu_time": statistics.median(cpu_ratios),
            "ratio_to_floor_cpu_time_runs": cpu_ratios,
            "peak_memory_bytes": max(peaks) if peaks else None,
            "peak_memory_kind": PeakMemory(device).kind,
        }
        if syncs[row.label]:
            entry["host_syncs_in_timed_steps"] = max(syncs[row.label])
        results["rows"].append(entry)
    by_name = {r["name"]: r for r in results["rows"]}
    for row in rows:  # Lightning against the plain loop of the same method
        if row.plain and row.method is not None and row.label in by_name:
            twin = by_name.get(row.label.removesuffix(" (plain loop)"))
            if twin is not None:
                lightning_runs = [images / x for x in twin["images_per_s_runs"]]
                plain_runs = [images / x for x in by_name[row.label]["images_per_s_runs"]]
                twin["ratio_to_plain_loop"] = statistics.median(p / q for p, q in zip(plain_runs, lightning_runs))
    results["targets"] = check_targets(settings, results)
    if settings.perf().compile_mode is not None:
        results["compile_counters"] = compile_counters()
    if profile != "none":
        wanted = [r for r in rows if r.label in _profile_rows(profile, results)]
        results["profiles"] = []
        for row in wanted:
            if time.monotonic() > deadline:
                log("  time budget: no profile")
                break
            results["profiles"].append({"row": row.label, "top": bench.profile(row)})
    return results


def compile_counters() -> dict[str, Any]:
    """torch.compile's own counters (graph breaks, recompilations, CUDA-graph skips) so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    return {group: dict(values) for group, values in counters.items() if values}


def _profile_rows(profile: str, results: dict[str, Any]) -> set[str]:
    if profile == "auto":
        return {t["row"] for t in results["targets"] if not t["met"] and t.get("row")}
    return {name.strip() for name in profile.split(";")}


def table_settings(s: Settings) -> dict[str, Any]:
    d = asdict(s)
    d["rows"], d["plain"], d["data_k"] = list(s.rows), list(s.plain), list(s.data_k)
    d["compile"] = PerfOptions(compile=s.compile).compile_mode or False
    d["statistic"] = "median over repeats"
    return d


# -- targets (issue 9) --------------------------------------------------------------------------
def check_targets(s: Settings, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets that apply to these settings, met or missed and by how much."""
    rows = {r["name"]: r for r in results["rows"]}
    out: list[dict[str, Any]] = []

    def ratio(row: str, goal: float, what: str) -> None:
        if row in rows:
            value = rows[row]["ratio_to_floor"]
            out.append({"target": what, "row": row, "value": value, "goal": goal, "met": value >= goal,
                        "by": value - goal})

    issue = s.backbone == "resnet32" and s.peers == 4 and s.topology == "shared_trunk"
    if s.targets == "cpu" and issue and s.batch_size == 64 and s.precision == "32":
        ratio("mcl_okd K=256", 0.95, "MCL-OKD K=256 >= 0.95x floor")
        ratio("mcl_okd K=16384", 0.50, "MCL-OKD K=16384 >= 0.50x floor")
        ratio("independent", 0.98, "independent >= 0.98x floor")
        for entry in results["data_path"]:
            if entry["name"] == "+ negative sampling K=256":
                value = entry["images_per_s"]
                out.append({"target": "data path with negative sampling >= 20,000 images/s", "value": value,
                            "goal": 20000, "met": value >= 20000, "by": value - 20000})
    memory = results.get("contrastive_memory")
    if s.targets in ("cpu", "gpu") and memory and memory["peak_bytes"] is not None and memory["nce_k"] == 16384:
        value, goal = memory["ratio_to_reference"], memory["target_ratio"]
        out.append({"target": f"contrastive memory (B={memory['batch']}, K=16384, N={memory['peers']}) <= 1/(N-1) "
                              "of the reference's gathered tensors", "value": value, "goal": goal,
                    "met": value <= goal, "by": goal - value})
    if s.targets == "gpu" and issue and s.device.startswith("cuda"):
        if "mcl_okd K=256" in rows:
            goal = 20000 if s.batch_size == 64 else 40000 if s.batch_size == 256 else None
            if goal is not None:
                value = rows["mcl_okd K=256"]["images_per_s"]
                out.append({"target": f"MCL-OKD K=256 >= {goal} images/s at batch {s.batch_size}",
                            "row": "mcl_okd K=256", "value": value, "goal": goal, "met": value >= goal,
                            "by": value - goal})
    return out


def fused_comparison(tables: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fused independent peers against the per-peer loop (two tables of the gpu preset): images/s
    of ``independent`` through Lightning, fused over looped. The issue's target (>= 1.5x) is for one
    GPU at batch 256; elsewhere this is a comparison only."""
    names = {t["settings"]["name"]: t for t in tables}
    loop, fused = names.get("gpu_independent_loop_b256"), names.get("gpu_independent_fused_b256")
    if not (loop and fused and loop["rows"] and fused["rows"]):
        return None
    get = lambda t: {r["name"]: r["images_per_s"] for r in t["rows"]}.get("independent")  # noqa: E731
    a, b = get(loop), get(fused)
    if not a or not b:
        return None
    batch, device = fused["settings"]["batch_size"], fused["settings"]["device"]
    out = {"comparison": f"independent topology, batch {batch}, {device}: fused peers / per-peer loop",
           "value": b / a, "loop_images_per_s": a, "fused_images_per_s": b}
    if batch == 256 and device.startswith("cuda"):
        out.update(target="fused peers >= 1.5x the per-peer loop at batch 256 (one GPU)", goal=1.5,
                   met=b / a >= 1.5, by=b / a - 1.5)
    return out


# -- output -----------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def format_table(table: dict[str, Any]) -> str:
    s = table["settings"]
    lines = [
        f"[{s['name']}] {s['backbone']} x{s['peers']} {s['topology']}, batch {s['batch_size']}, precision {s['precision']}, "
        f"compile {s['compile']}, channels_last {s['channels_last']}, fused peers {s['fuse_peers']}, "
        f"data {'device-resident' if s['device_resident'] else 'loader'}; {s['steps']} timed steps after "
        f"{s['warmup']} warmup, {table['repeats_done']}/{s['repeats']} repeats, median",
        f"{'row':<34} {'images/s':>10} {'ms/step':>9} {'x floor':>8} {'(cpu t)':>8} {'x plain':>8} {'peak MB':>9}",
    ]
    for r in table["rows"]:
        plain = r.get("ratio_to_plain_loop")
        peak = r["peak_memory_bytes"]
        lines.append(
            f"{r['name']:<34} {r['images_per_s']:>10.1f} {r['ms_per_step']:>9.1f} {r['ratio_to_floor']:>8.3f} "
            f"{r['ratio_to_floor_cpu_time']:>8.3f} {'' if plain is None else f'{plain:.3f}':>8} "
            f"{'' if peak is None else f'{peak / 2**20:.0f}':>9}"
        )
    for r in table["data_path"]:
        lines.append(f"{'data: ' + r['name']:<34} {r['images_per_s']:>10.0f}")
    memory = table.get("contrastive_memory")
    if memory and memory["peak_bytes"] is not None:
        lines.append(
            f"contrastive term alone (B={memory['batch']}, K={memory['nce_k']}, N={memory['peers']}, {memory['scoring']}): "
            f"peak {memory['peak_bytes'] / 2**20:.0f} MB = {memory['ratio_to_reference']:.3f} x the reference's "
            f"{memory['reference_gathered_bytes'] / 2**20:.0f} MB of gathered rows (target <= {memory['target_ratio']:.3f})"
        )
    for skipped in table["skipped"]:
        lines.append(f"skipped {skipped['name']}: {skipped['reason']}")
    for t in table["targets"]:
        lines.append(f"target {'MET ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3f} (goal {t['goal']}, by {t['by']:+.3f})")
    for p in table.get("profiles", []):
        lines.append(f"profile of {p['row']} (plain loop, self time per step):")
        for e in p["top"]:
            lines.append(f"  {e['name'][:60]:<60} {e['self_ms_per_step']:>9.1f} ms {e['percent']:>5.1f} %")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "gpu", "gpu_headline", "tiny"), default=None,
                   help="cpu (default on CPU), gpu (default on CUDA: several tables), gpu_headline (the GPU targets' "
                        "rows, about 2.5 minutes), tiny (seconds)")
    p.add_argument("--tables", help="only these tables of the preset, by name, separated by ';'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=os.environ.get("MCL_DATA_ROOT") or str(Path.cwd().parent / "shared" / "data"))
    p.add_argument("--backbone")
    p.add_argument("--peers", type=int)
    p.add_argument("--topology", choices=("shared_trunk", "independent"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--rows", help="comma-free list separated by ';': e.g. 'independent;mcl_okd@256;*'")
    p.add_argument("--plain", help="rows also run as a plain loop, separated by ';' ('' for none)")
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--warmup", type=int, help="untimed steps before them")
    p.add_argument("--repeats", type=int, help="interleaved repeats (medians)")
    p.add_argument("--precision", choices=("32", "bf16"))
    p.add_argument("--compile", help="false | true | reduce-overhead | max-autotune ...")
    p.add_argument("--compile-backend")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fuse-peers", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device-resident", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--data-batches", type=int)
    p.add_argument("--memory-k", type=int, help="K of the contrastive-memory check (0: skip)")
    p.add_argument("--data-k", help="K values of the data-path rows with negative sampling, separated by ';' ('' for none)")
    p.add_argument("--profile", default="none", help="none | auto (rows that miss a target) | row names separated by ';'")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                   help="OMP_WAIT_POLICY for CPU runs (restarts the process once to set it)")
    p.add_argument("--max-seconds", type=float, default=270.0, help="stop repeating (and profiling) past this")
    p.add_argument("--json", type=Path, default=None, help="write every figure and the settings here")
    p.add_argument("data", nargs="*", metavar="data.<option>=<value>",
                   help="CIFAR data module options, as for training: data.root=..., data.check_integrity=false")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> list[Settings]:
    name = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    tables = preset(name, args.device)
    if args.tables:
        wanted = [t for t in args.tables.split(";") if t]
        unknown = sorted(set(wanted) - {t.name for t in tables})
        if unknown:
            raise ConfigError(f"preset {name} has no table {', '.join(unknown)}; it has {', '.join(t.name for t in tables)}")
        tables = [t for t in tables if t.name in wanted]
    overrides: dict[str, Any] = {}
    for key in ("backbone", "peers", "topology", "batch_size", "steps", "warmup", "repeats", "precision", "compile",
                "compile_backend", "channels_last", "fuse_peers", "device_resident", "data_batches", "memory_k"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.rows is not None:
        overrides["rows"] = tuple(r for r in args.rows.split(";") if r)
    if args.plain is not None:
        overrides["plain"] = tuple(r for r in args.plain.split(";") if r)
    if args.data_k is not None:
        overrides["data_k"] = tuple(int(k) for k in args.data_k.split(";") if k)
    out = [replace(t, **overrides) for t in tables]
    for t in out:
        if t.steps < 1 or t.warmup < 1 or t.repeats < 1:
            raise ConfigError("need --steps >= 1, --warmup >= 1 (compilation and allocator warm-up) and --repeats >= 1")
        PerfOptions(compile=t.compile).compile_mode  # validates
    return out


def _reexec_with_omp_policy(args: argparse.Namespace, argv: list[str] | None) -> None:
    if args.omp_wait_policy == "inherit" or not args.device.startswith("cpu") or argv is not None:
        return
    wanted = args.omp_wait_policy.upper()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != wanted:
        os.environ["OMP_WAIT_POLICY"] = wanted
        os.execv(sys.executable, [sys.executable, "-m", "mcl_lightning.bench", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m mcl_lightning.bench``: a person's mistake (bad option, missing or unreadable data) is
    one line and exit status 2."""
    try:
        return run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def data_module(args: argparse.Namespace, batch_size: int) -> CIFARDataModule:
    """The CIFAR training data, ``--data-root`` or ``data.root=`` with any other ``data.*`` option."""
    options = {"root": args.data_root, "download": False, **parse_overrides(args.data)}
    check_data_root(options["root"])
    for fixed in ("batch_size", "dataset"):
        if fixed in options:
            raise ConfigError(f"data.{fixed} is set by the benchmark's tables; use --batch-size (CIFAR-100 only)")
    try:
        dm = CIFARDataModule(batch_size=batch_size, **options)
    except TypeError as error:  # an option CIFARDataModule does not have
        raise ConfigError(f"{error}; the benchmark takes CIFARDataModule's options as data.<option>=<value>") from None
    dm.prepare_data()
    dm.setup("fit")
    return dm


def run(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.monotonic()
    args = parse_args(argv)
    _reexec_with_omp_policy(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = settings_from_args(args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*Tensor Cores.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    dm = data_module(args, tables[0].batch_size)
    deadline = started + args.max_seconds
    results: dict[str, Any] = {
        "device": args.device, "device_name": device_name(device), "torch_version": torch.__version__,
        "lightning_version": L.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_average_at_start": _loadavg(), "tables": [],
    }
    for table in tables:
        if time.monotonic() > deadline - TABLE_RESERVE_S and results["tables"]:  # a table's first repeat always runs
            results["tables"].append({"settings": table_settings(table), "skipped_for_time": True, "rows": [],
                                      "data_path": [], "skipped": [], "targets": [], "repeats_done": 0})
            log(f"[{table.name}] skipped: time budget spent")
            continue
        log(f"[{table.name}] running ...")
        dm.batch_size = dm.per_device_batch_size = table.batch_size
        try:
            result = run_table(table, dm, deadline, log, args.profile)
        except Exception as error:  # one table's failure (e.g. a compile error) must not lose the others
            if len(tables) == 1:
                raise
            log(f"[{table.name}] failed: {type(error).__name__}: {error}")
            result = {"settings": table_settings(table), "error": f"{type(error).__name__}: {error}", "rows": [],
                      "data_path": [], "skipped": [], "targets": [], "repeats_done": 0}
        results["tables"].append(result)
        if result["rows"] or result["data_path"]:
            print(format_table(result), flush=True)
    fused = fused_comparison(results["tables"])
    if fused:
        results["fused_vs_loop"] = fused
        if "target" in fused:
            print(f"target {'MET ' if fused['met'] else 'MISSED'} {fused['target']}: {fused['value']:.3f}", flush=True)
        else:
            print(f"{fused['comparison']}: {fused['value']:.3f}", flush=True)
    results["load_average_at_end"] = _loadavg()
    results["wall_seconds"] = time.monotonic() - started
    print(f"{results['device_name']} | torch {results['torch_version']} | lightning {results['lightning_version']} | "
          f"OMP_WAIT_POLICY={results['omp_wait_policy']} | load {results['load_average_at_start']} -> "
          f"{results['load_average_at_end']} | {results['wall_seconds']:.0f} s", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results: {args.json}", flush=True)
    return results


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


if __name__ == "__main__":
    main()
