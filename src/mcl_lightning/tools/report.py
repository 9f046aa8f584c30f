"""Compare runs: one table from every results.json below a run or sweep directory.

    python -m mcl_lightning.report multirun/2026-11-26/12-00-00
    python -m mcl_lightning.report outputs/ --out comparison   # writes comparison.md / comparison.csv
    python -m mcl_lightning.report --curves multirun/2026-11-26/12-00-00   # curves.png in every run

An Optuna sweep folder (hydra/sweeper=optuna) gives one row per trial instead (``sweep_report.py``).

Runs that differ only in their seed are one row: mean ± sample std (n) of top-1 for the deployed
peer (the last one, which ``mcl_lightning.export`` exports by default), the peer mean and the
method's ensemble, at the final epoch and at the best epoch (the epoch of the best checkpoint, which
is selected on the test set when validation is the test set: marked ``best*``). Settings that vary
between rows (beyond method, backbone and peers) are listed in the row. Published numbers, where an
``experiment=`` carried them, stand beside the row as top-1 accuracy. Each row also gives the mean
wall time per run and the machines its runs ran on (results.json ``wall_time_s`` and ``machine``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from mcl_lightning.core.errors import UserError
from mcl_lightning.core.outputs import check_output_file
from mcl_lightning.runtime.results import read_results
from mcl_lightning.tools.sweep_report import optuna_sweeper, sweep_report

# Config keys that say where or how often, not what was trained: never part of a row's identity.
IGNORED_KEYS = ("seed", "ckpt_path", "data.root", "data.num_workers", "data.download", "trainer.enable_progress_bar",
                "trainer.log_every_n_steps", "reference", "logger",
                "checkpoint.every_n_steps",
                # the default callbacks record and save, they do not change training (an added one, such as
                # early stopping or SWA, does: it stays part of the identity)
                *(f"callbacks.{name}" for name in ("non_finite_guard", "rank_batchnorm_stats", "lr_monitor",
                                                   "best_checkpoint", "last_checkpoint", "throughput", "history",
                                                   "progress_bar", "probe_window")))
# Interpolated copies of the named columns: listing them as settings would repeat those columns.
DERIVED_KEYS = ("model.peers", "model.backbone", "backbone.name", "model.topology",
                *(f"optim.optimizer.{k}" for k in ("lr", "momentum", "weight_decay", "nesterov", "betas")),
                *(f"optim.lr_scheduler.{k}" for k in ("kind", "max_epochs", "milestones", "gamma", "warmup_epochs")))
GROUPS = (("deployed", "deployed peer"), ("peer_mean", "peer mean"), ("ensemble", "ensemble"))
WHEN = (("final", "final"), ("best", "best"))


def find_results(root: str | Path) -> list[Path]:
    """Every results.json at or below ``root``, sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"{root} does not exist; pass a run directory (outputs/<date>/<time>) or a sweep (multirun/...)")
    return sorted(root.rglob("results.json"))


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(config) if isinstance(config, list) else config}


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)}


def deployed_top1(section: dict[str, dict[str, float]], peers: int) -> float | None:
    """Top-1 of the last peer (the deployed one) in a final/best section."""
    return section.get(f"peer{peers - 1}", {}).get("top1")


def run_values(results: dict[str, Any]) -> dict[str, float | None]:
    """``{"deployed/final": top1, ...}`` for one run, as fractions."""
    values: dict[str, float | None] = {}
    for when, _ in WHEN:
        section = results.get(when) or {}
        values[f"deployed/{when}"] = deployed_top1(section, int(results["peers"]))
        for group in ("peer_mean", "ensemble"):
            values[f"{group}/{when}"] = section.get(group, {}).get("top1")
    return values


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None for n < 2) and n of the values present."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std, len(xs)


