"""Long runs that lose nothing across resumes (issue 25): the loader's position with workers, the
run's history (CSV, TensorBoard, trackers), schedule changes on resume, short runs' summaries,
train.log, and a soak test of interruptions."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from mcl_lightning.data.resumable import ResumableLoader, ResumableOrderSampler
from mcl_lightning.runtime.curves import read_epoch_series


class _Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


def _loader(seed: int = 3) -> ResumableLoader:
    data = _Indices()
    return ResumableLoader(data, batch_size=4, sampler=ResumableOrderSampler(data, 1, 0, seed), num_workers=2,
                           persistent_workers=True)


def test_loader_state_counts_the_batches_training_consumed_not_what_workers_prefetched():
    loader = _loader()
    loader.sampler.set_epoch(2)
    full = [batch.tolist() for batch in loader]
    iterator = iter(loader)
    head = [next(iterator).tolist() for _ in range(3)]  # the workers have fetched several batches more
    state = loader.state_dict()
    assert state["yielded"] == 12 and state["epoch"] == 2
    resumed = _loader(seed=0)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert head + [batch.tolist() for batch in resumed] == full  # batch 4 next, nothing skipped
    assert resumed.state_dict()["yielded"] == 40


# -- CLI runs interrupted at chosen points (tests/interrupted_train.py) --------------------------------
WRAPPER = Path(__file__).with_name("interrupted_train.py")
SMALL = ["peers=2", "backbone=resnet20", "method.nce_k=32", "method.projection_dim=8", "data.batch_size=16",
         "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def launch(run_dir: Path, *overrides: str, interrupt: str | None = None, order_log: Path | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The same pre-emptible command every time (``ckpt_path=last``), interrupted at ``interrupt``."""
    env = {**os.environ, "INTERRUPT": interrupt or "", "ORDER_LOG": str(order_log or "")}
    return subprocess.run([sys.executable, str(WRAPPER), *overrides, f"hydra.run.dir={run_dir}", "ckpt_path=last"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=cwd)


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "csv" / "metrics.csv").open(newline="")))


def row_kinds(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(kind, epoch, step) of each CSV row: lr (epoch start), train, val, test (epoch end)."""
    def kind(row: dict[str, str]) -> str:
        return next(k for k in ("lr-SGD/pg1", "train/loss", "val/peer0/top1", "test/peer0/top1") if row.get(k)).split("/")[0]
    return [(kind(row), row["epoch"], row["step"]) for row in rows]


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_kill_right_after_an_epoch_end_loses_no_row_and_repeats_none(tmp_path, data_root):
    """Killed between epoch 0's checkpoint and its training row, then relaunched: every row once."""
    run_dir, common = tmp_path / "run", [*SMALL, f"data.root={data_root}"]
    assert launch(run_dir, *common, interrupt="epoch_end:0:0:KILL").returncode == -signal.SIGKILL
    proc = launch(run_dir, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(row_kinds(csv_rows(run_dir))) == sorted([
        ("lr-SGD", "", "0"), ("val", "0", "3"), ("train", "0", "3"),
        ("lr-SGD", "", "4"), ("val", "1", "7"), ("train", "1", "7"), ("test", "2", "8")])
    assert "Previous log files" not in proc.stderr
    assert tensorboard_steps(run_dir, "train/loss") == [3, 7]  # the same TensorBoard run, each epoch once
    assert tensorboard_steps(run_dir, "lr-SGD/pg1") == [0, 4]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_epoch"] is not None and results["epochs_run"] == 2
    assert sorted(read_epoch_series(run_dir / "csv" / "metrics.csv")["train/loss"]) == [0, 1]  # curves.png's data
