"""The study's concurrency probe: how fast the matrix's recipes train alone and sharing the device.

* Level 1 runs each recipe alone, one after another; level c runs c jobs at once, the recipes in turn
  (``study.probe_slots``). Every job is timed over the same window as the others of its level
  (``tools.probe_window``): ``steps`` steps after a barrier that all c jobs reach first.
* The concurrency gain compares like with like: the total images/s of level c's jobs against the same
  jobs run one at a time at level 1's speeds (each training the same number of images).
* By default (``levels=None``) only the levels that can change the plan are probed: 1, and the largest
  that fits the device's memory (level 1's peak memory per job) and has runs to fill it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mcl_lightning.tools.multirun import StudyFailed, merged, multirun, read_runs
from mcl_lightning.tools.study import probe_slots

# What a probe job changes: no validation, a one-batch test, a flat learning rate; it stops itself
# once its level's window is measured (trainer.max_steps and max_time: only a safety net).
PROBE = ["trainer.max_epochs=-1", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=0",
         "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "optim.scheduler=constant", "seed=0"]
WARMUP = 5  # untimed steps before the barrier (cuDNN autotuning, allocator)
CUDA_CONTEXT_BYTES = 600 << 20  # per process, on top of what PyTorch's allocator reserves


def max_time(seconds: float) -> str:
    """``trainer.max_time`` as an override of Lightning's "DD:HH:MM:SS" (at least 1 s)."""
    s = max(int(seconds), 1)
    return f"++trainer.max_time='{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}'"


def probe_level(out: Path, concurrency: int, experiments: list[str], overrides: list[str], steps: int,
                cap_s: float) -> dict[str, Any]:
    """One probe level: its jobs' images/s over their common window, the total and its gain."""
    slots = list(experiments) if concurrency == 1 else probe_slots(experiments, concurrency)
    folder = out / "probe" / f"c{concurrency}"
    window = ["++callbacks.throughput._target_=mcl_lightning.callbacks.TrainThroughput",  # read below, even if removed
              "+callbacks.probe_window._target_=mcl_lightning.tools.probe_window.ProbeWindow",
              f"+callbacks.probe_window.dir={folder.with_suffix('.window')}", f"+callbacks.probe_window.jobs={concurrency}",
              f"+callbacks.probe_window.steps={steps}", f"+callbacks.probe_window.warmup={WARMUP}"]
    probe = merged(overrides, [f"trainer.max_steps={WARMUP + 50 * steps}", *PROBE, *window, max_time(cap_s)])
    rc = multirun(folder, folder.with_suffix(".log"), concurrency, [f"experiment={','.join(slots)}"], probe,
                  f"probe c={concurrency}", len(slots))
    jobs, finished = [], read_runs(folder)
    for slot, results in [(slot, finished[i]) for i, slot in enumerate(slots) if i in finished]:
        t, w = results.get("throughput") or {}, results.get("probe_window") or {}
        jobs.append({"experiment": slot, "images_per_s": w.get("images_per_s"), "timed_steps": w.get("timed_steps"),
                     "overlapped": w.get("overlapped"), "waited_s": w.get("waited_s"),
                     "peak_memory_bytes": w.get("peak_memory_bytes"),
                     "startup_s": round((results.get("wall_time_s") or 0) - (w.get("train_s") or 0), 1),
                     "train_dataset_size": t.get("train_dataset_size"), "val_dataset_size": t.get("val_dataset_size")})
    ok = rc == 0 and len(jobs) == len(slots) and all(j["images_per_s"] for j in jobs)
    level: dict[str, Any] = {"concurrency": concurrency, "jobs": jobs, "ok": ok, "log": str(folder.with_suffix(".log"))}
    if ok:
        level["overlapped"] = all(j["overlapped"] for j in jobs)
        level["total_images_per_s"] = round(one_at_a_time(solo_speeds(level), slots) if concurrency == 1
                                            else sum(j["images_per_s"] for j in jobs), 1)
    return level


def solo_speeds(level1: dict[str, Any]) -> dict[str, float]:
    return {j["experiment"]: j["images_per_s"] for j in level1["jobs"]}


def one_at_a_time(solo: dict[str, float], mix: list[str]) -> float:
    """Images/s of the jobs ``mix`` run one after another, each training the same number of images."""
    return len(mix) / sum(1 / solo[e] for e in mix)


def concurrency_gain(level1: dict[str, Any], level: dict[str, Any]) -> float | None:
    """Level ``level``'s total images/s over the same mix of recipes run one at a time (level 1)."""
    if not (level1.get("ok") and level.get("ok")):
        return None
    mix = [j["experiment"] for j in level["jobs"]]
    return round(level["total_images_per_s"] / one_at_a_time(solo_speeds(level1), mix), 3)


def largest_fitting(level1: dict[str, Any], most: int, device_bytes: int | None) -> int:
    """The most concurrent jobs (<= ``most``) whose peak memory, as level 1 measured it, fits the device."""
    peaks = [j["peak_memory_bytes"] for j in level1["jobs"] if j.get("peak_memory_bytes")]
    if not device_bytes or not peaks:
        return most
    return max(1, min(most, int(0.9 * device_bytes // (max(peaks) + CUDA_CONTEXT_BYTES))))


def probe_all(out: Path, levels: list[int] | None, experiments: list[str], overrides: list[str], steps: int,
              runs_total: int, cap_s: Callable[[], float], device_bytes: int | None,
              on_level: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Level 1 (it must succeed), then the other levels: ``levels``, or the largest that fits."""
    most = max(runs_total, len(experiments))
    done = [probe_level(out, 1, experiments, overrides, steps, cap_s())]
    on_level(done)
    report(done[0])
    if not done[0]["ok"]:
        raise StudyFailed(f"the probe of each recipe alone failed; its log: {done[0]['log']}")
    wanted = [c for c in levels if 1 < c <= most] if levels else [largest_fitting(done[0], most, device_bytes)]
    for c in [c for c in wanted if c > 1]:
        level = probe_level(out, c, experiments, overrides, steps, cap_s())
        level["concurrency_gain"] = concurrency_gain(done[0], level)
        done.append(level)
        on_level(done)
        report(level)
    return done


def report(level: dict[str, Any]) -> None:
    c = level["concurrency"]
    if not level["ok"]:
        print(f"probe c={c}: failed (see {level['log']})", flush=True)
        return
    gain = f", {level['concurrency_gain']:.2f}x the same recipes one at a time" if level.get("concurrency_gain") else ""
    alone = " (each recipe alone, one after another)" if c == 1 else ""
    lag = "" if level["overlapped"] else "; some jobs never overlapped (one failed to start?)"
    print(f"probe c={c}: {level['total_images_per_s']:.0f} images/s in all{alone}{gain}{lag}", flush=True)