def summarise_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per configuration (runs differing only in seed pooled), with per-metric statistics."""
    groups: dict[str, dict[str, Any]] = {}
    for path in paths:
        results = read_results(path)
        identity = _identity(results.get("config") or {})
        identity.update(method=results["method"], backbone=results["backbone"], peers=results["peers"])
        for derived in DERIVED_KEYS:  # copies of the columns above (``${peers}`` etc.), or the method's default
            identity.pop(derived, None)
        if results.get("topology"):
            identity["topology"] = results["topology"]  # the one the run used (config null = the method's own)
        key = json.dumps(identity, sort_keys=True, default=str)
        group = groups.setdefault(key, {"identity": identity, "runs": [], "paths": []})
        group["runs"].append(results)
        group["paths"].append(str(path))
    rows = []
    for group in groups.values():
        runs = group["runs"]
        first = runs[0]
        row: dict[str, Any] = {
            "method": first["method"], "backbone": first["backbone"], "peers": first["peers"],
            "settings": " ".join(f"{k}={group['identity'].get(k)}" for k in varying_settings(groups, group)),
            "seeds": sorted(r.get("seed") for r in runs),
            "epochs": sorted({r.get("epochs_run") for r in runs}),
            "test_selected": any(r.get("selection") == "test-selected" for r in runs),
            "paths": group["paths"],
        }
        per_run = [run_values(r) for r in runs]
        for name in per_run[0]:
            row[name] = mean_std(v[name] for v in per_run)
        row["wall_time_min"] = mean_std(r["wall_time_s"] / 60 if r.get("wall_time_s") is not None else None
                                        for r in runs)
        row["machines"] = sorted({describe_machine(r["machine"]) for r in runs if r.get("machine")})
        row["published"] = published(first.get("reference"))
        rows.append(row)
    rows.sort(key=lambda r: (r["backbone"], r["peers"], r["method"], r["settings"]))
    return rows


def varying_settings(groups: dict[str, dict[str, Any]], group: dict[str, Any]) -> list[str]:
    """The settings that tell ``group``'s row apart: keys that differ between rows of the same method,
    and keys outside ``method.`` that differ between any rows (different methods' options are not
    listed: the method column already says they differ)."""
    def differs(keys: set[str], among: list[dict[str, Any]]) -> list[str]:
        return sorted(k for k in keys if len({str(g["identity"].get(k)) for g in among}) > 1)

    named = {"method", "backbone", "peers"}
    everyone = list(groups.values())
    same_method = [g for g in everyone if g["identity"]["method"] == group["identity"]["method"]]
    keys = {k for g in everyone for k in g["identity"]} - named
    listed = set(differs(keys, same_method)) | {k for k in differs(keys, everyone) if not k.startswith("method.")}
    return sorted(listed)


def describe_machine(machine: dict[str, Any]) -> str:
    """"<cpu>, <n> thread(s)" on a CPU; the accelerator's name otherwise."""
    if machine.get("accelerator", "cpu") != "cpu":
        return str(machine["accelerator"])
    threads = machine.get("torch_threads")
    return f"{machine.get('cpu', '?')}, {threads} thread{'s' if threads != 1 else ''}"


def published(reference: dict[str, Any] | None) -> dict[str, float]:
    """Published top-1 accuracy (%) from a results.json ``reference`` (errors converted)."""
    if not reference:
        return {}
    out: dict[str, float] = {}
    for name, value in (reference.get("top1_error") or {}).items():
        out[name] = round(100.0 - float(value), 2)
    for key in ("top1", "top1_accuracy"):
        for name, value in (reference.get(key) or {}).items():
            if not name.endswith("_std"):  # spreads stay in results.json; the table shows means
                out[name] = float(value)
    baseline = reference.get("baseline_top1_error")
    if isinstance(baseline, (int, float)):
        out["baseline"] = round(100.0 - float(baseline), 2)
    accuracy = reference.get("baseline_top1_accuracy")
    if isinstance(accuracy, dict) and "peer" in accuracy:
        out["baseline"] = float(accuracy["peer"])
    return out


