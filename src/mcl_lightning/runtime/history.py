"""A run's history across resumes: the checkpoint is the record of what was logged.

Every checkpoint carries the rows the run had logged when it was written (``logged_rows``) and the
ids of its tracker runs (``tracker_runs``). A resumed run starts from exactly that record:

- ``csv/metrics.csv`` is rewritten with the checkpoint's rows, then appended to: rows logged after
  the checkpoint (an interrupted epoch's, or a test pass of a killed relaunch) are dropped and come
  again, once, from the redone work; rows written before it are never lost. At the end of an epoch
  Lightning logs the epoch's training means *after* the epoch's checkpoint, so the checkpoint
  takes that row with it (``pending_epoch_row``): a kill between the two loses nothing.
- TensorBoard writes into the same folder with ``purge_step`` at the step of the checkpoint's last
  row, so TensorBoard drops the events of the interrupted stretch from the earlier event files; the
  rows at that step are written again (the epoch's training row may never have reached TensorBoard).
- W&B and MLflow continue the checkpoint's run (``id``/``resume`` and ``run_id``).
- A mid-epoch checkpoint also holds the running sums of the epoch's training means (each rank's,
  ``epoch_sums``), added back after the first resumed batch: the interrupted epoch's row equals
  the uninterrupted run's, bit for bit (float addition commutes, so ``x + saved == saved + x``).

``curves.png`` and ``results.json`` read the CSV and the checkpoint's validation history, so they
cover the whole run from epoch 0.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

ROWS_KEY, RUNS_KEY, SUMS_KEY = "logged_rows", "tracker_runs", "epoch_sums"


class _KeptRowsWriter(ExperimentWriter):
    """Lightning's CSV writer that starts from ``rows`` (written to ``metrics.csv`` at once, replacing
    whatever a killed process left there) instead of deleting the file, and remembers every row."""

    def __init__(self, log_dir: str, rows: list[dict[str, Any]]) -> None:
        self.rows = [dict(row) for row in rows]
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        self.metrics_keys = sorted({key for row in self.rows for key in row})
        if self.rows:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a kill while rewriting keeps the old file
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(tmp, path)
        elif path.is_file():
            path.unlink()  # a launch killed before its first checkpoint: its rows are redone

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's writer deletes an existing metrics.csv here

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.rows.append(dict(self.metrics[-1]))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` (``logger=default``) whose ``metrics.csv`` a resumed run continues (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed_rows: list[dict[str, Any]] = []

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeptRowsWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeptRowsWriter(self.log_dir, self.resumed_rows)
        return self._experiment

    def rows(self) -> list[dict[str, Any]]:
        """Every row of the run so far (the resumed ones included)."""
        return list(self.experiment.rows) if isinstance(self._experiment, _KeptRowsWriter) else list(self.resumed_rows)


def logger_overrides(checkpoint: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Constructor arguments, by logger class name, that continue the checkpoint's tracker runs."""
    rows = list((checkpoint or {}).get(ROWS_KEY) or [])
    runs = (checkpoint or {}).get(RUNS_KEY) or {}
    overrides: dict[str, dict[str, Any]] = {
        # events at or after this step in earlier files are dropped by TensorBoard (replay_rows writes its rows again)
        "TensorBoardLogger": {"purge_step": last_step(rows)} if ROWS_KEY in (checkpoint or {}) else {},
    }
    if runs.get("wandb"):
        overrides["WandbLogger"] = {"id": runs["wandb"], "resume": "allow"}
    if runs.get("mlflow"):
        overrides["MLFlowLogger"] = {"run_id": runs["mlflow"]}
    return overrides


def last_step(rows: list[dict[str, Any]]) -> int:
    """The step of the last of ``rows`` (0 without rows)."""
    return max((int(row["step"]) for row in rows if row.get("step") is not None), default=0)


