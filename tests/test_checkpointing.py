"""Kill-safe training: atomic checkpoints, the resumable order, ckpt_path=last, and a CLI run killed with
SIGKILL and then SIGTERM mid-epoch that ends bit for bit like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import KILL_RUN, wait_for_checkpoint
from mcl_lightning.runtime import checkpointing
from mcl_lightning.runtime.checkpointing import atomic_save, newest_checkpoint, resolve_ckpt_path
from mcl_lightning.data.resumable import ResumableOrderSampler
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.runtime.validation import mid_epoch


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.arange(10)}, path)
    before = path.read_bytes()

    def crash_half_way(obj, handle):  # the process dies while the new checkpoint is being written
        handle.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"step": 2}, path)
    assert path.read_bytes() == before and torch.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left behind


def test_a_killed_writer_leaves_only_a_temporary_that_resume_removes(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"old")
    stale = tmp_path / ".last.ckpt.1a2b3c4d.tmp"
    stale.write_bytes(b"half")
    assert newest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    assert checkpointing.remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()


@pytest.mark.parametrize("world", [1, 2])
def test_resumable_order_continues_mid_epoch_and_draws_no_global_randomness(world):
    data = list(range(100))
    samplers = [ResumableOrderSampler(data, world, rank, seed=7) for rank in range(world)]
    rng = torch.get_rng_state()
    for sampler in samplers:
        sampler.set_epoch(3)
    full = [list(s) for s in samplers]
    assert sorted(sum(full, [])) == data and torch.equal(rng, torch.get_rng_state())
    for rank, sampler in enumerate(samplers):
        sampler.set_epoch(3)
        iterator = iter(sampler)
        head = [next(iterator) for _ in range(37 // world)]
        state = sampler.state_dict()
        assert state == {"seed": 7, "epoch": 3, "yielded": 37 // world, "num_replicas": world}
        resumed = ResumableOrderSampler(data, world, rank, seed=0)
        resumed.load_state_dict(state)
        resumed.set_epoch(3)  # Lightning calls it again before the resumed epoch
        assert head + list(resumed) == full[rank]
        resumed.set_epoch(4)  # an epoch-end checkpoint: the next epoch starts from the top, in a new order
        assert len(list(resumed)) == len(full[rank]) and list(resumed) != full[rank]


def test_ckpt_path_last_finds_the_newest_checkpoint(tmp_path):
    assert resolve_ckpt_path("last", tmp_path) is None  # a first launch of a pre-emptible command
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "best-epoch003.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == folder / "best-epoch003.ckpt"
    (folder / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == folder / "last.ckpt"
    assert resolve_ckpt_path(str(tmp_path), tmp_path / "other") == folder / "last.ckpt"  # a run directory
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)
    with pytest.raises(ConfigError, match="without checkpoints"):
        resolve_ckpt_path(str(folder / "empty"), tmp_path) if (folder / "empty").mkdir() is None else None


def _launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mcl_lightning.train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _signal_after_step(proc: subprocess.Popen, checkpoint: Path, step: int, signum: int) -> None:
    """Send ``signum`` once ``checkpoint`` holds global step >= ``step``."""
    wait_for_checkpoint(proc, checkpoint, step)
    proc.send_signal(signum)


def test_run_killed_mid_epoch_then_resumed_equals_an_uninterrupted_run(tmp_path, data_root):
    common = [*KILL_RUN, f"data.root={data_root}"]
    straight = tmp_path / "straight"
    proc = _launch(*common, f"hydra.run.dir={straight}")
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-3000:]

    pre_empted = tmp_path / "pre_empted"
    command = [*common, f"hydra.run.dir={pre_empted}", "ckpt_path=last"]  # the same command every time
    last = pre_empted / "checkpoints" / "last.ckpt"
    # 1) SIGKILL in epoch 0, after the step-2 checkpoint: nothing can be saved, the step checkpoint is what is left
    proc = _launch(*command)
    _signal_after_step(proc, last, 2, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert mid_epoch(state) and state["epoch"] == 0 and 2 <= state["global_step"] < 8
    # 2) relaunched: resumes mid-epoch 0; SIGTERM in epoch 1 saves after the current step and exits 143
    proc = _launch(*command)
    _signal_after_step(proc, last, 10, signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "stopped by SIGTERM at epoch 1" in stderr and "ckpt_path=last" in stderr
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert mid_epoch(state) and state["epoch"] == 1 and 10 <= state["global_step"] < 16
    # 3) relaunched again: finishes
    proc = _launch(*command)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-3000:]

    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # weights, heads and memory banks
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["val_history"] == b["val_history"] and len(a["val_history"]) == 2
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, pre_empted))
    assert ra["final"] == rb["final"] and ra["test"] == rb["test"] and rb["status"] == "finished"
