"""results.json and the end-of-run table."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mcl_lightning.core.errors import UserError, one_line

GROUPS_ORDER = ("peer_mean", "ensemble")


COUNT_KEY = "num_images"  # how many images the metrics were computed on (kept, as an int)


def nest_metrics(flat: dict[str, float]) -> dict[str, dict[str, float] | int]:
    """{"peer0/top1": x} -> {"peer0": {"top1": x}}; keeps ``num_images``, drops other bookkeeping
    keys such as "epoch"."""
    nested: dict[str, dict[str, float] | int] = {}
    for key, value in flat.items():
        if "/" in key:
            group, metric = key.split("/", 1)
            nested.setdefault(group, {})[metric] = value
        elif key == COUNT_KEY:
            nested[key] = int(value)
    return nested


def summarise(history: list[dict[str, float]]) -> dict[str, Any]:
    """Validation values at the final epoch, at the best epoch, and each metric's maximum.

    ``best`` is the whole row of the epoch with the highest best-peer top-1 (the epoch the best
    checkpoint comes from), so its numbers belong together. ``max_over_epochs`` takes each
    metric's maximum on its own (as the reference reports); those may come from different epochs.
    """
    if not history:
        return {"final": {}, "best": {}, "best_epoch": None, "max_over_epochs": {}}
    keys = [k for k in history[-1] if k not in ("epoch", COUNT_KEY)]
    best_entry = max(history, key=lambda entry: entry["best_peer/top1"])
    maxima = {k: max(entry[k] for entry in history) for k in keys}
    return {
        "final": nest_metrics(history[-1]),
        "best": nest_metrics(best_entry),
        "best_epoch": int(best_entry["epoch"]),
        "max_over_epochs": nest_metrics(maxima),
    }


def cpu_name() -> str:
    """The CPU model as the OS names it (Linux: /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(trainer: Any) -> dict[str, Any]:
    """Where a run ran: enough to read its wall time (CPU model and threads, accelerator, torch)."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "accelerator": "cpu"}
    root = getattr(trainer, "strategy", None) and trainer.strategy.root_device
    if root is not None and root.type == "cuda":
        info["accelerator"] = torch.cuda.get_device_name(root)
    return info


def max_time_stopped(trainer: Any) -> bool:
    """Whether ``trainer.max_time`` (Lightning's Timer) stopped this run's training."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    return remaining is not None and remaining <= 0


def early_stopped(trainer: Any) -> bool:
    """Whether an ``EarlyStopping`` callback stopped this run's training."""
    from lightning.pytorch.callbacks import EarlyStopping

    def stopped(callback: EarlyStopping) -> bool:  # stopped_epoch is 0 also when it stopped in epoch 0
        reason = getattr(callback, "stopping_reason", None)  # Lightning >= 2.6
        return callback.stopped_epoch > 0 or (reason is not None and reason.value != 0)

    return any(isinstance(c, EarlyStopping) and stopped(c) for c in getattr(trainer, "callbacks", []))


def run_results(cfg: Any, system: Any, trainer: Any, datamodule: Any, error: Exception | None = None,
                wall_time_s: float | None = None) -> dict[str, Any]:
    """The results.json of a run (``status`` "finished", or "failed" with ``failure`` recorded).

    The checkpoints are the trainer's ``LastCheckpoint`` and ``BestCheckpoint`` (None where the run has
    none); a callback with a ``results_key`` adds ``results[results_key] = callback.summary(trainer,
    datamodule)`` (``TrainThroughput``: "throughput"; a study's ``ProbeWindow``: "probe_window"), unless
    results.json has that key already (``status``, ``config``, ...: those are kept).
    ``wall_time_s``: this process's time from start to results (a resumed run: since the relaunch).
    """
    from mcl_lightning.runtime.checkpointing import BestCheckpoint, LastCheckpoint  # here: report/evaluate need
    from mcl_lightning.runtime.guards import NonFiniteLossGuard                  # neither Lightning nor torch

    callbacks = list(getattr(trainer, "callbacks", []))
    summaries = callback_summaries(callbacks, trainer, datamodule)
    last_cb = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    best_cb = next((c for c in callbacks if isinstance(c, BestCheckpoint)), None)
    guard = next((c for c in callbacks if isinstance(c, NonFiniteLossGuard)), None)
    summary = summarise(system.val_history)
    last = str(last_cb.path) if last_cb is not None and last_cb.path.is_file() else None  # after a failure: the last good one
    results = {
        "status": "failed" if error is not None else "finished",
        "method": system.method.name,
        "backbone": backbone_name(system.peers, cfg),
        "peers": system.peers.num_peers,
        "topology": system.peers.topology,
        "ensemble": system.method.ensemble_description,
        "epochs_run": trainer.current_epoch,
        "global_batch_size": datamodule.batch_size * trainer.accumulate_grad_batches,
        "world_size": trainer.world_size,
        "learning_rate": cfg.optim.lr,
        "seed": cfg.seed,
        "selection": datamodule.selection_note,
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 1),
        "machine": machine(trainer),
        "throughput": summaries.pop("throughput", None),
        "final": summary["final"],
        "best": summary["best"],
        "best_epoch": summary["best_epoch"],
        "max_over_epochs": summary["max_over_epochs"],
        "test": nest_metrics(system.test_results),
        "reference": OmegaConf.to_container(cfg.reference, resolve=True) if cfg.get("reference") else None,
        "checkpoints": {"last": last, "best": (best_cb.best_model_path or None) if best_cb is not None else None},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if max_time_stopped(trainer):  # a study's time cap (trainer.max_time) ended training before max_epochs
        results["stopped_by"] = "trainer.max_time"
    elif early_stopped(trainer):  # an EarlyStopping callback (callbacks=[default,early_stopping])
        results["stopped_by"] = "early_stopping"
    results.update({key: value for key, value in summaries.items() if key not in results})
    if error is not None:
        details = getattr(error, "failure", None) or getattr(guard, "failure", None) or {}
        results["failure"] = {**details, "message": str(error)}
    return results


def callback_summaries(callbacks: list[Any], trainer: Any, datamodule: Any) -> dict[str, Any]:
    """``{results_key: summary(trainer, datamodule)}`` of the callbacks that have both; one that fails is
    logged and left out (a callback's summary must not cost the run its results.json)."""
    import logging

    summaries = {}
    for callback in callbacks:
        key, summary = getattr(callback, "results_key", None), getattr(callback, "summary", None)
        if not isinstance(key, str) or not callable(summary):
            continue
        try:
            summaries[key] = summary(trainer, datamodule)
        except Exception as error:
            logging.getLogger("mcl_lightning").warning("results.json: %s.summary failed (%s: %s); %r left out",
                                                       type(callback).__name__, type(error).__name__, error, key)
    return summaries


def objective(results: dict[str, Any]) -> float:
    """What a sweeper (hydra/sweeper=optuna) optimises, returned by the entry point: the deployed (last)
    peer's validation top-1 at the final epoch; validation is the holdout (data.val_split), as a search
    refuses to select on the test set. NaN for a run without validation (trainer.limit_val_batches=0)."""
    deployed = (results.get("final") or {}).get(f"peer{int(results['peers']) - 1}") or {}
    return float(deployed.get("top1", math.nan))


def no_score_reason(cfg: Any) -> str:
    """Why a run has no validation score, naming the settings that can stop it first."""
    trainer = cfg.trainer
    limits = [f"trainer.{key}={trainer.get(key)}" for key, unset in (("max_steps", -1), ("max_time", None))
              if trainer.get(key, unset) not in (unset, None)]
    if trainer.get("limit_val_batches", 1.0) == 0:
        limits.append("trainer.limit_val_batches=0")
    return (f"no validation score: the run stopped before its first validation ({', '.join(limits) or 'stopped early'})"
            "; give each trial at least one epoch")


def backbone_name(peers: Any, cfg: Any) -> str:
    """The backbone's name, or ``a+b+c`` for heterogeneous peers."""
    spec = peers.build_spec
    names = [spec["backbone"]] if spec and isinstance(spec["backbone"], str) else (spec or {}).get("backbone")
    return "+".join(names) if names else str(cfg.backbone.name)


def read_results(path: str | Path, required: tuple[str, ...] = ("method", "backbone", "peers")) -> dict[str, Any]:
    """A training run's results.json; a ``UserError`` naming the file when it is not one (damaged, an
    evaluation's JSON, a checkpoint)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} cannot be read as a run's results.json ({one_line(error)}); "
                        "remove or repair it, or point at a folder of runs") from None
    missing = [key for key in required if not isinstance(results, dict) or key not in results]
    if missing:
        raise UserError(f"{path} is not a training run's results.json (no {', '.join(missing)}); "
                        "remove it, or point at a folder of runs")
    return results


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Written beside ``path`` and renamed over it: a process killed meanwhile (e.g. by DDP's launcher
    after another rank died) leaves the previous file or none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_table(results: dict[str, Any]) -> str:
    """A short text table: one row per peer, the peer mean and the ensemble (top-1/top-5, %)."""
    final, best, test = results.get("final", {}), results.get("best", {}), results.get("test", {})
    groups = {**test, **final}  # a run stopped before its first validation still has its test results
    peers = sorted((g for g in groups if g.startswith("peer") and g[4:].isdigit()), key=lambda g: int(g[4:]))
    rows = peers + [g for g in GROUPS_ORDER if g in groups]

    def pct(group: dict[str, dict[str, float]], name: str, metric: str) -> str:
        value = group.get(name, {}).get(metric)
        return f"{100 * value:6.2f}" if value is not None else "     -"

    header = f"{'':10} {'final top1':>10} {'final top5':>10} {'best top1':>10} {'test top1':>10} {'test top5':>10}"
    lines = [
        f"{results.get('method')} | {results.get('backbone')} x{results.get('peers')} ({results.get('topology')}) | "
        f"{results.get('epochs_run')} epochs | validation: {results.get('selection')}",
        header,
    ]
    for name in rows:
        lines.append(
            f"{name:10} {pct(final, name, 'top1'):>10} {pct(final, name, 'top5'):>10} "
            f"{pct(best, name, 'top1'):>10} {pct(test, name, 'top1'):>10} {pct(test, name, 'top5'):>10}"
        )
    return "\n".join(lines)
