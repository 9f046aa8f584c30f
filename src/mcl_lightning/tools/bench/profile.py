"""torch.profiler's view of a row's timed steps, run the way the row runs (plain loop or Trainer)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mcl_lightning.tools.bench.runs import Bench
from mcl_lightning.tools.bench.settings import RowSpec


def profile_row(bench: Bench, row: RowSpec, steps: int = 2) -> dict[str, Any]:
    """The top entries (self time per step) over ``steps`` timed steps of ``row`` after one warm-up
    step, set-up excluded; plus the wall time per step and the part of it spent in no aten op
    (``outside_ops_ms_per_step``: Python, i.e. module dispatch and, for Lightning rows, the loop's
    hooks and ``self.log``; approximate, the profiler's own cost included)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    probe_bench = Bench(replace(bench.s, warmup=1, steps=steps), bench.dm)
    probe_bench.networks = bench.networks  # the same networks, already built
    prof = profile(activities=activities)
    run = probe_bench.run_plain(row, profiler=prof) if row.plain else probe_bench.run_lightning(row, profiler=prof)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    ops_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1000 / steps
    wall_ms = 1000 * run.wall / steps
    return {
        "row": row.label, "kind": "plain loop" if row.plain else "lightning", "wall_ms_per_step": wall_ms,
        "aten_cpu_ms_per_step": ops_ms, "outside_ops_ms_per_step": None if cuda else wall_ms - ops_ms,
        "top": [{"name": e.key, "self_ms_per_step": getattr(e, key) / 1000 / steps, "calls": e.count // steps,
                 "percent": 100 * getattr(e, key) / total} for e in events[:12]],
    }


def profile_rows(profile: str, results: dict[str, Any]) -> set[str]:
    """The rows ``--profile`` names: ``auto`` (those that miss a target) or labels separated by ';'."""
    if profile == "auto":
        return {t["row"] for t in results["targets"] if not t["met"] and t.get("row")}
    return {name.strip() for name in profile.split(";")}
