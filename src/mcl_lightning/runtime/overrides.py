"""Typos on the command line answered in one line: what the option, group or recipe really is.

- ``trainer.<name>=`` takes any argument of Lightning's ``Trainer`` (``accept_trainer_args`` turns one
  that ``conf/trainer/`` does not list into Hydra's ``++trainer.<name>=``, add or override);
- an unknown option of the method, backbone, data, perf, trainer or optim group (``method.nce=64``, or
  ``+method.nce=64``) lists that group's real options with the closest one (``check_group_options``),
  and so does an unknown argument of a callback (``callbacks.early_stopping.patiense=5``: ``check_callbacks``);
  Hydra's own "Could not override" error is answered by composing once more with the option added
  and running the same check (``explain_composition``);
- an unknown experiment (or other group option) names the closest recipes (``missing_config_message``);
- a multirun checks every job's overrides before any job runs and names each job that fails
  (``check_sweep``, from the ``EarlyChecks`` Hydra callback).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import fields
from importlib import resources
from typing import Any, Callable, Sequence

import lightning
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.runtime.checkpointing import LastCheckpoint, check_every_n_steps
from mcl_lightning.runtime.metrics import MONITOR, validation_metrics
from mcl_lightning.runtime.perf import PerfOptions

# What conf/train.yaml's `model` reads of the backbone group (the rest of a backbone is its registry name).
BACKBONE_OPTIONS = ("name", "branch_point", "library", "pretrained")
CHECKED_GROUPS = ("method", "backbone", "data", "perf", "trainer", "optim")
PARTIALS = ("optimizer", "lr_scheduler")  # conf/optim/: the two partials; the scalars are what they read


def accept_trainer_args(args: Sequence[str]) -> list[str]:
    """``trainer.<Trainer argument>=v`` as ``++trainer.<name>=v`` where conf/trainer/default.yaml does not
    list it (the listed ones stay plain overrides, as a sweep report reads them)."""
    listed = OmegaConf.create((resources.files("mcl_lightning.conf") / "trainer" / "default.yaml").read_text())
    unlisted = set(inspect.signature(lightning.Trainer).parameters) - set(listed)

    def accepted(arg: str) -> str:
        match = re.fullmatch(r"trainer\.(\w+)=.*", arg, re.S)
        return f"++{arg}" if match and match.group(1) in unlisted else arg

    return [accepted(arg) for arg in args]


# -- options of a group -----------------------------------------------------------------------------
def group_options(cfg: DictConfig, group: str) -> tuple[list[str], str] | None:
    """(the options ``group`` takes, what they belong to), or None when anything goes (``**kwargs``)."""
    if group == "backbone":
        return list(BACKBONE_OPTIONS), "the backbone group"
    if group == "perf":
        return [f.name for f in fields(PerfOptions)], "perf"
    if group == "optim":
        return optim_options(cfg.optim)
    target = cfg[group].get("_target_")
    if not target:
        return None
    try:
        cls = get_class(str(target))
    except Exception:  # a target that does not import: instantiating it says so
        return None
    names = argument_names(cls)
    return None if names is None else (names, cls.__name__)


def argument_names(target: Callable) -> list[str] | None:
    """The arguments ``target`` takes by name, or None when it takes any (``**kwargs``)."""
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name in params if name != "self"]


def optim_options(node: DictConfig) -> tuple[list[str], str] | None:
    """The optim group's options: the scalars its partials read (``${..lr}``), and the partials themselves."""
    if not all(OmegaConf.is_dict(node.get(name)) for name in PARTIALS):
        return None
    raw = str(OmegaConf.to_container(OmegaConf.masked_copy(node, list(PARTIALS)), resolve=False))
    read = set(re.findall(r"\$\{\.\.(\w+)\}", raw))
    options = [key for key in node if key in read] + list(PARTIALS)
    optimizer = str(node.optimizer.get("_target_", "the optimizer")).rpartition(".")[2]
    return options, f"the optim group with {optimizer}"


def check_group_options(cfg: DictConfig) -> None:
    """Every key of the method, backbone, data, perf, trainer and optim groups is an option of that group."""
    for group in CHECKED_GROUPS:
        node = cfg.get(group)
        if not OmegaConf.is_dict(node):
            continue
        known = group_options(cfg, group)
        if known is None:
            continue
        options, owner = known
        unknown = [key for key in node if key != "_target_" and key not in options]
        if unknown:
            raise unknown_option(group, str(unknown[0]), options, owner)


