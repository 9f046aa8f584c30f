"""The issue's targets and the printed table."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from mcl_lightning.tools.bench.settings import Settings


def check_targets(s: Settings, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets that apply to these settings, met or missed and by how much."""
    rows = {r["name"]: r for r in results["rows"]}
    out: list[dict[str, Any]] = []

    def ratio(row: str, goal: float, what: str) -> None:
        if row in rows and rows[row]["ratio_to_floor"] is not None:
            value = rows[row]["ratio_to_floor"]
            out.append({"target": what, "row": row, "value": value, "goal": goal, "met": value >= goal,
                        "by": value - goal})

    issue = s.backbone == "resnet32" and s.peers == 4 and s.topology == "shared_trunk"
    if s.targets == "cpu" and issue and s.batch_size == 64 and s.precision == "32":
        ratio("mcl_okd K=256", 0.95, "MCL-OKD K=256 >= 0.95x floor")
        ratio("mcl_okd K=16384", 0.50, "MCL-OKD K=16384 >= 0.50x floor")
        ratio("independent", 0.98, "independent >= 0.98x floor")
        for entry in results["data_path"]:
            if entry["name"] == "+ negative sampling K=256":
                value = entry["images_per_s"]
                out.append({"target": "data path with negative sampling >= 20,000 images/s", "value": value,
                            "goal": 20000, "met": value >= 20000, "by": value - 20000})
    memory = results.get("contrastive_memory")
    if s.targets in ("cpu", "gpu") and memory and memory["peak_bytes"] is not None and memory["nce_k"] == 16384:
        value, goal = memory["ratio_to_reference"], memory["target_ratio"]
        out.append({"target": f"contrastive memory (B={memory['batch']}, K=16384, N={memory['peers']}) <= 1/(N-1) "
                              "of the reference's gathered tensors", "value": value, "goal": goal,
                    "met": value <= goal, "by": goal - value})
    if s.targets == "gpu" and issue and s.device.startswith("cuda"):
        if "mcl_okd K=256" in rows:
            goal = 20000 if s.batch_size == 64 else 40000 if s.batch_size == 256 else None
            if goal is not None:
                value = rows["mcl_okd K=256"]["images_per_s"]
                out.append({"target": f"MCL-OKD K=256 >= {goal} images/s at batch {s.batch_size}",
                            "row": "mcl_okd K=256", "value": value, "goal": goal, "met": value >= goal,
                            "by": value - goal})
    return out


def fused_comparison(tables: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fused independent peers against the per-peer loop (two tables of the gpu preset): images/s
    of ``independent`` through Lightning, fused over looped. The issue's target (>= 1.5x) is for one
    GPU at batch 256; elsewhere this is a comparison only."""
    names = {t["settings"]["name"]: t for t in tables}
    loop, fused = names.get("gpu_independent_loop_b256"), names.get("gpu_independent_fused_b256")
    if not (loop and fused and loop["rows"] and fused["rows"]):
        return None
    get = lambda t: {r["name"]: r["images_per_s"] for r in t["rows"]}.get("independent")  # noqa: E731
    a, b = get(loop), get(fused)
    if not a or not b:
        return None
    batch, device = fused["settings"]["batch_size"], fused["settings"]["device"]
    out = {"comparison": f"independent topology, batch {batch}, {device}: fused peers / per-peer loop",
           "value": b / a, "loop_images_per_s": a, "fused_images_per_s": b}
    if batch == 256 and device.startswith("cuda"):
        out.update(target="fused peers >= 1.5x the per-peer loop at batch 256 (one GPU)", goal=1.5,
                   met=b / a >= 1.5, by=b / a - 1.5)
    return out


# -- output -----------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def format_table(table: dict[str, Any]) -> str:
    s = table["settings"]
    lines = [
        f"[{s['name']}] {s['backbone']} x{s['peers']} {s['topology']}, batch {s['batch_size']}, precision {s['precision']}, "
        f"compile {s['compile']}, channels_last {s['channels_last']}, fused peers {s['fuse_peers']}, "
        f"data {'device-resident' if s['device_resident'] else 'loader'}; {s['steps']} timed steps after "
        f"{s['warmup']} warmup, {table['repeats_done']}/{s['repeats']} repeats, median",
        f"{'row':<34} {'images/s':>10} {'ms/step':>9} {'x floor':>8} {'(cpu t)':>8} {'x plain':>8} {'peak MB':>9}",
    ]
    def number(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    for r in table["rows"]:
        peak = r["peak_memory_bytes"]
        lines.append(
            f"{r['name']:<34} {r['images_per_s']:>10.1f} {r['ms_per_step']:>9.1f} {number(r['ratio_to_floor'], '.3f'):>8} "
            f"{number(r['ratio_to_floor_cpu_time'], '.3f'):>8} {number(r.get('ratio_to_plain_loop'), '.3f'):>8} "
            f"{'' if peak is None else f'{peak / 2**20:.0f}':>9}"
            + ("" if r.get("compile_s") is None else f"  (compiled in {r['compile_s']:.0f} s)")
        )
    for r in table["data_path"]:
        lines.append(f"{'data: ' + r['name']:<34} {r['images_per_s']:>10.0f}")
    memory = table.get("contrastive_memory")
    if memory and memory["peak_bytes"] is not None:
        lines.append(
            f"contrastive term alone (B={memory['batch']}, K={memory['nce_k']}, N={memory['peers']}, {memory['scoring']}): "
            f"peak {memory['peak_bytes'] / 2**20:.0f} MB = {memory['ratio_to_reference']:.3f} x the reference's "
            f"{memory['reference_gathered_bytes'] / 2**20:.0f} MB of gathered rows (target <= {memory['target_ratio']:.3f})"
        )
    for skipped in table["skipped"]:
        lines.append(f"skipped {skipped['name']}: {skipped['reason']}")
    for failed in table.get("failed", []):
        lines.append(f"FAILED {failed['name']}: {failed['error']}")
    for t in table["targets"]:
        lines.append(f"target {'MET ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3f} (goal {t['goal']}, by {t['by']:+.3f})")
    for p in table.get("profiles", []):
        outside = p.get("outside_ops_ms_per_step")
        lines.append(f"profile of {p['row']} ({p.get('kind', 'plain loop')}, self time per step; "
                     f"{p.get('wall_ms_per_step', float('nan')):.1f} ms/step"
                     + ("" if outside is None else f", {outside:.1f} ms outside aten ops") + "):")
        for e in p["top"]:
            lines.append(f"  {e['name'][:60]:<60} {e['self_ms_per_step']:>9.1f} ms {e['percent']:>5.1f} %")
    return "\n".join(lines)

