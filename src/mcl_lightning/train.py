"""Hydra entry point: check -> compose -> instantiate -> fit -> test -> results.json, curves.png.

    python -m mcl_lightning.train peers=4 backbone=resnet56 data.root=/path/to/data
    python -m mcl_lightning.train -m seed=0,1,2 method.beta=0.025,0.05
    python -m mcl_lightning.train ... hydra.run.dir=runs/a checkpoint.every_n_steps=500 ckpt_path=last  # pre-emptible
    python -m mcl_lightning.train logger=[default,mlflow] backbone=timm backbone.name=mobilenetv3_small_050
    python -m mcl_lightning.train -m hparams_search=mcl_okd data.val_split=5000  # Optuna; returns the objective
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mcl_lightning.runtime import history, overrides, validation
from mcl_lightning.runtime.checkpointing import AtomicCheckpointIO, remove_stale_temporaries, resolve_ckpt_path
from mcl_lightning.runtime.build import build_callbacks, build_network, data_options, schedule_options
from mcl_lightning.core.errors import NoScoreError, NonFiniteLossError
from mcl_lightning.runtime.lost_rank import LostRankError, lost_rank_error
from mcl_lightning.runtime.optim import optim_options
from mcl_lightning.runtime.perf import apply_perf
from mcl_lightning.runtime.runlog import RunLog
from mcl_lightning.runtime.results import format_table, no_score_reason, objective, run_results, write_results
from mcl_lightning.core.spec import method_spec
from mcl_lightning.system import OKDSystem
from mcl_lightning.runtime.tracking import build_loggers, finish_trackers, log_config

log = logging.getLogger("mcl_lightning")


def build(cfg: DictConfig, run_dir: Path, ckpt_path: Path | None) -> tuple[Any, OKDSystem, L.Trainer]:
    """Peers and method (checked against ``ckpt_path``), then data, system, callbacks and trainer."""
    peers, method = build_network(cfg)  # before the data: a config mistake costs no loading time
    meta = None
    if ckpt_path is not None:
        meta = validation.load_checkpoint_meta(ckpt_path)
        diffs = validation.checkpoint_differences(meta, peers.build_spec, method_spec(method), data_options(cfg),
                                                  schedule_options(cfg))
        if diffs:
            raise validation.incompatible(ckpt_path, diffs)
    peers, method = apply_perf(peers, method, cfg.get("perf"))  # speed switches (perf.*), maths unchanged
    datamodule = instantiate(cfg.data)
    system = OKDSystem(peers, method, num_classes=datamodule.num_classes, **optim_options(cfg.optim))  # conf/optim/
    # A resumed run keeps writing to the checkpoint's own folder: ModelCheckpoint restores its best
    # score only there, and "best" stays the best of the whole run.
    checkpoint_dir = ckpt_path.resolve().parent if ckpt_path else run_dir / "checkpoints"
    # logger= (conf/logger/): default CSV + TensorBoard; a resume continues the checkpoint's history
    loggers = build_loggers(cfg.get("logger"), history.logger_overrides(meta))
    history.restore_rows(loggers, meta)
    callbacks = build_callbacks(cfg, checkpoint_dir, with_logger=bool(loggers))  # conf/callbacks/
    # Without a checkpoint callback (callbacks=none) Lightning would add its own ModelCheckpoint, outside the run's
    # checkpoints/ folder and unknown to ckpt_path=last and results.json: checkpointing is the config's, or none.
    checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
                          enable_checkpointing=checkpointing)
    if trainer.is_global_zero:
        log_config(loggers, OmegaConf.to_container(cfg, resolve=True))
    validation.check_batch_divides(datamodule.batch_size, trainer.world_size)  # before DDP starts its processes
    return datamodule, system, trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test once; returns (and writes to the run directory) the results dict."""
    started = time.monotonic()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    validation.check_run_dir(run_dir, cfg.ckpt_path)
    validation.check_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    announce(cfg, run_dir, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, system, trainer = build(cfg, run_dir, ckpt_path)
    if ckpt_path is not None:
        remove_stale_temporaries(ckpt_path.parent)  # left by a writer that was killed
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)
        trainer.test(system, datamodule=datamodule, verbose=False)  # the final weights
    except Exception as error:  # results.json records the failure; the last good checkpoint stays
        failure = error if isinstance(error, NonFiniteLossError) else lost_rank(error, trainer)
        if failure is None:
            raise
        # a lost rank: no plot, so that rank 0 is done before a launcher that saw the loss kills it
        finish(run_dir, run_results(cfg, system, trainer, datamodule, error=failure,
                                   wall_time_s=time.monotonic() - started), trainer,
               curves=not isinstance(failure, LostRankError))
        if failure is error:
            raise
        raise failure from error
    wall_time_s = time.monotonic() - started
    return finish(run_dir, run_results(cfg, system, trainer, datamodule, wall_time_s=wall_time_s), trainer)


