"""Every bad input caught early, nothing overwritten.

``EarlyChecks`` is a Hydra callback (``conf/train.yaml``) that runs before Hydra creates the run
directory or writes anything into it: the run directory's state, the config values (by building
the peers and the method, whose constructors check their options), the data folder, the batch
size against the devices, and a ``ckpt_path`` against the config. ``train.run`` repeats the
checks (multirun jobs and Python callers skip the callback). Every failure is one ``ConfigError``
that names the problem and the fix; the entry point prints it as one line and exits with 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from mcl_lightning.runtime.build import build_network, data_options, schedule_options
from mcl_lightning.runtime.checkpointing import (check_every_n_steps, incompatible, newest_checkpoint, read_checkpoint,
                                                 resolve_ckpt_path)
from mcl_lightning.runtime.ddp import check_timeout_s
from mcl_lightning.runtime.optim import SCHEDULES, SPANS_MAX_EPOCHS, check_sgd, recorded_schedule
from mcl_lightning.runtime.overrides import check_callbacks, check_group_options, check_sweep
from mcl_lightning.core.errors import ConfigError, UserError
from mcl_lightning.core.registry import check_choice
from mcl_lightning.core.outputs import check_no_file_in_the_way
from mcl_lightning.runtime.tracking import check_loggers


# -- the config ---------------------------------------------------------------------------------
TRAINER_NUMBERS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "limit_train_batches", "limit_val_batches",
                   "limit_test_batches", "val_check_interval", "check_val_every_n_epoch", "log_every_n_steps",
                   "accumulate_grad_batches", "gradient_clip_val", "num_sanity_val_steps")


def check_config(cfg: DictConfig) -> None:
    """Checks no constructor makes: every group's option names, the peers' form, checkpointing, the data
    folder, batch vs devices."""
    check_group_options(cfg)  # +method.nce=64 is a typo of nce_k, not a new option
    peers = cfg.peers
    if isinstance(peers, bool) or not isinstance(peers, (int, list)) and not OmegaConf.is_list(peers):
        raise ConfigError(f"peers must be a number of peers (peers=4) or a list of backbone names "
                          f"(peers=[resnet32,wrn_16_2]), got {peers!r}")
    if isinstance(peers, int) and peers < 1:
        raise ConfigError(f"peers must be >= 1, got {peers} (e.g. peers=4)")
    optim = cfg.get("optim") or {}
    check_sgd(optim.get("lr", 0.05), optim.get("momentum", 0.9), optim.get("weight_decay", 0.0))
    if "scheduler" in optim:  # the schedule is built at fit start, after the data: check its name now
        check_choice("optim.scheduler", optim.scheduler, SCHEDULES)
    strategy = cfg.trainer.get("strategy")
    if OmegaConf.is_dict(strategy) and "timeout_s" in strategy:
        check_timeout_s(strategy.timeout_s)
    for key in TRAINER_NUMBERS:  # a string would fail only where Lightning first compares it, after the data load
        value = cfg.trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"trainer.{key} must be a number, got {value!r} (e.g. trainer.{key}=10)")
    for key, instead in (("callbacks", "callbacks.<name>=... (conf/callbacks/)"), ("logger", "logger=<name> (conf/logger/)"),
                         ("plugins", "the Python API (mcl_lightning.callbacks, OKDSystem)")):
        if key in cfg.trainer:  # the entry point builds these itself: a value here would be silently replaced
            raise ConfigError(f"trainer.{key} is built by the command line from the config; use {instead}")
    check_every_n_steps(cfg.get("checkpoint", {}).get("every_n_steps", 0))
    check_callbacks(cfg)
    check_data_root(cfg.data.get("root"))
    world = configured_world_size(cfg.trainer)
    if world:
        check_batch_divides(int(cfg.data.batch_size), world)
    check_loggers(cfg.get("logger"))


def check_data_root(root: Any) -> None:
    """A data.root that is not a folder is a typo, not a place to download into (train, evaluate; the
    benchmark names where its root came from itself)."""
    if root is not None and not Path(str(root)).expanduser().is_dir():
        raise ConfigError(
            f"data.root={root} (or MCL_DATA_ROOT) is not a folder; fix the path, or create the folder "
            "(CIFAR is then downloaded into it when a network is there), or leave data.root unset to use "
            "the default data folder")


def configured_world_size(trainer: DictConfig) -> int | None:
    """devices x num_nodes when both are fixed numbers (None for ``auto`` / ``-1``: known later)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, list):
        devices = len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int):
        return None
    return devices * nodes


