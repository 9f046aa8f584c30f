"""curves.png of a run, from its CSV log: validation top-1 per peer, peer mean and ensemble per epoch,
training top-1 per peer, and every loss term.

    plot_run(run_dir)        # <run_dir>/curves.png
    python -m mcl_lightning.report --curves <run or sweep dir>

A resumed run appends to the same ``csv/metrics.csv``; when an epoch appears twice (logged before a
pre-emption and again after), the later row wins.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from mcl_lightning.core.errors import UserError

FIGSIZE = (15.0, 4.5)  # inches
DPI = 100  # curves.png is FIGSIZE * DPI pixels: 1500 x 450


def read_epoch_series(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """``{"val/peer0/top1": {epoch: value}, ...}`` from a Lightning CSV log (later rows win)."""
    series: dict[str, dict[int, float]] = {}
    with Path(metrics_csv).open(newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = row.get("epoch")
            if not epoch:
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    series.setdefault(key, {})[int(float(epoch))] = number
    return series


def _peer_index(key: str) -> int:
    match = re.search(r"peer(\d+)/", key)
    return int(match.group(1)) if match else -1


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``curves.png`` (default ``<run_dir>/curves.png``); returns its path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in jobs and threads

    run_dir = Path(run_dir)
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file():
        raise UserError(f"{run_dir} has no csv/metrics.csv; point at a run directory (outputs/<date>/<time>)")
    series = read_epoch_series(metrics)
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    val_ax, train_ax, loss_ax = figure.subplots(1, 3)

    def draw(ax, key: str, label: str, **style) -> None:
        points = sorted(series.get(key, {}).items())
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, [100 * v if "top" in key else v for v in values], label=label, marker=".", **style)

    val_peers = sorted((k for k in series if re.fullmatch(r"val/peer\d+/top1", k)), key=_peer_index)
    for key in val_peers:
        draw(val_ax, key, f"peer {_peer_index(key)}", alpha=0.7, linewidth=1)
    draw(val_ax, "val/peer_mean/top1", "peer mean", color="black", linewidth=2)
    draw(val_ax, "val/ensemble/top1", "ensemble", color="tab:red", linewidth=2, linestyle="--")
    for key in sorted((k for k in series if re.fullmatch(r"train/peer\d+/top1", k)), key=_peer_index):
        draw(train_ax, key, f"peer {_peer_index(key)}", alpha=0.8, linewidth=1)
    terms = sorted(k for k in series if k.startswith("train/loss/"))
    for key in terms:
        draw(loss_ax, key, key.removeprefix("train/loss/"), linewidth=1.5)
    draw(loss_ax, "train/loss", "total", color="black", linewidth=2)

    for ax, title, ylabel in ((val_ax, "validation top-1", "%"), (train_ax, "training top-1", "%"),
                              (loss_ax, "training loss terms (weighted)", "loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if any(v > 0 for k in terms for v in series[k].values()):
        loss_ax.set_yscale("symlog", linthresh=1e-3)
    figure.suptitle(run_dir.name)
    path = Path(out) if out else run_dir / "curves.png"
    figure.savefig(path, dpi=DPI)
    return path


def plot_all(root: str | Path) -> list[Path]:
    """curves.png for every run at or below ``root`` (a run or a sweep directory)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} does not exist; pass a run directory (outputs/<date>/<time>) or a sweep (multirun/...)")
    runs = sorted({p.parent.parent for p in root.rglob("csv/metrics.csv")})
    if not runs:
        raise UserError(f"no csv/metrics.csv below {root}; point at a run or sweep directory")
    return [plot_run(run) for run in runs]