def check_callbacks(cfg: DictConfig) -> None:
    """Every entry of ``callbacks`` (conf/callbacks/) is null (removed) or a ``_target_`` that imports as a
    Lightning callback and takes the entry's other keys as arguments (``dirpath: null`` included)."""
    node = cfg.get("callbacks")
    if node is None:
        return
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"callbacks must be a mapping of name -> callback (conf/callbacks/default.yaml), got {node!r}")
    for name, options in node.items():
        if options is None:
            continue
        if not OmegaConf.is_dict(options):
            raise ConfigError(f"callbacks.{name}={options} is not a callback: each entry of callbacks is a mapping "
                              "with a _target_, and a file in conf/callbacks/ nests it under the callback's name "
                              "(as early_stopping.yaml: `early_stopping:` then `_target_: ...`)")
        target = options.get("_target_")
        if not target:
            named = [str(n) for n, o in node.items() if n != name and OmegaConf.is_dict(o) and o.get("_target_")]
            close = difflib.get_close_matches(str(name), named, n=1, cutoff=0.6)
            if close:
                raise ConfigError(f"unknown callback callbacks.{name}; did you mean callbacks.{close[0]}? "
                                  f"The run's callbacks: {', '.join(named)}")
            if str(name) in set(group_files("callbacks")) - {"default", "none"}:
                raise ConfigError(f"callbacks.{name} is not in this run's callbacks; add the shipped one with "
                                  f"callbacks=[default,{name}] (then callbacks.{name}.<argument>=... sets it)")
            raise ConfigError(f"callbacks.{name} needs a _target_, the callback's class: e.g. "
                              f"+callbacks.{name}._target_=lightning.pytorch.callbacks.EarlyStopping "
                              f"(or ~callbacks.{name} to remove it)")
        module_name, _, class_name = str(target).rpartition(".")
        try:  # not hydra's get_class, which logs its own report of the failure
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception:
            raise ConfigError(f"callbacks.{name}._target_={target} does not import; {import_hint(str(target))}"
                              "give the full path of a Lightning callback class, e.g. "
                              "lightning.pytorch.callbacks.EarlyStopping") from None
        # a class must be a Callback; a factory function is checked on what it returns (runtime/build.py)
        if not callable(cls) or isinstance(cls, type) and not issubclass(cls, lightning.Callback):
            raise ConfigError(f"callbacks.{name}._target_={target} is not a Lightning callback "
                              "(a subclass of lightning.pytorch.Callback, or a function returning one)")
        monitor = options.get("monitor")
        if isinstance(monitor, str):
            peers = cfg.get("peers")
            check_monitor(f"callbacks.{name}.monitor", monitor, peers if isinstance(peers, int) else len(peers or []))
        if "every_n_steps" in options and isinstance(cls, type) and issubclass(cls, LastCheckpoint):
            check_every_n_steps(options.every_n_steps, key=f"callbacks.{name}.every_n_steps")
        params = inspect.signature(cls).parameters
        owner = getattr(cls, "__name__", str(target))
        required = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name != "self"
                    and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        missing = [p for p in required if p not in options]
        if missing:
            raise ConfigError(f"callbacks.{name} ({owner}) needs {', '.join(missing)}: e.g. "
                              f"+callbacks.{name}.{missing[0]}=..." + (f" (the run's metric: {MONITOR})"
                                                                       if missing[0] == "monitor" else ""))
        names = argument_names(cls)
        unknown = [] if names is None else [key for key in options if not str(key).startswith("_") and key not in names]
        if unknown:
            raise unknown_option(f"callbacks.{name}", str(unknown[0]), names, owner)


def check_monitor(key: str, monitor: str, num_peers: int) -> None:
    """A ``val/...`` metric a callback watches is one the run logs (a typo would surface only after the
    first epoch, as Lightning's error or a checkpoint never written)."""
    if not monitor.startswith("val/"):
        return  # train/... terms depend on the method; a user's own callback may log its own names
    known = validation_metrics(num_peers)
    if monitor not in known:
        close = difflib.get_close_matches(monitor, known, n=1, cutoff=0.6)
        guess = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"{key}={monitor} is not a metric the run logs; {guess}validation logs val/best_peer/top1, "
                          "val/ensemble/top1, val/peer_mean/top1, val/peer<i>/top1 (and top5 of each but best_peer)")


def import_hint(target: str) -> str:
    """"did you mean <module>.<name>? " where ``target``'s module imports and has a close name, else ""."""
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return ""
    close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1, cutoff=0.6)
    return f"did you mean {module_name}.{close[0]}? " if close else ""


def unknown_option(group: str, key: str, options: Sequence[str], owner: str) -> ConfigError:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    guess = f"did you mean {group}.{close[0]}? " if close else ""
    shown = options if group != "trainer" else sorted(options)
    return ConfigError(f"unknown option {group}.{key} ({owner} has no option {key!r}); {guess}"
                       f"{group}'s options: {', '.join(shown) or 'none'}")