def check_batch_divides(batch_size: int, world_size: int) -> None:
    if world_size > 1 and batch_size % world_size:
        low = batch_size - batch_size % world_size
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must be divisible by the number of devices "
            f"({world_size}); set data.batch_size={low or world_size} or {low + world_size}, or change trainer.devices")


# -- the run directory ----------------------------------------------------------------------------
def check_run_dir(run_dir: Path, ckpt_path: Any) -> None:
    """Refuse a run directory that holds a run, unless ``ckpt_path`` asks to resume it."""
    # a file in the way would fail Hydra's mkdir with a traceback
    check_no_file_in_the_way(run_dir, f"hydra.run.dir={run_dir}", fix="choose another hydra.run.dir")
    if ckpt_path not in (None, ""):
        return  # resuming (into this directory or from another run): asked for
    results, checkpoint = run_dir / "results.json", newest_checkpoint(run_dir)
    if results.is_file():
        status = _status(results)
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds a {status} run ({results.name}); nothing was changed. "
            "Choose another hydra.run.dir, or pass ckpt_path=last to continue that run")
    if checkpoint is not None:
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds an unfinished run ({checkpoint.relative_to(run_dir)}); nothing was "
            "changed. Resume it with ckpt_path=last (the same command otherwise), or choose another hydra.run.dir")


def _status(results: Path) -> str:
    try:
        return "failed" if json.loads(results.read_text()).get("status") == "failed" else "finished"
    except (OSError, ValueError):
        return "finished"


# -- a checkpoint against the config ---------------------------------------------------------------
def load_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint, memory-mapped (cheap even with large banks); a clear error if unreadable."""
    return read_checkpoint(path, "ckpt_path=")


def checkpoint_differences(checkpoint: dict[str, Any], peers_spec: dict | None, method_spec: dict | None,
                           data: dict[str, Any] | None = None, schedule: dict[str, Any] | None = None) -> list[str]:
    """What differs between a checkpoint and the network, method, data and schedule about to be trained."""
    diffs: list[str] = []
    saved = checkpoint.get("peers_spec")
    if saved and peers_spec:
        for key, label in (("num_peers", "peers"), ("backbone", "backbone"), ("topology", "topology"),
                           ("num_classes", "classes"), ("branch_point", "backbone.branch_point")):
            if saved.get(key) != peers_spec.get(key):
                diffs.append(f"{label}: checkpoint {saved.get(key)}, now {peers_spec.get(key)}")
    saved_method = checkpoint.get("method_spec")
    if saved_method and method_spec:
        if saved_method["target"] != method_spec["target"]:
            diffs.append(f"method: checkpoint {saved_method['target']}, now {method_spec['target']}")
        else:
            old, new = saved_method["options"], method_spec["options"]
            diffs += [f"method.{k}: checkpoint {old[k]}, now {new[k]}" for k in old if k in new and old[k] != new[k]]
    saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
    for key in ("dataset", "val_split", "split_seed"):
        if data and key in saved_data and key in data and saved_data[key] != data[key]:
            diffs.append(f"data.{key}: checkpoint {saved_data[key]}, now {data[key]} (the memory banks hold one row "
                         "per training image)")
    if data and mid_epoch(checkpoint) and saved_data.get("batch_size") not in (None, data.get("batch_size")):
        diffs.append(f"data.batch_size: checkpoint {saved_data['batch_size']}, now {data['batch_size']} (the "
                     "checkpoint stopped mid-epoch)")
    return diffs + schedule_differences(checkpoint, schedule or {})


# The optimiser restores its own lr, momentum and weight decay from a checkpoint and the scheduler its
# own state: a different value in the config would be ignored, or (cosine's period) bend the schedule.
SCHEDULE_KEYS = ("lr", "milestones", "lr_decay", "warmup_epochs", "momentum", "weight_decay", "nesterov")


def schedule_differences(checkpoint: dict[str, Any], schedule: dict[str, Any]) -> list[str]:
    """Optimiser and schedule settings that differ from the checkpoint's; ``trainer.max_epochs`` too
    when the schedule is cosine (its period). multistep and constant do not depend on max_epochs: a
    resume may extend such a run."""
    saved = checkpoint.get("hyper_parameters") or {}
    diffs = []
    for key in SCHEDULE_KEYS:
        old, new = saved.get(key), schedule.get(key)
        if key in saved and key in schedule and _listed(old) != _listed(new):
            diffs.append(f"optim.{key}: checkpoint {_listed(old)}, now {_listed(new)}")
    old, new = recorded_schedule(saved), recorded_schedule(schedule)
    if old is not None and new is not None and old != new:
        diffs.append(f"optim.scheduler: checkpoint {old}, now {new}")
    epochs = checkpoint.get("max_epochs")
    if (saved.get("scheduler") in SPANS_MAX_EPOCHS and epochs is not None and schedule.get("max_epochs") is not None
            and int(epochs) != int(schedule["max_epochs"])):
        diffs.append(f"trainer.max_epochs: checkpoint {epochs}, now {schedule['max_epochs']} (optim.scheduler={saved['scheduler']} "
                     f"spans trainer.max_epochs: another value bends the schedule; resume with trainer.max_epochs={epochs})")
    return diffs


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else value


def mid_epoch(checkpoint: dict[str, Any]) -> bool:
    """Was the checkpoint written in the middle of an epoch (a step or SIGTERM checkpoint)?"""
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        return not progress["is_last_batch"] and progress["current"]["processed"] > 0
    except (KeyError, TypeError):
        return False


def user_error(error: BaseException) -> Exception | None:
    """The user's mistake behind ``error`` (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        if isinstance(error, MisconfigurationException):  # Lightning rejecting trainer settings
            device = any(word in str(error).lower() for word in ("gpu", "cuda", "accelerator", "device", "mps"))
            hint = "check the trainer= settings; without a GPU use trainer=cpu" if device else "check the trainer.* settings"
            return ConfigError(f"{error} ({hint})")
        if isinstance(error, InstantiationException) and isinstance(error.__cause__, ValueError) \
                and "full_key: trainer" in str(error):  # Lightning refusing a value (trainer.precision=17)
            return ConfigError(f"trainer: {' '.join(str(error.__cause__).split())}")
        if isinstance(error, InstantiationException) and isinstance(error.__cause__, TypeError):
            return ConfigError(f"{' '.join(str(error).split())} (check the option names)")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# -- the Hydra callback --------------------------------------------------------------------------