def restore_rows(loggers: list[Any], checkpoint: dict[str, Any] | None) -> None:
    """Give each resumable CSV logger the checkpoint's rows (an empty history without a checkpoint) and
    write the rows at the last step into TensorBoard again (its ``purge_step`` dropped them)."""
    rows = [dict(row) for row in (checkpoint or {}).get(ROWS_KEY) or []]
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            # a checkpoint written before checkpoints carried the rows: the file as it is, appended to
            logger.resumed_rows = rows if checkpoint is None or ROWS_KEY in checkpoint else rows_on_disk(logger)
        elif isinstance(logger, TensorBoardLogger) and rows:
            step = last_step(rows)
            for row in rows:
                if row.get("step") is not None and int(row["step"]) == step:
                    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step)


def rows_on_disk(logger: CSVLogger) -> list[dict[str, Any]]:
    """The rows of the logger's metrics.csv (its non-empty cells), none if it has no file."""
    path = Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{key: value for key, value in row.items() if value not in ("", None)} for row in csv.DictReader(handle)]


def pending_epoch_row(trainer: L.Trainer) -> dict[str, Any] | None:
    """The training row Lightning will log for the epoch that is ending, when a checkpoint is written
    between the epoch's end hooks and that row (``fit_loop.on_advance_end``); else None."""
    fit_loop = trainer.fit_loop
    progress = fit_loop.epoch_progress.current
    if not trainer.training or trainer.sanity_checking or progress.processed <= progress.completed:
        return None
    # the values Lightning's logger connector is about to log (update_train_epoch_metrics), as the CSV stores them
    metrics = trainer._logger_connector.metrics["log"]
    row: dict[str, Any] = {key: float(value) for key, value in metrics.items()}
    row.setdefault("epoch", trainer.current_epoch)
    row["step"] = fit_loop.epoch_loop._batches_that_stepped - 1  # Lightning logs epoch ends one step back
    return row if len(row) > 2 else None


def _epoch_means(trainer: L.Trainer) -> dict[str, Any]:
    """The training results Lightning accumulates over the epoch for its means (key -> metric)."""
    results = trainer.fit_loop.epoch_loop._results
    return {key: metric for key, metric in results.items()
            if getattr(metric, "is_tensor", False) and metric.meta.on_epoch and metric.meta.is_mean_reduction}


def _mid_epoch(trainer: L.Trainer) -> bool:
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return trainer.training and not trainer.sanity_checking and progress.current.completed > 0 and not progress.is_last_batch


class RunHistory(Callback):
    """Puts the logged rows, the tracker run ids and a mid-epoch checkpoint's running means into every
    checkpoint; restores the running means after the first batch of a resumed epoch."""

    def __init__(self) -> None:
        self._sums: dict[str, Any] | None = None  # this rank's saved sums, until the first resumed batch

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(SUMS_KEY)
        if saved is not None and saved["values"].shape[0] == trainer.world_size:
            rank = trainer.global_rank
            self._sums = {"keys": list(saved["keys"]), "values": saved["values"][rank], "counts": saved["counts"][rank]}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._sums is None:
            return
        means, sums, self._sums = _epoch_means(trainer), self._sums, None
        for key, value, count in zip(sums["keys"], sums["values"], sums["counts"]):
            if key in means:
                metric = means[key]
                metric.value = metric.value + value.to(metric.value)
                metric.cumulated_batch_size = metric.cumulated_batch_size + count.to(metric.cumulated_batch_size)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        pending = pending_epoch_row(trainer)  # every rank: it may reduce across ranks
        csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)]
        if csv_loggers:
            checkpoint[ROWS_KEY] = csv_loggers[0].rows() + ([pending] if pending else [])
        runs: dict[str, str] = {}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                runs["wandb"] = str(logger.version)
            elif isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                runs["mlflow"] = str(logger.run_id)
        if runs:
            checkpoint[RUNS_KEY] = runs
        means = _epoch_means(trainer) if _mid_epoch(trainer) else {}
        if means:  # every rank assembles the checkpoint, rank 0 writes it: gather each rank's sums
            values = torch.stack([m.value.detach().float() for m in means.values()])
            counts = torch.stack([m.cumulated_batch_size.detach().long() for m in means.values()])
            if trainer.world_size > 1:
                values, counts = trainer.strategy.all_gather(values), trainer.strategy.all_gather(counts)
            else:
                values, counts = values[None], counts[None]
            checkpoint[SUMS_KEY] = {"keys": list(means), "values": values.cpu(), "counts": counts.cpu()}


