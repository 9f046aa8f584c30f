"""An Optuna sweep's trials as one table (``python -m mcl_lightning.report <sweep folder>`` picks it).

    python -m mcl_lightning.train -m hparams_search=mcl_okd data.val_split=5000
    python -m mcl_lightning.report multirun/<date>/<time>

One row per trial (the job folders ``0/``, ``1/``, ...): the sampled values, the objective (the
deployed peer's holdout top-1 at the final epoch, what the entry point returns to the sweeper) and
that peer's test top-1 for reference; the best trial by the sweep's direction is marked.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mcl_lightning.core.errors import UserError, one_line
from mcl_lightning.core.outputs import check_output_file
from mcl_lightning.runtime.results import objective, read_results


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception as error:  # damaged: a parser error, not a bug here
        raise UserError(f"{path} cannot be read ({one_line(error)}); "
                        "repair or remove that job folder") from None


def optuna_sweeper(root: Path) -> dict[str, Any] | None:
    """The Optuna sweeper's config (direction, params) if ``root``'s jobs ran under it, else None."""
    for hydra_yaml in sorted(Path(root).glob("*/.hydra/hydra.yaml")):
        sweeper = OmegaConf.to_container(_load_yaml(hydra_yaml).hydra.sweeper, resolve=False)
        return sweeper if "optuna" in str(sweeper.get("_target_", "")).lower() else None
    return None


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    lines = OmegaConf.to_container(_load_yaml(path)) if path.is_file() else []
    return dict(str(line).split("=", 1) for line in lines if "=" in str(line))


def trial_rows(root: Path, sweeper: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(searched keys, one row per trial folder, in trial order, the best one with ``best=True``)."""
    jobs = sorted((p for p in Path(root).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    overrides = {job: _overrides(job) for job in jobs}
    keys = set((sweeper.get("params") or {}))  # the configured space, plus values the trials do not share
    keys |= {k for o in overrides.values() for k in o if len({str(v.get(k)) for v in overrides.values()}) > 1}
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"trial": int(job.name), "params": {k: overrides[job].get(k) for k in sorted(keys)},
                               "objective": None, "test": None, "status": "unfinished", "path": str(job), "best": False}
        results_path = job / "results.json"
        if results_path.is_file():
            results = read_results(results_path, required=("peers",))
            row["status"] = results.get("status", "finished")
            if row["status"] == "finished":
                row["objective"] = objective(results)
                row["test"] = (results.get("test") or {}).get(f"peer{int(results['peers']) - 1}", {}).get("top1")
        rows.append(row)
    scored = [r for r in rows if r["objective"] is not None and not math.isnan(r["objective"])]
    if scored:
        pick = min if str(sweeper.get("direction", "minimize")).lower().startswith("min") else max
        pick(scored, key=lambda r: r["objective"])["best"] = True
    return sorted(keys), rows


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def to_markdown(keys: list[str], rows: list[dict[str, Any]], direction: str) -> str:
    header = ["trial", *keys, "holdout top-1 (objective)", "test top-1", "status", "best"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [str(row["trial"]), *[str(row["params"][k]) for k in keys], _pct(row["objective"]),
                 _pct(row["test"]), row["status"], "**best**" if row["best"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", f"Optuna sweep, {direction}: the deployed (last) peer's top-1 (%) on the holdout "
                                  "at the final epoch; test top-1 for reference only (never selected on)."])


def write_csv(keys: list[str], rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", *keys, "objective", "test_top1", "status", "best", "path"])
        for row in rows:
            writer.writerow([row["trial"], *[row["params"][k] for k in keys], row["objective"], row["test"],
                             row["status"], row["best"], row["path"]])


def sweep_report(root: str | Path, sweeper: dict[str, Any], out: str | Path | None = None) -> tuple[list[dict], Path, Path]:
    """The trials table for an Optuna sweep folder; writes ``<out>.md`` and ``<out>.csv`` (default ``<root>/report``)."""
    keys, rows = trial_rows(Path(root), sweeper)
    stem = Path(out) if out is not None else Path(root) / "report"
    check_output_file(stem, "--out")  # also makes its folder
    md, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text(to_markdown(keys, rows, str(sweeper.get("direction", "minimize"))) + "\n")
    write_csv(keys, rows, csv_path)
    return rows, md, csv_path
