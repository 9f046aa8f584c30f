"""Peers and method from a composed config: what the entry point, the early checks and the study
planner all build first (before any data), in one place that imports no entry point."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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
