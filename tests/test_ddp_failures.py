"""A DDP job that loses a process (real gloo processes on CPU, 2 ranks): the survivor stops at once with
one line and a failed results.json; a hung rank ends the job after trainer.strategy.timeout_s; torchrun
--max-restarts resumes from the newest checkpoint and ends as an uninterrupted run; a writer killed in
the middle of a checkpoint leaves the previous one, which the restart resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import KILL_RUN, child_pids, process_env, wait_for_checkpoint
from mcl_lightning.runtime.ddp import RestartableDDPStrategy
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.runtime.lost_rank import lost_rank_error
from mcl_lightning.runtime.rank_stats import KEY as RANK_STATS
from mcl_lightning.runtime.rank_stats import RankBatchNormStats

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 15  # the short process-group timeout of these tests
GLOO_CLOSED = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
               "[10.0.0.7]:59011. This is typically caused by a remote worker crashing. GLHF!")
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv"


# -- recognising a lost rank (no processes) ---------------------------------------------------------
def test_a_dead_or_silent_peer_is_named_and_other_errors_are_left_alone():
    dead = lost_rank_error(RuntimeError(GLOO_CLOSED), rank=0, world_size=2, timeout_s=15, epoch=1, step=12)
    assert str(dead).startswith("DDP rank 0 of 2: lost rank 1 at epoch 1, step 12 (Connection closed by peer "
                                "[10.0.0.7]:59011); ") and "ckpt_path=last" in str(dead) and "\n" not in str(dead)
    assert dead.failure == {"error": "lost_rank", "lost_rank": 1, "peer": "10.0.0.7:59011", "rank": 0,
                            "world_size": 2, "epoch": 1, "step": 12}
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = RuntimeError(GLOO_TIMEOUT)
    silent = lost_rank_error(wrapped, rank=1, world_size=2, timeout_s=15, epoch=0, step=3)
    assert "rank 0 did not answer within trainer.strategy.timeout_s=15 s" in str(silent)
    assert silent.failure["error"] == "rank_timeout" and silent.failure["lost_rank"] == 0
    many = lost_rank_error(RuntimeError(GLOO_CLOSED), rank=2, world_size=8, timeout_s=15, epoch=0, step=0)
    assert "lost the rank at 10.0.0.7:59011 (the launcher's log names it)" in str(many)
    assert many.failure["lost_rank"] is None
    for other in (RuntimeError("CUDA out of memory"), ValueError("Connection closed by peer"),
                  RuntimeError("gloo: invalid tensor size")):
        assert lost_rank_error(other, rank=0, world_size=2, timeout_s=15, epoch=0, step=0) is None


def test_the_ddp_timeout_is_in_seconds_and_checked():
    assert RestartableDDPStrategy(timeout_s=20)._timeout == timedelta(seconds=20)
    for bad in (0, -5, "soon", True):
        with pytest.raises(ConfigError, match="timeout_s must be a number of seconds > 0"):
            RestartableDDPStrategy(timeout_s=bad)


def test_each_rank_gets_its_own_batchnorm_statistics_back_from_a_checkpoint():
    def network(mean: float) -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(2))
        net[1].running_mean.fill_(mean)
        return net

    ranks = [network(0.5), network(-2.0)]  # what two ranks' statistics look like after training
    stacked = torch.stack([torch.cat([t.reshape(-1) for n, t in r.named_buffers() if "running" in n]) for r in ranks])
    checkpoint = {}
    RankBatchNormStats().on_save_checkpoint(
        SimpleNamespace(world_size=2, strategy=SimpleNamespace(all_gather=lambda flat: stacked)), ranks[0], checkpoint)
    assert checkpoint[RANK_STATS]["names"][:2] == ["1.running_mean", "1.running_var"]
    for rank, expected in enumerate(ranks):
        resumed = network(0.5)  # every rank loads rank 0's state dict
        RankBatchNormStats().on_load_checkpoint(SimpleNamespace(world_size=2, global_rank=rank), resumed, checkpoint)
        assert all(torch.equal(a, b) for a, b in zip(resumed.buffers(), expected.buffers()))
    other_world = network(0.5)  # resumed on 4 ranks: rank 0's statistics stay
    RankBatchNormStats().on_load_checkpoint(SimpleNamespace(world_size=4, global_rank=1), other_world, checkpoint)
    assert float(other_world[1].running_mean[0]) == 0.5


# -- real processes ---------------------------------------------------------------------------------
def _train(run_dir: Path, data_root: Path, *extra: str,
           launcher: tuple[str, ...] = ("-m", "mcl_lightning.train")) -> subprocess.Popen:
    """Started in the background; its output goes to <run_dir>.out / .err (files: a pipe nobody
    reads while the test waits could fill up and block the ranks)."""
    command = [sys.executable, *launcher, "trainer=ddp_cpu", *KILL_RUN, f"data.root={data_root}",
               f"hydra.run.dir={run_dir}", *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.out", "w") as out, open(f"{run_dir}.err", "w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, text=True, env=ENV)


def _output(run_dir: Path) -> tuple[str, str]:
    return Path(f"{run_dir}.out").read_text(), Path(f"{run_dir}.err").read_text()


def _torchrun(*target: str) -> tuple[str, ...]:
    return ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1", *target)


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of ``rank`` among ``parent``'s children: torchrun's workers carry RANK, the ranks that
    Lightning's launcher starts carry LOCAL_RANK (the launcher itself is rank 0)."""
    for pid in child_pids(parent):
        env = process_env(pid)
        if env.get("RANK", env.get("LOCAL_RANK")) == str(rank):
            return pid
    raise AssertionError(f"no rank {rank} among the children of {parent}")


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_rank_killed_mid_epoch_ends_the_job_with_one_line_and_a_failed_results_json(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, data_root, f"trainer.strategy.timeout_s={TIMEOUT_S}")
    try:
        wait_for_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt", 2)  # epoch 0 has 8 steps
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        returncode = proc.wait(timeout=TIMEOUT_S + 30)
        took = time.monotonic() - killed
    finally:
        _stop(proc)
    stderr = _output(run_dir)[1]
    assert returncode == 1, stderr[-3000:]  # rank 0's own exit, before the launcher's kill
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: DDP rank 0 of 2: lost rank 1 at epoch 0, step "), errors
    assert "Traceback" not in stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["failure"]["lost_rank"] == 1
    assert results["failure"]["error"] == "lost_rank" and "lost rank 1" in results["failure"]["message"]
    assert torch.load(results["checkpoints"]["last"], weights_only=True)["global_step"] >= 2
    print(f"rank 0 exited {took:.1f} s after rank 1 was killed")


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_after_the_timeout(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, data_root, f"trainer.strategy.timeout_s={TIMEOUT_S}")
    rank1 = None
    try:
        wait_for_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt", 2)
        rank1 = _rank_pid(proc.pid, 1)
        os.kill(rank1, signal.SIGSTOP)  # alive, connections open, silent: only the timeout can end the wait
        stopped = time.monotonic()
        returncode = proc.wait(timeout=TIMEOUT_S + 30)
        took = time.monotonic() - stopped
    finally:
        _stop(proc)
        if rank1 is not None:
            os.kill(rank1, signal.SIGKILL)
    stderr = _output(run_dir)[1]
    assert returncode == 1, stderr[-3000:]
    assert f"error: DDP rank 0 of 2: rank 1 did not answer within trainer.strategy.timeout_s={TIMEOUT_S} s" in stderr
    assert TIMEOUT_S - 1 <= took <= TIMEOUT_S + 30
    assert json.loads((run_dir / "results.json").read_text())["failure"]["error"] == "rank_timeout"
    print(f"rank 0 exited {took:.1f} s after rank 1 stopped (timeout {TIMEOUT_S} s)")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> Path:
    """The 2-rank run that the interrupted ones must equal (Lightning's own launcher)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _train(run_dir, data_root)
    assert proc.wait(timeout=900) == 0, _output(run_dir)[1][-3000:]
    return run_dir


def _assert_same_final_state(expected_dir: Path, run_dir: Path) -> dict[str, float]:
    """Bit for bit: weights, heads and banks, optimizer state, validation history, results; returns
    the largest absolute difference per kind (all 0.0)."""
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for d in (expected_dir, run_dir))
    assert a["global_step"] == b["global_step"] == 16 and a["state_dict"].keys() == b["state_dict"].keys()
    worst = {"weights": 0.0, "banks": 0.0, "momentum": 0.0}
    for key, value in a["state_dict"].items():
        if value.is_floating_point():
            kind = "banks" if "memory_bank" in key else "weights"
            worst[kind] = max(worst[kind], float((value - b["state_dict"][key]).abs().max()))
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        worst["momentum"] = max(worst["momentum"], float((sa["momentum_buffer"] - sb["momentum_buffer"]).abs().max()))
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # each rank's own BatchNorm statistics (rank 1's are not in the state dict)
    assert torch.equal(a[RANK_STATS]["values"], b[RANK_STATS]["values"]) and a[RANK_STATS]["values"].shape[0] == 2
    assert a["val_history"] == b["val_history"] and len(a["val_history"]) == 2
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (expected_dir, run_dir))
    assert ra["final"] == rb["final"] and ra["test"] == rb["test"] and rb["status"] == "finished"
    return worst


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_as_an_uninterrupted_run(tmp_path, data_root, uninterrupted):
    run_dir = tmp_path / "elastic"
    agent = _train(run_dir, data_root, "ckpt_path=last", launcher=_torchrun("-m", "mcl_lightning.train"))
    try:
        state = wait_for_checkpoint(agent, run_dir / "checkpoints" / "last.ckpt", 2)
        os.kill(_rank_pid(agent.pid, 1), signal.SIGKILL)
        agent.wait(timeout=900)
    finally:
        _stop(agent)
    stdout, stderr = _output(run_dir)
    assert agent.returncode == 0, stderr[-3000:]
    assert 2 <= state["global_step"] < 8  # killed mid-epoch 0, after a step checkpoint
    assert stdout.count("starting a new run") == 1 and stdout.count(f"resuming from: {run_dir / 'checkpoints' / 'last.ckpt'}") == 1
    worst = _assert_same_final_state(uninterrupted, run_dir)
    print(f"killed after the step-{state['global_step']} checkpoint; largest differences: {worst}")


@pytest.mark.slow
def test_a_writer_killed_mid_checkpoint_leaves_the_previous_one_which_the_restart_resumes(tmp_path, data_root,
                                                                                          uninterrupted):
    run_dir = tmp_path / "killed_writer"
    folder = run_dir / "checkpoints"
    agent = _train(run_dir, data_root, "ckpt_path=last", launcher=_torchrun(str(HERE / "ddp_slow_writer.py")))
    try:
        previous = wait_for_checkpoint(agent, folder / "last.ckpt", 2)
        deadline = time.monotonic() + 600
        while not list(folder.glob(".last.ckpt.*.tmp")) and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.02)  # the next write has begun (it takes 4 s)
        partial = list(folder.glob(".last.ckpt.*.tmp"))
        os.kill(_rank_pid(agent.pid, 0), signal.SIGKILL)  # rank 0 is the writer
        assert len(partial) == 1 and partial[0].exists(), partial
        with pytest.raises(Exception):  # the cut-off write is not a checkpoint ...
            torch.load(partial[0], weights_only=True)
        left = torch.load(folder / "last.ckpt", weights_only=True)  # ... and last.ckpt is the previous one, whole
        assert left["global_step"] == previous["global_step"]
        agent.wait(timeout=900)
    finally:
        _stop(agent)
    stdout, stderr = _output(run_dir)
    assert agent.returncode == 0, stderr[-3000:]
    assert stdout.count("resuming from:") == 1 and not list(folder.glob("*.tmp"))  # resumed; the temporary removed
    _assert_same_final_state(uninterrupted, run_dir)
