"""Issue 26, items 3 and 4: the optimiser and scheduler from the config (Hydra partials, ``conf/optim/``) and
``OKDSystem(optimizer=, scheduler=)``; named parameter groups (stable lr tags); per-step training losses at
``log_every_n_steps``; the method, network and seed in the system's hyperparameters, the whole config in
every logger's."""

from __future__ import annotations

import csv
import math
from functools import partial

import lightning as L
import pytest
import torch
import yaml
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from mcl_lightning import MCLOKD, ConfigError, OKDSystem, PeerNetwork
from mcl_lightning.methods import DML
from mcl_lightning.runtime.optim import epoch_schedule, optim_options
from mcl_lightning.runtime.tracking import log_config
from test_batch_contract import CLASSES, PairData
from test_train import _compose


def _peers(n: int = 2) -> PeerNetwork:
    return PeerNetwork.from_backbone("resnet8", num_peers=n, num_classes=CLASSES)


def _fit(tmp_path, system: OKDSystem, epochs: int = 1, **kwargs) -> L.Trainer:
    run = L.Trainer(max_epochs=epochs, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, **kwargs)
    run.fit(system, datamodule=PairData(with_index=True))  # MCL-OKD's memory banks need the indices
    return run


def test_the_default_optim_config_builds_the_reference_sgd_and_cosine():
    cfg = _compose(["peers=2", "backbone=resnet20", "trainer.max_epochs=7"])
    options = optim_options(cfg.optim)
    system = OKDSystem(_peers(), MCLOKD(nce_k=8), **options)
    reference = OKDSystem(_peers(), MCLOKD(nce_k=8))  # the Python defaults
    system.hparams.scheduler = reference.hparams.scheduler = "cosine"
    built = options["optimizer"]([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(built, torch.optim.SGD)
    expected = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True, foreach=True)
    assert {k: built.defaults[k] for k in expected} == expected
    schedule = options["scheduler"](built)
    factors = [schedule.lr_lambdas[0](e) for e in range(7)]
    assert factors == [0.5 * (1.0 + math.cos(math.pi * e / 7)) for e in range(7)]  # bit for bit, not approx
    assert system.hparams.lr == 0.05 and "optimizer" not in system.hparams


def test_old_scheduler_options_still_compose():
    cfg = _compose(["optim.scheduler=multistep", "optim.milestones=[2,4]", "optim.lr_decay=0.5", "optim.lr=0.2"])
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    schedule = instantiate(cfg.optim.lr_scheduler)(optimizer)
    assert optimizer.defaults["lr"] == 0.2 and isinstance(schedule, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(schedule.milestones) == {2: 1, 4: 1} and schedule.gamma == 0.5


def test_adamw_with_warmup_and_cosine_trains(tmp_path):
    cfg = _compose(["optim=adamw", "optim.warmup_epochs=2", "trainer.max_epochs=4"])
    system = OKDSystem(_peers(), DML(), **optim_options(cfg.optim))
    before = [p.detach().clone() for p in system.peers.parameters()]
    lrs = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _fit(tmp_path, system, epochs=4, callbacks=[Record()], logger=False, limit_train_batches=1, limit_val_batches=1)
    assert isinstance(system.trainer.optimizers[0], torch.optim.AdamW)
    # warm-up 1/3, 2/3 of lr, then one cosine cycle over the remaining two epochs
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.5e-3])
    assert any(not torch.equal(a, b) for a, b in zip(before, system.peers.parameters()))
    assert all(torch.isfinite(p).all() for p in system.peers.parameters())


def test_warmup_must_end_before_the_last_epoch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="optim.warmup_epochs must be in"):
        epoch_schedule(optimizer, "warmup_cosine", max_epochs=3, warmup_epochs=3)


def test_python_optimizer_and_scheduler_callables(tmp_path):
    system = OKDSystem(_peers(), MCLOKD(nce_k=8, projection_dim=8), optimizer=partial(torch.optim.AdamW, lr=2e-3),
                       scheduler=lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                              "interval": "step"})
    run = _fit(tmp_path, system, logger=False, limit_train_batches=2, limit_val_batches=1)
    assert isinstance(run.optimizers[0], torch.optim.AdamW)
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3 * 0.25)  # stepped per step, twice
    # the callable stays out of the checkpoint's hyperparameters (weights_only loading, and a reload takes
    # `scheduler` back as a name); its name goes in apart, for the resume check and the loggers
    assert "scheduler" not in system.hparams
    assert system.hparams["scheduler_callable"].endswith("test_python_optimizer_and_scheduler_callables.<locals>.<lambda>")


@pytest.mark.parametrize("method", [DML(), MCLOKD(nce_k=8, projection_dim=8)], ids=["dml", "mcl_okd"])
def test_parameter_groups_are_named_so_lr_tags_are_the_same_for_every_method(tmp_path, method):
    system = OKDSystem(_peers(), method)
    _fit(tmp_path, system, callbacks=[LearningRateMonitor("epoch")], logger=CSVLogger(tmp_path),
         limit_train_batches=1, limit_val_batches=1)
    with open(system.logger.log_dir + "/metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert "lr-SGD/peers" in columns
    assert ("lr-SGD/method" in columns) == (method.name == "mcl_okd")  # DML has no parameters of its own


def test_training_losses_are_logged_per_step_and_per_epoch(tmp_path):
    L.seed_everything(3)
    system = OKDSystem(_peers(), MCLOKD(nce_k=8, projection_dim=8))
    _fit(tmp_path, system, epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1, limit_val_batches=1)
    with open(system.logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    steps = [r for r in rows if r.get("train_step/loss")]
    assert len(steps) == 6  # 3 batches of 16 a epoch, 2 epochs, every step logged
    assert all(r["train_step/loss/contrastive"] and r["train_step/loss/ce"] for r in steps)
    epoch_means = [r for r in rows if r.get("train/loss")]  # what curves.png and the readers use
    assert [r["epoch"] for r in epoch_means] == ["0", "1"] and all(r["train/loss/ce"] for r in epoch_means)
    hparams = yaml.safe_load(open(system.logger.log_dir + "/hparams.yaml"))
    assert hparams["method_name"] == "mcl_okd" and hparams["method_options"]["nce_k"] == 8
    assert hparams["network"]["backbone"] == "resnet8" and hparams["network"]["num_peers"] == 2
    assert hparams["global_seed"] == 3 and hparams["lr"] == 0.05


def test_the_run_config_goes_into_the_csv_loggers_hparams(tmp_path):
    logger = CSVLogger(tmp_path)
    log_config([logger], {"method": {"_target_": "mcl_lightning.methods.DML"}, "peers": 4, "seed": 1,
                          "optim": {"lr": 0.1}})
    logger.save()
    hparams = yaml.safe_load(open(logger.log_dir + "/hparams.yaml"))
    assert hparams["config"]["peers"] == 4 and hparams["config"]["optim"]["lr"] == 0.1


def test_the_python_guides_optimizer_example_builds_adamw_with_warmup():
    from conftest import doc_block

    namespace = {"OKDSystem": OKDSystem, "MCLOKD": MCLOKD, "peers": _peers()}
    exec(doc_block("python-optimizer", "python"), namespace)
    config = namespace["system"].configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert [g["name"] for g in config["optimizer"].param_groups] == ["peers", "method"]
    assert config["lr_scheduler"]["scheduler"].lr_lambdas[0](0) == pytest.approx(1 / 6)
