"""Callbacks as a library and a config group: ``mcl_lightning.callbacks`` under a plain Trainer,
``conf/callbacks/`` composed as the CLI builds it (order, checkpoint folder, what needs a logger or a
bar), a callback added or removed on the command line, and each mistake in one line."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from torch.utils.data import DataLoader, TensorDataset

from mcl_lightning import ConfigError, OKDSystem, PeerNetwork
from mcl_lightning.callbacks import (MONITOR, BestCheckpoint, LastCheckpoint, LossTermsProgressBar, NonFiniteLossGuard,
                                     RankBatchNormStats, RunHistory, TrainThroughput)
from mcl_lightning.methods import DML
from mcl_lightning.runtime.build import build_callbacks
from mcl_lightning.runtime.overrides import check_callbacks
from mcl_lightning.system import MONITOR as SYSTEM_MONITOR

from conftest import TINY, only_error_line, run_cli

CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(*overrides: str):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def pairs(size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(size, 3, 32, 32, generator=generator), torch.arange(size) % 10)
    return DataLoader(data, batch_size=8)


def test_the_library_callbacks_under_a_plain_trainer(tmp_path):
    peers = PeerNetwork.from_backbone("resnet8", num_peers=2, num_classes=10)
    system = OKDSystem(peers, DML())
    last = LastCheckpoint(tmp_path / "ckpt", every_n_steps=3)
    best = BestCheckpoint(dirpath=tmp_path / "ckpt", monitor=MONITOR, mode="max")
    guard, throughput = NonFiniteLossGuard(), TrainThroughput(warmup_steps=1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_model_summary=False,
                        callbacks=[guard, RankBatchNormStats(), best, last, throughput, RunHistory(),
                                   LossTermsProgressBar()])
    trainer.fit(system, train_dataloaders=pairs(), val_dataloaders=pairs(16))
    assert last.path.is_file() and Path(best.best_model_path).is_file()
    assert guard.failure is None
    summary = throughput.summary(trainer, None)
    assert summary["train_images_per_s"] > 0 and 0 < summary["timed_images"] <= 7 * 8  # 8 steps, 1 warm-up
    assert (summary["train_dataset_size"], summary["val_dataset_size"]) == (32, 16)  # plain loaders' datasets
    saved = torch.load(last.path, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 8 and saved["epoch"] == 1


def test_the_default_group_is_what_the_cli_adds_in_order():
    cfg = composed()
    assert list(cfg.callbacks) == ["non_finite_guard", "rank_batchnorm_stats", "lr_monitor", "best_checkpoint",
                                   "last_checkpoint", "throughput", "history", "progress_bar"]
    assert cfg.callbacks.best_checkpoint.monitor == SYSTEM_MONITOR == MONITOR
    stopping = yaml.safe_load((CONF / "callbacks" / "early_stopping.yaml").read_text())["early_stopping"]
    assert stopping["monitor"] == MONITOR


def test_build_callbacks_fills_the_checkpoint_folder_and_leaves_out_what_cannot_run(tmp_path):
    cfg = composed("checkpoint.every_n_steps=7")
    built = build_callbacks(cfg, tmp_path, with_logger=True)
    kinds = [type(c) for c in built]
    assert kinds == [NonFiniteLossGuard, RankBatchNormStats, LearningRateMonitor, BestCheckpoint, LastCheckpoint,
                     TrainThroughput, RunHistory, LossTermsProgressBar]
    best, last = built[3], built[4]
    assert Path(best.dirpath) == tmp_path and last.dirpath == tmp_path and last.every_n_steps == 7
    quiet = build_callbacks(composed("trainer.enable_progress_bar=false"), tmp_path, with_logger=False)
    assert not any(isinstance(c, (LearningRateMonitor, LossTermsProgressBar)) for c in quiet)
    removed = build_callbacks(composed("~callbacks.throughput", "callbacks.history=null"), tmp_path, with_logger=True)
    assert not any(isinstance(c, (TrainThroughput, RunHistory)) for c in removed)
    added = build_callbacks(composed("callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=3"),
                            tmp_path, with_logger=True)
    assert isinstance(added[-1], EarlyStopping) and added[-1].patience == 3
    assert build_callbacks(composed("callbacks=none"), tmp_path, with_logger=True) == []


@pytest.mark.parametrize("overrides, expected", [
    (["callbacks=[default,early_stopping]", "+callbacks.early_stopping.patiense=3"],
     "unknown option callbacks.early_stopping.patiense (EarlyStopping has no option 'patiense'); "
     "did you mean callbacks.early_stopping.patience?"),
    (["+callbacks.lr_monitr.logging_interval=step"], "unknown callback callbacks.lr_monitr; did you mean callbacks.lr_monitor?"),
    (["+callbacks.stop.patience=3"], "callbacks.stop needs a _target_"),
    (["+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStoping"],
     "does not import; did you mean lightning.pytorch.callbacks.EarlyStopping?"),
    (["+callbacks.stop._target_=torch.nn.Linear"], "is not a Lightning callback"),
    (["+callbacks.early_stopping.patience=3"], "add the shipped one with callbacks=[default,early_stopping]"),
    (["callbacks.best_checkpoint.monitor=val/bestpeer/top1"],
     "callbacks.best_checkpoint.monitor=val/bestpeer/top1 is not a metric the run logs; did you mean val/best_peer/top1?"),
    (["peers=2", "callbacks=[default,early_stopping]", "callbacks.early_stopping.monitor=val/peer2/top1"],
     "did you mean val/peer1/top1?"),
    (["+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping"],
     "callbacks.stop (EarlyStopping) needs monitor: e.g. +callbacks.stop.monitor=... (the run's metric: val/best_peer/top1)"),
    (["callbacks.last_checkpoint.every_n_steps=-1"], "callbacks.last_checkpoint.every_n_steps must be an integer >= 0"),
    (["+callbacks.flat=3"], "callbacks.flat=3 is not a callback: each entry of callbacks is a mapping with a _target_"),
])
def test_a_callback_mistake_is_one_clear_message(overrides, expected):
    with pytest.raises(ConfigError) as raised:
        check_callbacks(composed(*overrides))
    assert expected in str(raised.value)


def make_early_stopping(patience: int) -> EarlyStopping:  # a factory as a _target_
    return EarlyStopping(MONITOR, mode="max", patience=patience)


def test_a_factory_function_is_a_target_and_its_result_is_checked(tmp_path):
    cfg = composed(f"+callbacks.stop._target_=test_callbacks.make_early_stopping", "+callbacks.stop.patience=2")
    check_callbacks(cfg)
    assert build_callbacks(cfg, tmp_path, with_logger=True)[-1].patience == 2
    with pytest.raises(ConfigError, match="callbacks.bad builds Identity, not a Lightning callback"):
        build_callbacks(composed("+callbacks.bad._target_=torch.nn.Identity"), tmp_path, with_logger=True)


def test_checkpointing_is_the_configs_or_none(tmp_path, data_root):
    from mcl_lightning.runtime.validation import check_config
    from mcl_lightning.train import build

    trainer = build(composed("callbacks=none", "logger=none", f"data.root={data_root}"), tmp_path, None)[2]
    assert trainer.checkpoint_callbacks == []  # Lightning added no ModelCheckpoint of its own
    off = build_callbacks(composed("++trainer.enable_checkpointing=false"), tmp_path, with_logger=True)
    assert not any(isinstance(c, (BestCheckpoint, LastCheckpoint)) for c in off)
    with pytest.raises(ConfigError, match=r"trainer.callbacks is built by the command line .* callbacks.<name>="):
        check_config(composed("++trainer.callbacks=[]", f"data.root={data_root}"))


def test_a_checkpoint_listed_before_the_best_one_is_warned_about(tmp_path):
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LastCheckpoint(tmp_path), BestCheckpoint(dirpath=tmp_path, monitor=MONITOR, mode="max")])
    system = OKDSystem(PeerNetwork.from_backbone("resnet8", num_peers=2, num_classes=10), DML())
    with pytest.warns(UserWarning, match="LastCheckpoint is listed before a ModelCheckpoint"):
        trainer.fit(system, train_dataloaders=pairs(8), val_dataloaders=pairs(8))


def test_the_shipped_callback_configs_pass_the_check():
    check_callbacks(composed("callbacks=[default,early_stopping]"))
    check_callbacks(composed("callbacks=none"))


def test_a_callback_is_added_and_others_removed_on_the_command_line(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_cli("mcl_lightning.train", f"data.root={data_root}", f"hydra.run.dir={run_dir}", "peers=2",
                   "backbone=resnet8", "method.nce_k=32", *TINY, "trainer.max_epochs=3", "trainer.limit_val_batches=1",
                   "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                   f"+callbacks.early_stopping.monitor={MONITOR}", "+callbacks.early_stopping.mode=max",
                   "+callbacks.early_stopping.stopping_threshold=0.0",  # any top-1 reaches it: stop after epoch 0
                   "~callbacks.throughput", "callbacks.last_checkpoint=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 1 and results["throughput"] is None and results["stopped_by"] == "early_stopping"
    assert results["checkpoints"]["last"] is None and results["checkpoints"]["best"]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


def test_a_mistyped_callback_option_is_one_line_on_the_command_line(tmp_path, data_root):
    proc = run_cli("mcl_lightning.train", f"data.root={data_root}", f"hydra.run.dir={tmp_path / 'run'}",
                   "callbacks.lr_monitor.logging_intervl=step")
    line = only_error_line(proc)
    assert "did you mean callbacks.lr_monitor.logging_interval?" in line
    assert not (tmp_path / "run").exists()
