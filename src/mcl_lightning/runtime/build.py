"""What a composed config builds: the peers and method (what the entry point, the early checks and the
study planner all build first, before any data) and the Trainer's callbacks, in one place that imports
no entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import OKDMethod
from mcl_lightning.models import PeerNetwork
from mcl_lightning.runtime.optim import schedule_record


def build_network(cfg: DictConfig) -> tuple[PeerNetwork, OKDMethod]:
    """The method (options only), then the peers exactly as the config's ``model`` says (its ``layout``:
    the method's reference layout), then the method attached to them (checks first)."""
    method = instantiate(cfg.method)
    peers = instantiate(cfg.model)
    method.attach(peers.spec())
    return peers, method


def data_options(cfg: DictConfig) -> dict[str, Any]:
    """The data module's options, resolved (what a checkpoint records and compares)."""
    return OmegaConf.to_container(cfg.data, resolve=True)


def schedule_options(cfg: DictConfig) -> dict[str, Any]:
    """The optimiser and schedule settings, resolved, with ``max_epochs`` (what a resume compares)."""
    options = OmegaConf.to_container(cfg.optim, resolve=True)
    if "lr_scheduler" in cfg.optim:  # named as OKDSystem records it (a user's own `_target_` by its name)
        options.pop("scheduler", None)
        options.update(schedule_record(instantiate(cfg.optim.lr_scheduler)))
    return {**options, "max_epochs": cfg.trainer.get("max_epochs")}


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path, with_logger: bool) -> list[L.Callback]:
    """``cfg.callbacks`` (conf/callbacks/) in order; a null entry is one removed. A checkpoint callback
    with ``dirpath: null`` writes into ``checkpoint_dir``. A learning-rate monitor needs a logger, a
    progress bar a shown bar and a checkpoint callback ``trainer.enable_checkpointing``: without them
    they are left out (Lightning would refuse the run)."""
    callbacks = []
    show_bar = cfg.trainer.get("enable_progress_bar", True)
    checkpointing = cfg.trainer.get("enable_checkpointing", True)
    for name, options in (cfg.get("callbacks") or {}).items():
        if options is None:
            continue
        extra = {"dirpath": checkpoint_dir} if "dirpath" in options and options.dirpath is None else {}
        callback = instantiate(options, **extra)
        if not isinstance(callback, L.Callback):
            raise ConfigError(f"callbacks.{name} builds {type(callback).__name__}, not a Lightning callback: "
                              f"give callbacks.{name}._target_ a lightning.pytorch.Callback class (or a function returning one)")
        if isinstance(callback, LearningRateMonitor) and not with_logger:
            continue
        if isinstance(callback, ProgressBar) and not show_bar:
            continue
        if isinstance(callback, Checkpoint) and not checkpointing:
            continue
        callbacks.append(callback)
    return callbacks
