"""torch.profiler's view of a row's steps."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mcl_lightning.bench.runs import Bench
from mcl_lightning.bench.settings import RowSpec


def profile_plain(bench: Bench, row: RowSpec, steps: int = 2) -> list[dict[str, Any]]:
    """torch.profiler's top entries (self time per step) over ``steps`` plain-loop steps of ``row``
    (after one warm-up step, set-up excluded)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    probe = replace(bench.s, warmup=1, steps=steps)
    probe_bench = Bench(probe, bench.dm)
    probe_bench.networks = bench.networks  # the same networks, already built
    prof = profile(activities=activities)
    probe_bench.run_plain(RowSpec(row.label, row.method, row.options, plain=True), profiler=prof)
    key = "self_device_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [
        {"name": e.key, "self_ms_per_step": getattr(e, key) / 1000 / steps, "calls": e.count // steps,
         "percent": 100 * getattr(e, key) / total}
        for e in events[:12]
    ]


def profile_rows(profile: str, results: dict[str, Any]) -> set[str]:
    if profile == "auto":
        return {t["row"] for t in results["targets"] if not t["met"] and t.get("row")}
    return {name.strip() for name in profile.split(";")}