def lost_rank(error: Exception, trainer: L.Trainer) -> LostRankError | None:
    """``error`` as a ``LostRankError`` if it is a DDP collective that lost another rank."""
    if trainer.world_size < 2:
        return None
    return lost_rank_error(error, trainer.global_rank, trainer.world_size, getattr(trainer.strategy, "timeout_s", None),
                           trainer.current_epoch, trainer.global_step)


@rank_zero_only
def announce(cfg: DictConfig, run_dir: Path, ckpt_path: Path | None) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    print(f"run directory: {run_dir}")
    print(f"resuming from: {ckpt_path}" if ckpt_path else "starting a new run", flush=True)


def finish(run_dir: Path, results: dict[str, Any], trainer: L.Trainer, curves: bool = True) -> dict[str, Any]:
    """results.json, the table and (``curves``) curves.png (rank zero), both also saved with the trackers' runs."""
    if trainer.is_global_zero:
        path = write_results(run_dir / "results.json", results)
        print(format_table(results))
        plot = plot_curves(run_dir) if curves and (run_dir / "csv" / "metrics.csv").is_file() else None
        finish_trackers(trainer.loggers, run_dir, [path] + ([plot] if plot else []))
        print(f"results: {path}", flush=True)
    return results


def plot_curves(run_dir: Path) -> Path | None:
    """curves.png from the CSV log (logger= without the CSV logger: none); a plot must not cost the run's results."""
    try:
        from mcl_lightning.tools.curves import plot_run

        path = plot_run(run_dir)
        print(f"curves: {path}")
        return path
    except Exception as error:
        log.warning("curves.png not written: %s: %s", type(error).__name__, error)
        return None


def search_score(cfg: DictConfig, results: dict[str, Any]) -> float:
    """The objective a sweeper optimises. An Optuna trial without one fails with the reason (Optuna
    cannot record NaN as a result, and its sweeper would stop the whole search)."""
    score = objective(results)
    hydra_cfg = HydraConfig.get()
    if score != score and hydra_cfg.mode == RunMode.MULTIRUN and "optuna" in str(hydra_cfg.sweeper.get("_target_", "")):
        raise NoScoreError(no_score_reason(cfg))
    return score


@hydra.main(version_base="1.3", config_path="pkg://mcl_lightning.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()  # everything the job prints also goes to the run's train.log
    with RunLog(Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"):
        return _job(cfg)


def _job(cfg: DictConfig) -> float:
    try:
        return search_score(cfg, run(cfg))
    except SIGTERMException as stop:  # pre-empted: the checkpoint is written, the relaunch resumes it
        where = f" at epoch {stop.epoch}, step {stop.step}; checkpoint {stop.checkpoint}" if hasattr(stop, "step") else ""
        print(f"stopped by SIGTERM{where}. Relaunch the same command with ckpt_path=last to continue.", file=sys.stderr)
        sys.exit(143)
    except LostRankError as error:  # another rank died or hung: one line, and the launcher sees a failure
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as error:  # a person's mistake gets one clear line, a bug its traceback
        user_error = validation.user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        if isinstance(error, (NonFiniteLossError, NoScoreError)) and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a failed job: a sweeper with a failure budget (hydra.sweeper.max_failure_rate) goes on
        sys.exit(2)


def main() -> None:
    """``mcl-train`` / ``python -m mcl_lightning.train``: Hydra's own errors (unknown group option, bad
    override) are one line and exit status 2 too."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let composition errors reach us instead of Hydra's report
    sys.argv[1:] = overrides.accept_trainer_args(sys.argv[1:])  # any Trainer argument as trainer.<name>=
    try:
        _hydra_main()
    except MissingConfigException as error:
        if (error.missing_cfg_file or "").startswith("hydra/sweeper/optuna"):
            print('error: hydra/sweeper=optuna (and hparams_search=) needs hydra-optuna-sweeper: '
                  'pip install "mcl-lightning[tune]"', file=sys.stderr)
            sys.exit(2)
        print(f"error: {overrides.missing_config_message(error)}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, NoScoreError):  # a sweep stopped by a failed job, whose line is printed already
        sys.exit(2)
    except ValueError as error:  # Optuna at the end of a search whose every trial failed (each printed its line)
        if "No trials are completed" not in str(error):
            raise
        print("error: no trial of the search finished with a score (each failed trial printed its reason above)",
              file=sys.stderr)
        sys.exit(2)
    except (ConfigCompositionException, OverrideParseException) as error:
        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        multirun = "-m" in sys.argv or "--multirun" in sys.argv  # then each job is named
        found = (overrides.explain_sweep if multirun else overrides.explain_composition)(error, args, compose)
        print(f"error: {found or ' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


def compose(args: list[str]) -> DictConfig:
    """The train config for ``args`` through Hydra's compose API (after the entry point's own attempt)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return hydra_compose("train", overrides=args)


if __name__ == "__main__":
    main()
