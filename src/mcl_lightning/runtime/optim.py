"""The optimiser and its learning-rate schedule, as the callables ``OKDSystem(optimizer=, scheduler=)`` takes.

``optimizer(param_groups) -> torch.optim.Optimizer`` and ``scheduler(optimizer) -> LRScheduler | dict | None``
(a Lightning ``lr_scheduler`` dict, e.g. ``{"scheduler": ..., "interval": "step"}``; ``None``: constant).
``conf/optim/`` builds both as Hydra partials (``_target_`` + ``_partial_: true``); the defaults here are the
reference's: SGD (Nesterov, momentum 0.9, weight decay 5e-4 on every parameter, ``foreach``) and one cosine
cycle stepped per epoch (``main_cifar_mcl_okd.py``'s SGDR with T0 = the number of epochs).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.core.registry import check_choice

SCHEDULES = ("cosine", "warmup_cosine", "multistep", "constant")
OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def reference_sgd(params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                  nesterov: bool = True) -> torch.optim.SGD:
    """The reference's SGD over ``params`` (parameters or groups)."""
    check_sgd(lr, momentum, weight_decay)
    # foreach: a few multi-tensor ops per group instead of a few ops per parameter (what torch picks on
    # CUDA anyway; on the CPU the same elementwise maths, bit for bit: tests/test_system.py)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, foreach=True)


def check_sgd(lr: float, momentum: float, weight_decay: float) -> None:
    if not lr > 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
        raise ConfigError(f"optim needs lr > 0, momentum in [0, 1) and weight_decay >= 0; got optim.lr={lr}, "
                          f"optim.momentum={momentum}, optim.weight_decay={weight_decay}")


def epoch_schedule(optimizer: torch.optim.Optimizer, kind: str = "cosine", max_epochs: int | None = None,
                   milestones: Sequence[int] = (150, 200, 250), gamma: float = 0.1,
                   warmup_epochs: int = 0) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch schedule: ``cosine`` (``0.5 * (1 + cos(pi * e / max_epochs))``), ``warmup_cosine`` (lr
    rising linearly over ``warmup_epochs``, ``(e + 1) / (warmup_epochs + 1)``, then one cosine cycle over the
    remaining epochs), ``multistep`` (x ``gamma`` at ``milestones``) or ``constant`` (``None``)."""
    check_choice("optim.scheduler", kind, SCHEDULES)
    if kind == "constant":
        return None
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(m) for m in milestones], gamma=gamma)
    if max_epochs is None or max_epochs < 1:
        raise ConfigError(f"scheduler={kind} needs trainer.max_epochs >= 1, the cosine period (in Python: "
                          "L.Trainer(max_epochs=...), or OKDSystem(scheduler=...) with a schedule that needs none)")
    if kind == "cosine":  # the reference's expression, kept as it is: the bit-exact tests compare lrs
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / max_epochs)))
    warmup = int(warmup_epochs)
    if not 0 <= warmup < max_epochs:
        raise ConfigError(f"optim.warmup_epochs must be in [0, trainer.max_epochs); got {warmup_epochs} with "
                          f"trainer.max_epochs={max_epochs}")

    def factor(e: int) -> float:
        if e < warmup:
            return (e + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (e - warmup) / (max_epochs - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Schedules whose lr at an epoch depends on trainer.max_epochs (the cosine period): a resume must keep it.
SPANS_MAX_EPOCHS = ("cosine", "warmup_cosine")


def schedule_name(scheduler: str | SchedulerFactory | None) -> str | None:
    """What a checkpoint records and a resume compares: a shipped per-epoch schedule by its name (also when it
    comes as ``conf/optim``'s partial of :func:`epoch_schedule`), any other callable by its qualified name."""
    if scheduler is None or isinstance(scheduler, str):
        return scheduler
    func = getattr(scheduler, "func", scheduler)  # functools.partial: Hydra's `_partial_: true`
    if func is epoch_schedule:
        return getattr(scheduler, "keywords", {}).get("kind", "cosine")
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', type(func).__name__)}"


def schedule_record(scheduler: str | SchedulerFactory | None) -> dict[str, str | None]:
    """The schedule as a checkpoint's hyperparameters hold it: a shipped schedule as ``scheduler`` (what
    ``OKDSystem(scheduler=)`` takes back on reload), any other callable as ``scheduler_callable`` (its name only:
    reloading falls back to the constructor's default)."""
    name = schedule_name(scheduler)
    return {"scheduler": name} if name is None or name in SCHEDULES else {"scheduler_callable": name}


def recorded_schedule(record: dict[str, Any]) -> str | None:
    """The schedule a ``schedule_record`` (or an older checkpoint's ``scheduler``) names."""
    return record.get("scheduler_callable") or record.get("scheduler")


def lightning_schedule(schedule: Any) -> dict[str, Any] | None:
    """A scheduler factory's result as Lightning's ``lr_scheduler`` entry (a bare scheduler steps per epoch)."""
    if schedule is None or isinstance(schedule, dict):
        return schedule
    return {"scheduler": schedule, "interval": "epoch"}


def optim_options(optim_cfg: Any) -> dict[str, Any]:
    """``OKDSystem``'s optimiser arguments from the ``optim`` config node (``conf/optim/``): the two partials,
    and the plain options the system records in its hyperparameters (``lr``, ``weight_decay``, ...)."""
    from hydra.utils import instantiate  # here: the library's Python path needs no Hydra
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(optim_cfg, resolve=True)
    recorded = {k: plain[k] for k in ("lr", "momentum", "weight_decay", "nesterov", "milestones", "lr_decay",
                                      "warmup_epochs") if k in plain}
    return {**recorded, "optimizer": instantiate(optim_cfg.optimizer), "scheduler": instantiate(optim_cfg.lr_scheduler)}
