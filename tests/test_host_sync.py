"""No host synchronisation in a training step between logging steps (issue 24, item 4).

A real short MCL-OKD run through ``train.build`` (its callbacks: the non-finite guard, the loss-term
progress bar, throughput, checkpoints, loggers) and Lightning's Trainer, on the CPU. Every read of a
tensor's value on the host is counted: the aten ops that copy a value to the host or make a shape
depend on values (``.item()``, ``float()``, ``bool()``, ``nonzero``... through a dispatch mode, so reads
made inside other ops count too) and the Python methods that hand a tensor's data over (``tolist``,
``numpy``). On a GPU each would wait for the device. Reads are allowed at logging steps only (every
``trainer.log_every_n_steps``-th batch, where the progress bar shows the terms and the guard checks
what it holds) and at the end of the epoch.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcl_lightning.runtime.guards import NonFiniteLossGuard

LOG_EVERY = 4
BATCHES = 11  # logging steps: batches 3 and 7, and the last one (10) ends the epoch
HOST_READ_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "equal", "unique",
                 "_unique2", "masked_select"}
HOST_READ_METHODS = ("tolist", "numpy", "__array__")


class HostReads:
    """Host reads of tensor values, by the training batch they happened in (``None`` outside a batch)."""

    def __init__(self) -> None:
        self.batch: int | None = None
        self.reads: dict[int, list[str]] = defaultdict(list)

    def record(self, what: str) -> None:
        if self.batch is not None:
            frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename][-3:]
            self.reads[self.batch].append(f"{what} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                                                    for f in reversed(frames)))


class _CountOps(TorchDispatchMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ in HOST_READ_OPS:
            self.reads.record(f"aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


class _Window(L.Callback):
    """Opens the batch (first callback) or closes it (last callback, after every other hook)."""

    def __init__(self, reads: HostReads, opens: bool) -> None:
        self.reads, self.opens = reads, opens

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.opens:
            self.reads.batch = batch_idx

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.opens:
            self.reads.batch = None


def _patch_methods(monkeypatch: pytest.MonkeyPatch, reads: HostReads) -> None:
    for name in HOST_READ_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            reads.record(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)


def train_counting_reads(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> HostReads:
    from hydra import compose, initialize_config_module

    from mcl_lightning.train import build

    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={data_root}", "data.check_integrity=false", "data.num_workers=0", "peers=2",
            "backbone=resnet8", "method.nce_k=16", "method.projection_dim=16", "data.batch_size=16",
            "trainer.max_epochs=1", f"trainer.limit_train_batches={BATCHES}", "trainer.limit_val_batches=0",
            f"trainer.log_every_n_steps={LOG_EVERY}", "trainer.enable_progress_bar=true",
            f"logger.csv.save_dir={tmp_path}", f"logger.tensorboard.save_dir={tmp_path}", *overrides])
    L.seed_everything(0, verbose=False)
    datamodule, system, trainer = build(cfg, tmp_path, None)
    reads = HostReads()
    trainer.callbacks.insert(0, _Window(reads, opens=True))
    trainer.callbacks.append(_Window(reads, opens=False))
    _patch_methods(monkeypatch, reads)
    with _CountOps(reads):
        trainer.fit(system, datamodule=datamodule)
    assert trainer.global_step == BATCHES
    return reads


def test_no_host_reads_between_logging_steps(tmp_path, data_root, monkeypatch):
    reads = train_counting_reads(tmp_path, data_root, monkeypatch)
    logging_steps = {b for b in range(BATCHES) if (b + 1) % LOG_EVERY == 0} | {BATCHES - 1}
    assert {b: r for b, r in reads.reads.items() if b not in logging_steps} == {}
    # the counter sees reads: the progress bar's terms and the guard's check at the logging steps
    assert all(reads.reads[b] for b in logging_steps), dict(reads.reads)


def _pending(values: list[float], names: tuple[str, ...] = ("ce", "kd")) -> Any:
    return {"loss": torch.tensor(sum(values)), "terms": {n: torch.tensor(v) for n, v in zip(names, values)}}


class _Trainer:
    """What the guard reads of the trainer."""

    def __init__(self, log_every_n_steps: int) -> None:
        self.log_every_n_steps, self.global_step, self.current_epoch = log_every_n_steps, 0, 0


def test_the_guard_checks_at_logging_steps_and_names_the_first_bad_step():
    """A NaN at batch 1 is found at the logging step (batch 2), reported as batch 1's."""
    from mcl_lightning.core.errors import NonFiniteLossError

    guard, trainer = NonFiniteLossGuard(), _Trainer(log_every_n_steps=3)
    steps = [[1.0, 2.0], [1.0, float("nan")], [float("inf"), 3.0]]
    for batch, values in enumerate(steps[:2]):
        trainer.global_step = batch + 1
        guard.on_train_batch_end(trainer, None, _pending(values), None, batch)  # not a logging step: no check
    trainer.global_step = 3
    with pytest.raises(NonFiniteLossError, match=r"'kd' became nan at optimizer step 2 \(epoch 0, batch 1\)"):
        guard.on_train_batch_end(trainer, None, _pending(steps[2]), None, 2)
    assert guard.failure == {"error": "non_finite_loss", "term": "kd", "value": "nan", "step": 2, "epoch": 0,
                             "batch": 1, "terms": ["kd"]}


def test_the_guard_checks_what_it_holds_before_a_checkpoint():
    from mcl_lightning.core.errors import NonFiniteLossError

    guard, trainer = NonFiniteLossGuard(), _Trainer(log_every_n_steps=50)
    trainer.global_step = 1
    guard.on_train_batch_end(trainer, None, _pending([1.0, 2.0]), None, 0)
    guard.on_save_checkpoint(trainer, None, {})  # all finite: nothing raised, nothing held
    trainer.global_step = 2
    guard.on_train_batch_end(trainer, None, _pending([-float("inf"), 2.0]), None, 1)
    with pytest.raises(NonFiniteLossError, match=r"'ce' became -inf at optimizer step 2"):
        guard.on_save_checkpoint(trainer, None, {})
