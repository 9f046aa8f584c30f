"""gpu_evidence as a short GPU slot needs it: mistakes found in seconds, a few files at the top of --out,
and a readable summary whatever moment the command is killed at."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import pytest

from mcl_lightning.tools import gpu_evidence
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.tools import evidence, probe
from mcl_lightning.runtime.results import max_time_stopped

from test_entry_points import reencoded_root  # noqa: F401  (the fixture)

TINY_BENCH = "--rows independent --plain '' --steps 1 --warmup 1 --data-batches 1 --data-k '' --memory-k 0"
TINY_RUNS = ["trainer=cpu", "backbone=resnet8", "data.check_integrity=false", "trainer.limit_train_batches=2",
             "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def test_exclusive_compute_modes_stop_a_concurrent_study():
    smi = {"gpus": [{"name": "NVIDIA H100", "compute_mode": "Exclusive_Process", "memory_total": "81559 MiB"}]}
    assert "Exclusive_Process compute mode" in evidence.compute_mode_problem(smi, concurrent=True)
    assert evidence.compute_mode_problem(smi, concurrent=False) is None  # one process at a time is fine
    assert evidence.compute_mode_problem({"gpus": [{**smi["gpus"][0], "compute_mode": "Default"}]}, True) is None
    assert "Prohibited" in evidence.compute_mode_problem({"gpus": [{**smi["gpus"][0], "compute_mode": "Prohibited"}]}, False)
    assert evidence.compute_mode_problem({"error": "no nvidia-smi"}, True) is None  # CUDA's own check decides then


def test_setup_refuses_exclusive_mode_and_records_the_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_evidence, "CUDA_CHECK", "print('NVIDIA H100 80GB HBM3')")  # CUDA usable, as on the slot
    monkeypatch.setattr(gpu_evidence.reproduce, "check_recipes", lambda study: None)
    monkeypatch.setattr(gpu_evidence, "nvidia_smi", lambda: {"gpus": [
        {"name": "NVIDIA H100 80GB HBM3", "compute_mode": "Exclusive_Process", "memory_total": "81559 MiB"}]})
    args = gpu_evidence.parse_args(["--out", str(tmp_path / "ev"), "data.root=/"])
    _, _, study = gpu_evidence.check_args(args)
    with pytest.raises(ConfigError, match="Exclusive_Process compute mode.*nvidia-smi -c DEFAULT"):
        gpu_evidence.check_setup(args, study)
    monkeypatch.setattr(gpu_evidence, "nvidia_smi", lambda: {"gpus": [
        {"name": "NVIDIA H100 80GB HBM3", "compute_mode": "Default", "memory_total": "81559 MiB"}]})
    setup = gpu_evidence.check_setup(args, study)
    assert setup["cuda_device"] == "NVIDIA H100 80GB HBM3"
    assert setup["nvidia_smi"]["gpus"][0]["compute_mode"] == "Default"


def test_no_cuda_is_one_line_in_seconds_before_any_phase(reencoded_root, tmp_path):  # noqa: F811
    """On this CPU-only machine --device cuda is the mistake: found by the setup check, not by the benchmark."""
    out = tmp_path / "ev"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mcl_lightning.gpu_evidence", "--out", str(out), "--device", "cuda",
                           f"data.root={reencoded_root}", *TINY_RUNS], capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --device cuda: CUDA is not usable here") and "--device cpu" in line
    assert not out.exists() and "mcl_lightning.bench" not in proc.stdout
    assert seconds < 30, seconds  # the bound for a setup mistake (Python start-up included)


def test_the_archive_leaves_out_checkpoints_and_stays_under_its_limit(tmp_path):
    work = tmp_path / "work"
    (work / "study" / "runs" / "0" / "checkpoints").mkdir(parents=True)
    (work / "study" / "runs" / "0" / "checkpoints" / "last.ckpt").write_bytes(b"x" * 1000)
    (work / "study" / "runs" / "0" / "results.json").write_text("{}")
    (work / "bench.log").write_text("log\n")
    (work / "big.bin").write_bytes(os.urandom(300_000))  # does not compress
    packed = evidence.pack(work, tmp_path / "a.tar.gz", limit=200_000)
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        names = tar.getnames()
    assert sorted(names) == ["work/bench.log", "work/study/runs/0/results.json"]
    assert packed["left_out"] == ["big.bin"] and packed["files"] == 2


def test_probe_arithmetic():
    assert probe.max_time(330.7) == "++trainer.max_time='00:00:05:30'" and probe.max_time(-4).endswith("00:00:00:01'")
    level1 = {"ok": True, "jobs": [{"experiment": "a", "images_per_s": 100.0, "peak_memory_bytes": 4 << 30},
                                   {"experiment": "b", "images_per_s": 300.0, "peak_memory_bytes": 2 << 30}]}
    level2 = {"ok": True, "total_images_per_s": 300.0,
              "jobs": [{"experiment": "a", "images_per_s": 100.0}, {"experiment": "b", "images_per_s": 200.0}]}
    # the same two jobs one at a time: 2 / (1/100 + 1/300) = 150 images/s, so sharing gains 2x
    assert probe.one_at_a_time({"a": 100.0, "b": 300.0}, ["a", "b"]) == pytest.approx(150.0)
    assert probe.concurrency_gain(level1, level2) == 2.0
    # 80 GB: 0.9 * 80 GB / (4 GB + the CUDA context) jobs fit
    assert probe.largest_fitting(level1, 6, 80 << 30) == 6 and probe.largest_fitting(level1, 20, 80 << 30) == 15
    assert probe.largest_fitting(level1, 6, None) == 6  # no GPU: the runs there are


def test_a_run_stopped_by_max_time_says_so():
    from lightning.pytorch.callbacks import Timer

    def timed(limit_s: float, ran_s: float):
        timer = Timer(duration=timedelta(seconds=limit_s))
        timer.on_train_start(None, None)
        time.sleep(ran_s)
        timer.on_train_end(None, None)
        return type("Trainer", (), {"callbacks": [timer]})()

    assert max_time_stopped(timed(0.05, 0.1)) and not max_time_stopped(timed(60, 0.0))
    assert not max_time_stopped(type("Trainer", (), {"callbacks": []})())


@pytest.mark.slow  # about a minute: the whole command on the CPU, shrunk, killed while its study runs
def test_killed_during_the_study_leaves_a_readable_summary(reencoded_root, tmp_path):  # noqa: F811
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "mcl_lightning.gpu_evidence", "--out", str(out), "--work", str(work),
               "--minutes", "5", "--device", "cpu", "--bench-preset", "tiny", "--bench-seconds", "60",
               "--bench-args", TINY_BENCH, "--reproduce-args",
               "--experiments cifar100/baseline_resnet32 --seeds 0,1,2 --concurrency 1 --probe-steps 7",
               f"data.root={reencoded_root}", *TINY_RUNS]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            runs = (summary(out / "reproduce.json").get("study") or {}).get("runs", [])
            if runs:  # one run finished, two to go
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the command ended before a run finished"
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to write anything more
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    record = json.loads((out / "reproduce.json").read_text())
    assert record["phase"] == "study" and record["plan"]["chosen"]["epochs"] >= 1
    assert 1 <= len(record["study"]["runs"]) < 3 and record["study"]["runs"][0]["status"] == "finished"
    assert record["probe"][0]["ok"] and record["probe"][0]["jobs"][0]["overlapped"]
    ev = json.loads((out / "evidence.json").read_text())
    assert ev["bench"]["exit_status"] == 0 and ev["bench"]["tables"]["tiny"]["rows"]
    assert ev["study"]["runs"]["runs"] and ev["setup"]["seconds"] < 30
    # what the slot command runs after a kill: the archive beside the summaries, nothing else
    subprocess.run([sys.executable, "-m", "mcl_lightning.gpu_evidence", "--pack-only", "--out", str(out), "--work",
                    str(work)], check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "evidence.json", "gpu-evidence.tar.gz",
                                                     "reproduce.json"]
    packed = json.loads((out / "evidence.json").read_text())
    assert packed["phase"].startswith("killed during study")
    assert [t["target"] for t in packed["targets"]] == [t["target"] for t in record["targets"]]  # tiny: no bench target
    with tarfile.open(out / "gpu-evidence.tar.gz") as tar:
        names = tar.getnames()
    assert "work/study/runs/0/results.json" in names and "work/bench.log" in names
    assert not [n for n in names if "checkpoints" in n or n.endswith(".ckpt")]


def summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:  # not there yet; never half a file (it is replaced at once)
        return {}