class EarlyChecks(Callback):
    """Runs the checks before Hydra creates or writes the run directory (single runs)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_dir = Path(str(config.hydra.run.dir)).resolve()
        except Exception:  # an interpolation only a running job can resolve: train.run checks it
            run_dir = None
        try:
            preflight(config, run_dir)
        except Exception as error:  # Hydra would only warn: a user's mistake stops here, a bug in train.run
            found = user_error(error)
            if found is None:
                raise
            print(f"error: {found}", file=sys.stderr)
            sys.exit(2)


    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Every job's overrides and option names here (train.run checks the rest per job), the search's data,
        # and the sweep directory.
        try:
            check_search_selects_on_holdout(config)
            # every job composed and its groups checked now, each failing job named (Hydra names none)
            loader = GlobalHydra.instance().config_loader()
            check_sweep(config, lambda overrides: loader.load_sweep_config(config, overrides))
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        try:
            sweep = Path(str(config.hydra.sweep.dir)).resolve()
        except Exception:
            return
        if config.get("ckpt_path") not in (None, "") or not sweep.is_dir():
            return
        held = sorted([*sweep.rglob("results.json"), *sweep.rglob("*.ckpt")])
        if held:
            print(f"error: hydra.sweep.dir={sweep} already holds runs ({held[0].relative_to(sweep)}); nothing was "
                  "changed. Choose another hydra.sweep.dir, or pass ckpt_path=last to continue each job", file=sys.stderr)
            sys.exit(2)


def check_search_selects_on_holdout(config: DictConfig) -> None:
    """A hyperparameter search (a sweeper that optimises the returned top-1) must validate on a holdout."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if "optuna" in sweeper.lower() and not config.data.get("val_split"):
        raise ConfigError("an Optuna search selects on the validation set, which is the test set without a holdout "
                          "(an optimistic number); add data.val_split=5000 (a stratified holdout of the training set)")


def preflight(cfg: DictConfig, run_dir: Path | None) -> None:
    """Every check that needs no data: run directory, config values, network + method, checkpoint."""
    if run_dir is not None:
        check_run_dir(run_dir, cfg.ckpt_path)
    check_config(cfg)
    peers, method = build_network(cfg)
    instantiate(cfg.data)  # the data module checks its options; nothing is loaded yet
    path = resolve_ckpt_path(cfg.ckpt_path, run_dir) if run_dir is not None else None
    if path is not None:
        from mcl_lightning.core.spec import method_spec

        diffs = checkpoint_differences(load_checkpoint_meta(path), peers.build_spec, method_spec(method),
                                       data_options(cfg), schedule_options(cfg))
        if diffs:
            raise incompatible(path, diffs)