def _cell(stat: tuple[float | None, float | None, int]) -> str:
    mean, std, n = stat
    if mean is None:
        return "-"
    text = f"{100 * mean:.2f}"
    return f"{text} ± {100 * std:.2f} ({n})" if std is not None else f"{text} ({n})"


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, header) pairs; ``best*`` marks test-selected best epochs."""
    star = "*" if any(r["test_selected"] for r in rows) else ""
    cols = [(f"{group}/{when}", f"{label} {title}{star if when == 'best' else ''}")
            for group, label in GROUPS for when, title in WHEN]
    return cols


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    header = ["method", "backbone", "peers", "settings", "epochs", *[h for _, h in cols], "wall time (min)",
              "published"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    machines: list[str] = []
    for row in rows:
        pub = ", ".join(f"{k} {v:.2f}" for k, v in row["published"].items()) or "-"
        mean, std, n = row["wall_time_min"]
        wall = "-" if mean is None else f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "") + f" ({n})"
        marks = []
        for machine in row["machines"]:
            if machine not in machines:
                machines.append(machine)
            marks.append(f"[m{machines.index(machine) + 1}]")
        cells = [row["method"], row["backbone"], str(row["peers"]), row["settings"] or "-",
                 ",".join(map(str, row["epochs"])), *[_cell(row[k]) for k, _ in cols],
                 wall + (" " + " ".join(marks) if marks else ""), pub]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Top-1 accuracy (%), mean ± sample std (n seeds). Deployed peer = the last peer."]
    notes += [f"[m{i + 1}] {machine}" for i, machine in enumerate(machines)]
    if any(r["test_selected"] for r in rows):
        notes.append("best* = the epoch with the best single-peer top-1 on the validation set, which is the "
                     "test set here (test-selected, as the reference reports); final = the last epoch.")
    return "\n".join(lines + notes)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = columns(rows)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["method", "backbone", "peers", "settings", "epochs", "seeds"]
        for key, _ in cols:
            header += [f"{key}/mean", f"{key}/std", f"{key}/n"]
        writer.writerow(header + ["wall_time_min/mean", "wall_time_min/std", "machines", "published", "test_selected"])
        for row in rows:
            cells: list[Any] = [row["method"], row["backbone"], row["peers"], row["settings"],
                                " ".join(map(str, row["epochs"])), " ".join(map(str, row["seeds"]))]
            for key, _ in cols:
                mean, std, n = row[key]
                cells += [_pct(mean), _pct(std), n]
            wall_mean, wall_std, _ = row["wall_time_min"]
            cells += ["" if wall_mean is None else f"{wall_mean:.2f}", "" if wall_std is None else f"{wall_std:.2f}",
                      "; ".join(row["machines"])]
            writer.writerow(cells + [json.dumps(row["published"]), row["test_selected"]])


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.4f}"


def report(root: str | Path, out: str | Path | None = None) -> tuple[list[dict[str, Any]], Path, Path]:
    """Build the table for ``root``; writes ``<out>.md`` and ``<out>.csv`` (default ``<root>/report``)."""
    paths = find_results(root)
    if not paths:
        raise UserError(f"no results.json below {root}; point at a finished run or sweep directory")
    rows = summarise_runs(paths)
    stem = Path(out) if out is not None else (Path(root) if Path(root).is_dir() else Path(root).parent) / "report"
    check_output_file(stem, "--out")  # also makes its folder
    md, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text(to_markdown(rows) + "\n")
    write_csv(rows, csv_path)
    return rows, md, csv_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a run directory, a sweep directory, or a results.json")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: <root>/report)")
    parser.add_argument("--curves", action="store_true",
                        help="write curves.png (top-1 and loss terms per epoch) in every run below root instead")
    args = parser.parse_args(argv)
    try:
        if args.curves:
            from mcl_lightning.tools.curves import plot_all

            for path in plot_all(args.root):
                print(path)
            return
        sweeper = optuna_sweeper(args.root) if args.root.is_dir() else None
        if sweeper is not None:  # an Optuna sweep: one row per trial, the best marked
            rows, md, csv_path = sweep_report(args.root, sweeper, args.out)
            print(md.read_text(), end="")
            print(f"\n{len(rows)} trials -> {md}, {csv_path}")
            return
        rows, md, csv_path = report(args.root, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(md.read_text(), end="")
    print(f"\n{sum(len(r['paths']) for r in rows)} runs in {len(rows)} rows -> {md}, {csv_path}")


if __name__ == "__main__":
    main()
