"""The LightningModule: peers + an OKD method, metrics, and the optimiser.

One training step, one way: batch -> peers(images) -> PeerOutput -> method(...) -> {name: loss}
-> sum -> backward. The system knows no method's internals; methods know no optimiser.
"""

from __future__ import annotations

import os
import random
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.core.registry import check_choice
from mcl_lightning.data.indexed import batch_images, split_batch
from mcl_lightning.methods.base import OKDMethod
from mcl_lightning.runtime.checkpointing import incompatible, read_checkpoint, state_differences
from mcl_lightning.runtime.optim import (
    SCHEDULES, OptimizerFactory, SchedulerFactory, check_sgd, epoch_schedule, lightning_schedule, reference_sgd,
    schedule_record)
from mcl_lightning.runtime.metrics import MONITOR, PeerMetrics  # noqa: F401 (MONITOR: system.MONITOR, as before)
from mcl_lightning.models.contract import PeerOutput
from mcl_lightning.models.peers import PeerNetwork
from mcl_lightning.core.spec import build_method, method_spec



def _kind(value: Any) -> str:
    return f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__


class OKDSystem(L.LightningModule):
    """Trains ``peers`` with ``method``: one optimiser over the peers and the method's own parameters.

    Args:
        peers: the peer network (``PeerNetwork.from_backbone`` or ``PeerNetwork.from_modules``).
        method: an ``OKDMethod`` (options only: the system attaches it to ``peers``, which builds
            whatever it needs of the network, such as projection heads).
        num_classes: number of classes, for the metrics (default: the peers' classifier width).
        lr, momentum, weight_decay, nesterov: the default optimiser, the reference's SGD (0.05, 0.9, 5e-4,
            Nesterov; weight decay on every parameter, BN and heads included, as the reference).
        scheduler: the name of a per-epoch schedule: ``cosine`` (``lr * 0.5 * (1 + cos(pi * e /
            max_epochs))``, the reference's one-cycle SGDR), ``warmup_cosine`` (linear warm-up over
            ``warmup_epochs``, then cosine), ``multistep`` (x ``lr_decay`` at ``milestones``) or ``constant``;
            or ``callable(optimizer)`` returning an LRScheduler (stepped per epoch), a Lightning
            ``lr_scheduler`` dict (e.g. ``{"scheduler": s, "interval": "step"}``) or ``None``.
        optimizer: ``callable(param_groups) -> Optimizer`` in place of the reference SGD, e.g.
            ``functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)``. The groups are named
            ``peers`` and ``method`` (the method's own parameters, such as heads, if it has any), so
            LearningRateMonitor logs ``lr-<Optimizer>/peers`` for every method.
    """

    def __init__(
        self,
        peers: PeerNetwork,
        method: OKDMethod,
        num_classes: int | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        scheduler: str | SchedulerFactory = "cosine",
        milestones: Sequence[int] = (150, 200, 250),
        lr_decay: float = 0.1,
        warmup_epochs: int = 0,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        # the classes themselves, or another module: attach()/spec() would fail with a bare TypeError
        if not isinstance(method, OKDMethod):
            raise TypeError(f"OKDSystem's method must be an OKDMethod instance, e.g. MCLOKD(nce_k=256); got {_kind(method)}")
        if isinstance(peers, type) or not callable(getattr(peers, "spec", None)):
            raise TypeError("OKDSystem's peers must be a PeerNetwork (or FusedPeerNetwork) instance, e.g. "
                            f"PeerNetwork.from_backbone('resnet32', num_peers=4); got {_kind(peers)}")
        if isinstance(scheduler, str):
            check_choice("optim.scheduler", scheduler, SCHEDULES)
        if optimizer is None:
            check_sgd(lr, momentum, weight_decay)
        spec = peers.spec()
        method.attach(spec)  # the one place where a method meets its network
        num_classes = spec.num_classes if num_classes is None else num_classes
        if num_classes < 1:  # peers whose classifiers hold no nn.Linear: the metrics need the class count
            raise ConfigError("the peers' classifiers do not tell the number of classes; pass OKDSystem(..., num_classes=N)")
        milestones = [int(m) for m in milestones]  # plain list: checkpoints load with weights_only=True
        # callables stay out of the hyperparameters (checkpoints load with weights_only=True); what was
        # trained goes in, for every logger's hparams: a DML and an MCL-OKD run differ in more than lr
        self.save_hyperparameters(ignore=["peers", "method", "optimizer", *([] if isinstance(scheduler, str) else ["scheduler"])])
        self.save_hyperparameters({**self.hparams, **describe(peers, method), **schedule_record(scheduler)})
        self.optimizer_factory = optimizer
        self.scheduler_factory = None if isinstance(scheduler, str) else scheduler
        self.peers = peers
        self.method = method
        self.val_metrics = PeerMetrics(peers.num_peers, num_classes)
        self.test_metrics = PeerMetrics(peers.num_peers, num_classes)
        self.val_history: list[dict[str, float]] = []  # one entry per validation epoch
        self.test_results: dict[str, float] = {}

    def forward(self, images: Tensor) -> PeerOutput:
        return self.peers(images)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        labels = getattr(self.trainer.datamodule, "train_labels", None) if self.trainer.datamodule else None
        if labels is None:
            if self.method.needs_train_labels:
                raise ConfigError(
                    f"method {self.method.name!r} needs the training labels: pass a DataModule with a "
                    "`train_labels` tensor (dataset-index order, e.g. WithIndex(train_set).labels) to trainer.fit"
                )
            return
        self.method.setup_data(labels)

    # -- training ---------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes in the middle of an epoch.
        self.method.set_epoch(self.current_epoch, self.trainer.max_epochs)

    def on_train_epoch_start(self) -> None:
        self.method.set_epoch(self.current_epoch, self.trainer.max_epochs)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Any]:
        # (images, labels) or (images, labels, dataset indices): memory-bank methods need the indices
        images, labels, indices = split_batch(batch, self.method.needs_indices, f"method {self.method.name!r}")
        output = self.peers(images)
        losses = self.method(output, labels, indices)
        loss = torch.stack(list(losses.values())).sum()
        batch_size = labels.shape[0]
        # Epoch means accumulate on the device: no host sync inside the step. Under DDP they are reduced
        # across ranks once, at the end of the epoch.
        log = dict(on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        # Per-step values (this rank's, no collective) as train_step/...: Lightning keeps the tensor and
        # reads it at logging steps only (trainer.log_every_n_steps); the epoch means keep their train/ names.
        step = dict(on_step=True, on_epoch=False, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/loss/{name}", value, **log)
            self.log(f"train_step/loss/{name}", value.detach(), **step)
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train_step/loss", loss.detach(), **step)
        correct = (output.logits.detach().argmax(-1) == labels).float().mean(1)
        for i, acc in enumerate(correct):
            self.log(f"train/peer{i}/top1", acc, **log)
        # the terms, detached, for the non-finite guard and the progress bar (read on the host later)
        return {"loss": loss, "terms": {name: value.detach() for name, value in losses.items()}}

    # -- evaluation -------------------------------------------------------------------------
    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._update_metrics(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val", self.val_metrics)
        if not self.trainer.sanity_checking:
            self.val_history.append({**values, "epoch": self.current_epoch})

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._update_metrics(self.test_metrics, batch)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metrics("test", self.test_metrics)

    def _update_metrics(self, metrics: PeerMetrics, batch: Sequence[Tensor]) -> None:
        images, labels, _ = split_batch(batch, False, "evaluation")  # evaluation never needs the indices
        output = self.peers(images)
        metrics.update(output.logits, labels, self.method.ensemble(output))

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"peers": logits (N, B, classes), "ensemble": the method's ensemble logits (B, classes)}`` for a
        batch of images alone or ``(images, ...)``."""
        output = self.peers(batch_images(batch))
        return {"peers": output.logits, "ensemble": self.method.ensemble(output)}

    def _log_metrics(self, stage: str, metrics: PeerMetrics) -> dict[str, float]:
        """Compute, log (as ``<stage>/<name>``) and reset; returns the values as floats."""
        values = metrics.compute()
        metrics.reset()
        # torchmetrics already reduced over ranks; sync_dist only averages identical values
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=True)
        return {k: float(v) for k, v in values.items()}

    # -- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        settings = dict(lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        # named groups: LearningRateMonitor's tags (lr-SGD/peers, lr-SGD/method) are the same for every method
        groups = [{"name": "peers", "params": list(self.peers.parameters())}]
        own = self.method.parameter_groups(settings)
        for i, group in enumerate(own):
            group.setdefault("name", "method" if len(own) == 1 else f"method{i}")
        optimizer = (self.optimizer_factory or partial(reference_sgd, **settings))(groups + own)
        schedule = self.scheduler_factory
        if schedule is None:  # a named schedule (hparams: a test or a user may change it before fit)
            max_epochs = self._trainer.max_epochs if self._trainer is not None else None
            schedule = partial(epoch_schedule, kind=hp.scheduler, max_epochs=max_epochs, milestones=hp.milestones,
                               gamma=hp.lr_decay, warmup_epochs=hp.get("warmup_epochs", 0))
        entry = lightning_schedule(schedule(optimizer))
        return {"optimizer": optimizer, **({"lr_scheduler": entry} if entry else {})}

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_history"] = self.val_history
        # OKDSystem.from_checkpoint / mcl_lightning.export rebuild peers and method from the checkpoint alone
        checkpoint["peers_spec"] = self.peers.build_spec
        checkpoint["method_spec"] = method_spec(self.method)
        if self._trainer is not None:  # what mcl_lightning.evaluate needs to test it as it was trained
            checkpoint["precision"] = str(self.trainer.precision)
            checkpoint["max_epochs"] = self.trainer.max_epochs  # the cosine period: a resume must keep it
            if self.trainer.datamodule is not None:
                cls = type(self.trainer.datamodule)
                checkpoint["datamodule_class"] = f"{cls.__module__}.{cls.__qualname__}"
        # Negatives, bank initialisation and the library's augmentation use keyed streams (core/rng.py),
        # not these; a user's own transforms, dropout or sampler may draw from the global RNGs, and
        # saving them lets a resumed single-device run continue as an uninterrupted one (Lightning does not).
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:

        # After setup (banks sized for this data), before the weights load: a mismatch is one clear message.
        diffs = state_differences(checkpoint["state_dict"], self.state_dict())
        if diffs and self._trainer is not None:
            raise incompatible(None, diffs)
        self.val_history = list(checkpoint.get("val_history", []))
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    # -- rebuilding -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu") -> "OKDSystem":
        """The trained system, peers and method rebuilt from the checkpoint alone (no Hydra, no arguments)."""
        checkpoint = read_checkpoint(path)
        peers_spec, spec = checkpoint.get("peers_spec"), checkpoint.get("method_spec")
        if peers_spec is None or spec is None:
            missing = "peers" if peers_spec is None else "method"
            raise ConfigError(
                f"{path} does not describe its {missing} (built from your own modules or options, or written "
                "before checkpoints carried them); use OKDSystem.load_from_checkpoint(path, peers=..., method=...)")
        peers = PeerNetwork.from_backbone(**peers_spec)
        return cls.load_from_checkpoint(path, map_location=map_location, peers=peers, method=build_method(spec))


def describe(peers: PeerNetwork, method: OKDMethod) -> dict[str, Any]:
    """The method (name and options), the network (backbone, peer count, topology) and lightning.seed_everything's seed
    (``global_seed``: data modules may have a `seed` of their own), as plain data."""
    options = (method_spec(method) or {}).get("options", {})
    network = peers.build_spec or {"num_peers": peers.num_peers, "backbone": "own modules (PeerNetwork.from_modules)"}
    seed = os.environ.get("PL_GLOBAL_SEED")  # set by lightning.seed_everything
    return {"method_name": method.name, "method_options": options, "network": dict(network),
            "global_seed": None if seed is None else int(seed)}


def rng_states() -> dict[str, Any]:
    """The states of the torch (CPU and CUDA), NumPy and Python RNGs."""
    # Tensors and plain Python values only, so checkpoints still load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)]
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
