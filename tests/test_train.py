"""The Hydra entry point: config composition, real-data runs, multirun, user errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from mcl_lightning.methods import OKDMethod
from mcl_lightning.models import PeerNetwork, count_parameters

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "data.eval_batch_size=64",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def run_train(*overrides: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mcl_lightning.train", *overrides],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=900,
    )


def _compose(overrides: list[str]):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("backbone", options("backbone"))
def test_every_backbone_option_composes_and_builds(backbone, data_root):
    cfg = _compose([f"backbone={backbone}", "peers=2", f"data.root={data_root}"])
    peers = instantiate(cfg.model)
    assert isinstance(peers, PeerNetwork) and peers.num_peers == 2
    assert peers.export_peer(0).classifier.out_features == 100
    assert cfg.backbone.name == backbone


@pytest.mark.parametrize("method", options("method"))
def test_every_method_option_composes_and_builds(method):
    cfg = _compose([f"method={method}", "peers=3", "backbone=resnet20"])
    built = instantiate(cfg.method)(num_peers=3, feature_dim=64)
    assert isinstance(built, OKDMethod) and built.name == method


@pytest.mark.parametrize("data", options("data"))
def test_every_data_option_composes(data, data_root):
    cfg = _compose([f"data={data}", f"data.root={data_root}"])
    datamodule = instantiate(cfg.data)
    assert datamodule.num_classes == cfg.data.num_classes == cfg.model.num_classes


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_option_composes(trainer):
    cfg = _compose([f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    if "strategy" in cfg.trainer:  # DDP: the banks need broadcast_buffers off (see ddp.yaml)
        strategy = instantiate(cfg.trainer.strategy)
        assert strategy._ddp_kwargs["broadcast_buffers"] is False
    if cfg.trainer.accelerator in ("cpu", "auto"):
        assert instantiate(cfg.trainer, logger=False, enable_checkpointing=False) is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_builds(experiment):
    cfg = _compose([f"experiment={experiment}"])
    peers = instantiate(cfg.model)
    method = instantiate(cfg.method)(num_peers=peers.num_peers, feature_dim=peers.feature_dim)
    assert peers.num_peers == cfg.peers == 4 and cfg.reference.source
    assert cfg.trainer.max_epochs == 300 and cfg.data.batch_size == 64
    assert method.name in experiment


def test_paper_experiments_use_the_papers_networks_and_k():
    r110 = _compose(["experiment=mcl_okd_cifar100_resnet110"])
    assert r110.backbone.name == "resnet110_bottleneck" and r110.method.nce_k == 256
    r32 = _compose(["experiment=mcl_okd_cifar100_resnet32"])
    assert r32.backbone.name == "resnet32" and r32.method.nce_k == 256 and r32.optim.lr == 0.05


def test_overrides_change_what_their_names_say():
    cfg = _compose(["peers=3", "backbone=wrn_16_2", "topology=independent", "method.beta=0.5", "method.nce_k=32",
                    "method.tau=0.2", "optim.lr=0.1", "seed=5"])
    peers = instantiate(cfg.model)
    method = instantiate(cfg.method)(num_peers=peers.num_peers, feature_dim=peers.feature_dim)
    assert peers.num_peers == 3 and peers.feature_dim == 128
    assert count_parameters(peers) == 3 * count_parameters(peers.export_peer(0))  # independent
    assert (method.beta, method.negatives.k, method.tau) == (0.5, 32, 0.2)
    assert cfg.optim.lr == 0.1 and cfg.seed == 5


def test_train_entry_point_independent_on_real_data(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_train("peers=4", "backbone=resnet20", "method=independent", f"data.root={data_root}",
                     f"hydra.run.dir={run_dir}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "independent" and results["peers"] == 4
    assert results["selection"] == "test-selected" and results["epochs_run"] == 1
    assert results["global_batch_size"] == 64 and results["learning_rate"] == 0.05 and results["seed"] == 0
    for part in ("final", "best", "test"):
        assert set(results[part]) == {"peer0", "peer1", "peer2", "peer3", "peer_mean", "ensemble", "best_peer"}
        assert 0.0 <= results[part]["ensemble"]["top1"] <= 1.0 and "top5" in results[part]["peer3"]
    assert Path(results["checkpoints"]["last"]).is_file()
    assert Path(results["checkpoints"]["best"]).is_file()
    assert results["config"]["backbone"]["name"] == "resnet20"
    assert "peer_mean" in proc.stdout and "ensemble" in proc.stdout  # the end-of-run table


def test_mcl_okd_run_logs_three_loss_terms_per_epoch(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_train("peers=4", "backbone=resnet20", f"data.root={data_root}", "method.nce_k=256",
                     f"hydra.run.dir={run_dir}", *TINY, "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mcl_okd" and results["peers"] == 4 and results["epochs_run"] == 2
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    for term in ("ce", "online_teacher_kd", "contrastive"):
        epochs = {int(r["epoch"]) for r in rows if r.get(f"train/loss/{term}")}
        assert epochs == {0, 1}, term
    assert any(r.get("val/ensemble/top1") for r in rows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_multirun_gives_each_job_its_own_directory(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "seed=0,1", "peers=2", "backbone=resnet20", "method=independent",
                     f"data.root={data_root}", f"hydra.sweep.dir={sweep}", *TINY, "trainer.limit_val_batches=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = sorted(json.loads(p.read_text())["seed"] for p in sweep.glob("*/results.json"))
    assert seeds == [0, 1]


def test_missing_data_root_is_one_clear_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MCL_DATA_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "mcl_lightning.train", "peers=2", "backbone=resnet20",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "MCL_DATA_ROOT" in proc.stderr and "data.root" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_values_are_one_clear_message(tmp_path, data_root):
    proc = run_train("peers=1", "backbone=resnet20", f"data.root={data_root}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "peers >= 2" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train("method.nce_k=60000", "backbone=resnet20", f"data.root={data_root}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "nce_k=60000" in proc.stderr and "Traceback" not in proc.stderr
