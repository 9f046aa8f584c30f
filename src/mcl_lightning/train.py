"""Hydra entry point: compose -> instantiate -> fit -> test -> results.json.

    python -m mcl_lightning.train peers=4 backbone=resnet56 data.root=/path/to/data
    python -m mcl_lightning.train -m seed=0,1,2 method.beta=0.025,0.05
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lightning.fabric.utilities.exceptions import MisconfigurationException

from mcl_lightning.errors import ConfigError, UserError
from mcl_lightning.methods import OKDMethod
from mcl_lightning.models import PeerNetwork
from mcl_lightning.perf import apply_perf
from mcl_lightning.results import format_table, nest_metrics, summarise, write_results
from mcl_lightning.system import MONITOR, OKDSystem

log = logging.getLogger("mcl_lightning")


def build_network(cfg: DictConfig) -> tuple[PeerNetwork, OKDMethod]:
    """The method (options only), then the peers with its reference layout unless ``topology=`` /
    ``backbone.branch_point=`` say otherwise, then the method attached to them (checks first)."""
    method = instantiate(cfg.method)
    peers = instantiate(cfg.model, layout=method.reference_layout)
    method.attach(peers.spec())
    return peers, method


def build(cfg: DictConfig, run_dir: Path) -> tuple[L.LightningDataModule, OKDSystem, L.Trainer, ModelCheckpoint]:
    """Instantiate data, peers, method, system and trainer from a composed config."""
    peers, method = build_network(cfg)  # before the data: a config mistake costs no loading time
    peers, method = apply_perf(peers, method, cfg.get("perf"))  # speed switches (perf.*), maths unchanged
    datamodule = instantiate(cfg.data)
    system = OKDSystem(peers, method, num_classes=datamodule.num_classes, **OmegaConf.to_container(cfg.optim, resolve=True))
    # A resumed run keeps writing to the checkpoint's own folder: ModelCheckpoint restores its best
    # score only there, and "best" stays the best of the whole run.
    checkpoint_dir = Path(cfg.ckpt_path).resolve().parent if cfg.ckpt_path else run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=MONITOR,
        mode="max",
        save_last=True,
    )
    loggers = [
        CSVLogger(run_dir, name="csv", version=""),
        TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False),
    ]
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="epoch")]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return datamodule, system, trainer, checkpoint


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test once; returns (and writes to the run directory) the results dict."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; pass a checkpoint such as <run dir>/checkpoints/last.ckpt")
    L.seed_everything(cfg.seed, workers=True)
    datamodule, system, trainer, checkpoint = build(cfg, run_dir)
    trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    trainer.test(system, datamodule=datamodule, verbose=False)  # the final weights

    summary = summarise(system.val_history)
    results = {
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
        "final": summary["final"],
        "best": summary["best"],
        "best_epoch": summary["best_epoch"],
        "max_over_epochs": summary["max_over_epochs"],
        "test": nest_metrics(system.test_results),
        "reference": OmegaConf.to_container(cfg.reference, resolve=True) if cfg.get("reference") else None,
        "checkpoints": {"last": checkpoint.last_model_path or None, "best": checkpoint.best_model_path or None},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        path = write_results(run_dir / "results.json", results)
        print(format_table(results))
        print(f"results: {path}")
    return results


def backbone_name(peers: PeerNetwork, cfg: DictConfig) -> str:
    """The backbone's name, or ``a+b+c`` for heterogeneous peers."""
    spec = peers.build_spec
    names = [spec["backbone"]] if spec and isinstance(spec["backbone"], str) else (spec or {}).get("backbone")
    return "+".join(names) if names else str(cfg.backbone.name)


def _user_error(error: BaseException) -> Exception | None:
    """The user's mistake behind ``error`` (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        if isinstance(error, MisconfigurationException):  # Lightning rejecting trainer settings
            return ConfigError(f"{error} (check the trainer= settings; without a GPU use trainer=cpu)")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@hydra.main(version_base="1.3", config_path="pkg://mcl_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as error:  # a person's mistake gets one clear line, a bug its traceback
        user_error = _user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
