"""One table's measurements: the data path, memory, then the rows interleaved over repeats."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from typing import Any, Callable

from mcl_lightning.tools.bench.data_path import data_path
from mcl_lightning.tools.bench.memory import contrastive_memory
from mcl_lightning.tools.bench.profile import profile_row, profile_rows
from mcl_lightning.tools.bench.runs import Bench
from mcl_lightning.tools.bench.settings import Settings, row_specs, table_settings
from mcl_lightning.tools.bench.tables import check_targets
from mcl_lightning.tools.bench.timing import PeakMemory, Run
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.data import CIFARDataModule


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
            data_runs[label].append(data_path(bench, k, n))
    for label, _ in data_rows:
        results["data_path"].append({"name": label, "images_per_s": statistics.median(data_runs[label]),
                                     "images_per_s_runs": data_runs[label]})
    if settings.memory_k:
        try:
            results["contrastive_memory"] = contrastive_memory(settings, dm)
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
            except Exception as error:  # noqa: BLE001  a row that breaks: reported as failed, the others go on
                failed[row.label] = row_failed(results, row.label, error, log)
        repeat_seconds.append(time.monotonic() - started)
        log(f"  repeat {repeat + 1}: {repeat_seconds[-1]:.0f} s")
    results["repeats_done"] = len(repeat_seconds)
    # A closing floor run: each row's ratio uses the floor interpolated between the runs before and
    # after it (by its position in the repeat), so a machine getting busier or quieter during a
    # repeat does not favour the rows that ran late.
    if floor_row.label not in failed:
        try:
            runs[floor_row.label].append(bench.run_plain(floor_row))
        except Exception as error:  # noqa: BLE001
            failed[floor_row.label] = row_failed(results, floor_row.label + " (closing run)", error, log)

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
            "ratio_to_floor": statistics.median(ratios) if ratios else None,  # None: the floor failed
            "images_per_s_runs": [images / s for s in seconds],
            "ratio_to_floor_runs": ratios,
            # the same ratio in process CPU time: what each step costs, whatever else the machine runs
            "ratio_to_floor_cpu_time": statistics.median(cpu_ratios) if cpu_ratios else None,
            "ratio_to_floor_cpu_time_runs": cpu_ratios,
            "peak_memory_bytes": max(peaks) if peaks else None,
            "peak_memory_kind": PeakMemory(device).kind,
        }
        if syncs[row.label]:
            entry["host_syncs_in_timed_steps"] = max(syncs[row.label])
        warmups = [run.warmup_s for run in runs[row.label] if run.warmup_s is not None]
        if warmups:
            entry["warmup_s_runs"] = warmups
            if settings.perf().compile_mode is not None:  # the first run compiles; later ones reuse its graphs
                entry["compile_s"] = warmups[0]
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
        wanted = [r for r in rows if r.label in profile_rows(profile, results)]
        results["profiles"] = []
        for row in wanted:
            if time.monotonic() > deadline:
                log("  time budget: no profile")
                break
            results["profiles"].append(profile_row(bench, row))
    return results


def row_failed(results: dict[str, Any], label: str, error: Exception, log: Callable[[str], None]) -> str:
    """Record a row that raised in ``results["failed"]`` (its error and traceback's last lines); the error."""
    message = f"{type(error).__name__}: {error}"
    log(f"  row {label} FAILED: {message}\n{traceback.format_exc()}")
    results.setdefault("failed", []).append({"name": label, "error": message,
                                             "traceback": traceback.format_exc().splitlines()[-8:]})
    return message


def compile_counters() -> dict[str, Any]:
    """torch.compile's own counters (graph breaks, recompilations, CUDA-graph skips) so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return {}
    return {group: dict(values) for group, values in counters.items() if values}