# -- Hydra's own errors ---------------------------------------------------------------------------
def explain_composition(error: Exception, overrides: Sequence[str],
                        compose: Callable[[list[str]], DictConfig]) -> ConfigError | None:
    """Hydra's "Could not override 'method.nce'" as the group's options: compose again with the override
    added (``+method.nce=...``; each unknown one in turn) and check the groups; None where that does not
    explain it."""
    forced = list(overrides)
    for _ in range(len(forced)):
        match = re.search(r"Could not override '([^']+)'", str(error))
        if match is None:
            return None
        key = match.group(1)
        if not any(o.split("=")[0] == key for o in forced):
            return None
        forced = [f"+{o}" if o.split("=")[0] == key else o for o in forced]
        try:
            composed = compose(forced)
            check_group_options(composed)
            check_callbacks(composed)
            return None
        except ConfigError as found:
            return found
        except Exception as again:  # another unknown option: add it too
            error = again
    return None


def missing_config_message(error: MissingConfigException) -> str:
    """An unknown group option (``backbone=resnet99``, ``experiment=cifar100/mcl_okd_resnet33``): the
    choices, or for experiments the closest recipes."""
    missing = error.missing_cfg_file or ""
    group, _, value = missing.partition("/")
    # Hydra lists the options for `group=name`, not for a name inside a list (`callbacks=[default,x]`)
    options = list(error.options or []) or group_files(group)
    if not group or not (options or group == "experiment"):
        return " ".join(str(error).split())
    choices = recipes() if group == "experiment" else options
    close = difflib.get_close_matches(value, choices, n=5, cutoff=0.6)
    if group == "experiment":
        shown = (f"the closest: {', '.join(close)}" if close else
                 f"choose one of the {len(choices)} recipes: {', '.join(choices)}")
        return f"unknown experiment {value!r}; {shown} (as experiment=<name>; conf/experiment/, docs/reproduction.md)"
    guess = f"did you mean {close[0]}? " if close else ""
    return f"unknown {group} {value!r}; {guess}choose one of: {', '.join(choices)} (as {group}=<name>)"


def group_files(group: str) -> list[str]:
    """The options of a config group shipped in conf/<group>/ (top level), or [] for no such group."""
    folder = resources.files("mcl_lightning.conf") / group
    if not group or "/" in group or not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipes() -> list[str]:
    """Every experiment recipe shipped in conf/experiment/, as ``experiment=`` names them."""
    root = resources.files("mcl_lightning.conf") / "experiment"
    names: list[str] = []

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml"):
                names.append(prefix + entry.name[: -len(".yaml")])

    walk(root, "")
    return sorted(names)


# -- a multirun -----------------------------------------------------------------------------------
def expand(arguments: Sequence[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper launches them, from the sweep's arguments."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(list(arguments)), None)
    return [list(job) for batch in batches for job in batch]


def check_sweep(config: DictConfig, load: Callable[[list[str]], DictConfig]) -> None:
    """Compose every job of a basic-sweeper multirun (``load``: its overrides -> its config) and check its
    groups: one ConfigError naming each job that cannot start, before any job runs."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if not sweeper.endswith("BasicSweeper"):
        return  # another sweeper (Optuna) draws its jobs as it goes
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    try:
        jobs = expand([f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task))
    except Exception:  # what the sweeper cannot expand either: its own error follows
        return
    if len(jobs) > 1:  # one job: its own error line is clear already
        check_jobs(jobs, load)


def check_jobs(jobs: Sequence[list[str]], load: Callable[[list[str]], DictConfig]) -> None:
    """Each job (named by its number and the swept values that set it apart) composed and checked."""
    common = set.intersection(*(set(job) for job in jobs)) if len(jobs) > 1 else set()
    failures = []
    for number, job in enumerate(jobs):
        try:
            check_group_options(load(job))
            continue
        except ConfigError as error:
            message = str(error)
        except MissingConfigException as error:
            message = missing_config_message(error)
        except Exception as error:
            message = str(explain_composition(error, job, load) or " ".join(str(error).split()))
        failures.append(f"job {number} ({' '.join(o for o in job if o not in common) or ' '.join(job)}): {message}")
    if failures:
        raise ConfigError(f"{len(failures)} of {len(jobs)} jobs of this multirun cannot start, so none was run: "
                          + "; ".join(failures))


def explain_sweep(error: Exception, arguments: Sequence[str],
                  compose: Callable[[list[str]], DictConfig]) -> ConfigError | None:
    """A multirun Hydra refused before any job (it composes the sweep's base config, without the swept
    values, first): the jobs that fail, each named, or, when every job takes the override, the fix."""
    try:
        check_jobs(expand(arguments), compose)
    except ConfigError as found:
        return found
    except Exception:
        return None
    match = re.search(r"Could not override '([^']+)'", str(error))
    if match is None:
        return None
    override = next((a for a in arguments if a.split("=")[0] == match.group(1)), match.group(1))
    return ConfigError(f"every job of this multirun takes {match.group(1)}, but Hydra first composes the sweep "
                       f"without its swept values, where it is unknown; write it as ++{override} (set where "
                       "the job has it, added where not)")
