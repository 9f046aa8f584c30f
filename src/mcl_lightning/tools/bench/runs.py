"""One row's run: a hand-written loop or OKDSystem + Trainer, on the same network and batches."""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import replace
from typing import Any, Iterator

import lightning as L
import torch
from torch import Tensor

from mcl_lightning.tools.bench.settings import SEED, SGD, RowSpec, Settings
from mcl_lightning.tools.bench.timing import Clock, PeakMemory, Run, StepTimer, sync
from mcl_lightning.data import CIFARDataModule, DeviceResidentLoader, normalize, random_crop_flip
from mcl_lightning.methods import OKDMethod, get_method
from mcl_lightning.methods.losses import cross_entropy_per_peer
from mcl_lightning.models import PeerLayout, PeerNetwork
from mcl_lightning.runtime.perf import apply_perf, compile_module
from mcl_lightning.system import OKDSystem


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
        if any(t.device != self.device for t in itertools.chain(peers.parameters(), peers.buffers())):
            # A Trainer's teardown moved it (Lightning's strategy calls .cpu() on the LightningModule, and
            # so on this shared network): back to the table's device; the weights come from ``state``.
            peers.to_empty(device=self.device)
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
        began, warmup_s = time.perf_counter(), None
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
                warmup_s = time.perf_counter() - began  # compilation included
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
        return Run(wall, cpu, memory.stop(), warmup_s)

    def run_lightning(self, row: RowSpec, syncs: list[int] | None = None, profiler: Any = None) -> Run:
        """As ``run_plain``, through ``OKDSystem`` + ``lightning.Trainer`` (``syncs``: the CUDA host
        synchronisations counted in the timed steps are appended)."""
        peers, method = self.method(row)
        L.seed_everything(SEED, verbose=False)
        system = OKDSystem(peers, method, num_classes=self.dm.num_classes, scheduler="constant", **SGD)
        timer = StepTimer(self.s.warmup, self.s.warmup + self.s.steps, self.device, profiler)
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
        return Run(wall, cpu, timer.peak, timer.warmup_s)



class _NoMethod(OKDMethod):
    """apply_perf's method argument when only the peers are prepared."""

