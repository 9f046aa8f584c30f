"""Experiment trackers from the ``logger=`` config group (``conf/logger/``): Lightning's own loggers.

``logger=default`` is CSV + TensorBoard in the run directory; ``logger=wandb``, ``logger=mlflow``,
``logger=none``, or several at once (``logger=[default,mlflow]``). Every entry of the ``logger`` node
that has a ``_target_`` is one Lightning logger; all of them receive the same metrics the CSV has.
A tracker whose package is missing is refused before any work, naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterable

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from mcl_lightning.core.errors import ConfigError

# Logger class name -> (the module it needs, the mcl-lightning extra that installs it).
EXTRAS = {"WandbLogger": ("wandb", "wandb"), "MLFlowLogger": ("mlflow", "mlflow")}


def logger_entries(logger_cfg: DictConfig | None) -> dict[str, DictConfig]:
    """The ``logger`` node's loggers by name (scalars such as ``logger.offline`` are shared switches)."""
    if logger_cfg is None:
        return {}
    return {str(name): entry for name, entry in logger_cfg.items()
            if OmegaConf.is_dict(entry) and "_target_" in entry}


def check_loggers(logger_cfg: DictConfig | None) -> None:
    """Each chosen tracker's package is importable; else one line naming the extra to install."""
    for name, entry in logger_entries(logger_cfg).items():
        needed = EXTRAS.get(str(entry._target_).rsplit(".", 1)[-1])
        if needed is None:
            continue
        module, extra = needed
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"logger={name} needs the {module} package: pip install \"mcl-lightning[{extra}]\" "
                              f"(or choose another logger=, e.g. logger=default) [{type(error).__name__}: {error}]") from None


def build_loggers(logger_cfg: DictConfig | None, overrides: dict[str, dict[str, Any]] | None = None) -> list[Logger]:
    """The configured Lightning loggers, in the order of the ``logger`` node; ``overrides``: extra
    constructor arguments by class name (a resumed run's tracker runs, ``history.logger_overrides``)."""
    check_loggers(logger_cfg)
    return [instantiate(entry, **(overrides or {}).get(str(entry._target_).rsplit(".", 1)[-1], {}))
            for entry in logger_entries(logger_cfg).values()]


def log_config(loggers: Iterable[Logger], config: dict[str, Any]) -> None:
    """The resolved run config (method and its options, backbone, peers, seed, data, perf, optim...) to every
    logger, under ``config`` (the CSV and TensorBoard loggers' ``hparams.yaml`` included); Lightning logs the
    system's and the data module's own hyperparameters beside it."""
    for logger in loggers:
        logger.log_hyperparams({"config": config})


def finish_trackers(loggers: Iterable[Logger], run_dir: Path, paths: Iterable[Path]) -> None:
    """Files of the finished run (results.json, curves.png) saved with each tracker's run; W&B runs
    closed (the next job of a sweep in this process would otherwise log into the same run)."""
    files = [Path(p) for p in paths if Path(p).is_file()]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for path in files:
                logger.experiment.save(str(path), base_path=str(run_dir), policy="now")
            logger.experiment.finish()
        elif isinstance(logger, MLFlowLogger):
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path))
