"""The Hydra entry point: config composition, real-data runs, multirun, user errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mcl_lightning.runtime.ddp import DEFAULT_TIMEOUT_S
from mcl_lightning.methods import OKDMethod
from mcl_lightning.models import PeerNetwork, count_parameters
from mcl_lightning.runtime.overrides import check_group_options
from mcl_lightning.train import build_network

from conftest import TINY, check_two_peer_run, only_error_line, tiny_training_run  # noqa: F401  (TINY: imported by other test files)

CONF = Path(__file__).resolve().parents[1] / "conf"
def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def run_train(*overrides: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mcl_lightning.train", *overrides],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=900,
    )


def _compose(overrides: list[str]):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    check_group_options(cfg)  # every key is an option of its group (what the entry point checks first)
    return cfg


@pytest.mark.parametrize("backbone", options("backbone"))
def test_every_backbone_option_composes_and_builds(backbone, data_root):
    if backbone == "timm":
        pytest.importorskip("timm", reason='backbone=timm needs pip install "mcl-lightning[timm]"')
    cfg = _compose([f"backbone={backbone}", "peers=2", f"data.root={data_root}"])
    peers = instantiate(cfg.model)
    assert isinstance(peers, PeerNetwork) and peers.num_peers == 2
    deployed = peers.export_peer(0).eval()
    with torch.no_grad():
        assert deployed(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    # backbone=timm / torchvision name a library; backbone.name is then the library's model name
    assert cfg.backbone.name == backbone or cfg.backbone.get("library") == backbone


@pytest.mark.parametrize("method", options("method"))
def test_every_method_option_composes_and_builds(method):
    cfg = _compose([f"method={method}", "peers=3", "backbone=resnet20"])
    peers, built = build_network(cfg)
    assert isinstance(built, OKDMethod) and built.name == method and built.spec == peers.spec()


@pytest.mark.parametrize("data", options("data"))
def test_every_data_option_composes(data, data_root):
    root = data_root / "imagenette-mini" if data == "imagenet" else data_root  # ImageNet-style folders
    cfg = _compose([f"data={data}", f"data.root={root}"])
    datamodule = instantiate(cfg.data)
    assert datamodule.num_classes == cfg.data.num_classes == cfg.model.num_classes


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_option_composes(trainer):
    cfg = _compose([f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    if "strategy" in cfg.trainer:  # DDP: the banks need broadcast_buffers off (see ddp.yaml)
        strategy = instantiate(cfg.trainer.strategy)
        assert strategy._ddp_kwargs["broadcast_buffers"] is False
        # a lost rank ends the job after minutes, not PyTorch's 30 (tests/test_ddp_failures.py)
        assert strategy._timeout == timedelta(seconds=DEFAULT_TIMEOUT_S) < timedelta(minutes=30)
    if cfg.trainer.accelerator in ("cpu", "auto"):
        assert instantiate(cfg.trainer, logger=False, enable_checkpointing=False) is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_builds(experiment):
    cfg = _compose([f"experiment={experiment}"])
    peers, method = build_network(cfg)
    assert peers.num_peers == cfg.peers and cfg.reference.source and cfg.reference.top1_error.peer
    assert cfg.trainer.max_epochs == 300 and cfg.optim.scheduler == "cosine"
    if experiment.startswith("mcl_okd"):
        assert method.name == "mcl_okd" and peers.num_peers == 4 and cfg.data.batch_size == 64


def test_baseline_experiment_is_one_plain_network():
    cfg = _compose(["experiment=baseline_cifar100_resnet32"])
    peers = instantiate(cfg.model)
    assert peers.num_peers == 1 and count_parameters(peers) == 472_756
    assert cfg.method._target_.endswith("Independent") and cfg.data.batch_size == 128 and cfg.optim.lr == 0.1


def test_paper_experiments_use_the_papers_networks_and_k():
    r110 = _compose(["experiment=mcl_okd_cifar100_resnet110"])
    assert r110.backbone.name == "resnet110_bottleneck" and r110.method.nce_k == 256
    r32 = _compose(["experiment=mcl_okd_cifar100_resnet32"])
    assert r32.backbone.name == "resnet32" and r32.method.nce_k == 256 and r32.optim.lr == 0.05


def test_overrides_change_what_their_names_say():
    cfg = _compose(["peers=3", "backbone=wrn_16_2", "topology=independent", "method.beta=0.5", "method.nce_k=32",
                    "method.tau=0.2", "optim.lr=0.1", "seed=5"])
    peers, method = build_network(cfg)
    assert peers.num_peers == 3 and peers.feature_dim == 128
    assert count_parameters(peers) == 3 * count_parameters(peers.export_peer(0))  # independent
    assert (method.beta, method.negatives.k, method.tau) == (0.5, 32, 0.2)
    assert cfg.optim.lr == 0.1 and cfg.seed == 5


def test_every_method_option_override_reaches_the_method():
    cfg = _compose(["method.alpha=0.5", "method.gamma=2.0", "method.bank_momentum=0.9", "method.positive=relax",
                    "method.kd_temperature=4", "method.online_teacher_targets=all", "method.projection_dim=64",
                    "method.negatives_with_replacement=true", "method.eps=1e-6", "backbone=resnet20"])
    _, method = build_network(cfg)
    assert (method.alpha, method.gamma, method.kd_temperature, method.eps) == (0.5, 2.0, 4, 1e-6)
    assert method.memory_bank.momentum == 0.9 and method.memory_bank.dim == 64
    assert method.negatives.positive == "relax" and method.negatives.replacement is True
    assert method.online_teacher_targets == "all" and method.heads[0].linear.out_features == 64


@pytest.mark.parametrize("scheduler", ["multistep", "constant"])
def test_scheduler_options_compose_into_the_system(scheduler):
    from mcl_lightning.runtime.optim import optim_options
    from mcl_lightning.system import OKDSystem

    cfg = _compose([f"optim.scheduler={scheduler}", "optim.lr=0.1", "peers=2", "backbone=resnet20"])
    peers, method = build_network(cfg)
    system = OKDSystem(peers, method, num_classes=100, **optim_options(cfg.optim))  # as train.build does
    config = system.configure_optimizers()
    assert config["optimizer"].param_groups[0]["lr"] == 0.1
    if scheduler == "multistep":
        schedule = config["lr_scheduler"]["scheduler"]
        assert isinstance(schedule, torch.optim.lr_scheduler.MultiStepLR)
        assert sorted(schedule.milestones) == [150, 200, 250] and config["lr_scheduler"]["interval"] == "epoch"
    else:
        assert "lr_scheduler" not in config


@pytest.mark.slow  # determinism: also test_ddp_equivalence.py and the bit-for-bit resume tests
def test_same_seed_through_the_entry_point_gives_identical_losses(tmp_path, data_root):
    columns = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        proc = run_train("peers=2", "backbone=resnet20", "method.nce_k=32", "seed=3", f"data.root={data_root}",
                         f"hydra.run.dir={run_dir}", *TINY)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
        columns.append([(r["train/loss"], r["train/loss/contrastive"]) for r in rows if r.get("train/loss")])
    assert columns[0] and columns[0] == columns[1]


def test_train_entry_point_independent_on_real_data(tmp_path, data_root):
    results, _, proc = tiny_training_run(tmp_path / "run", data_root, "peers=4", "backbone=resnet20", "method=independent")
    assert results["method"] == "independent" and results["peers"] == 4
    assert results["selection"] == "test-selected" and results["epochs_run"] == 1
    assert results["global_batch_size"] == 64 and results["learning_rate"] == 0.05 and results["seed"] == 0
    assert 0 < results["wall_time_s"] < 600  # this process, start to results
    machine = results["machine"]
    assert machine["accelerator"] == "cpu" and machine["cpu"] and machine["torch_threads"] >= 1 and machine["torch"]
    for part in ("final", "best", "test"):
        assert set(results[part]) == {"peer0", "peer1", "peer2", "peer3", "peer_mean", "ensemble", "best_peer",
                                      "num_images"}
        assert 0.0 <= results[part]["ensemble"]["top1"] <= 1.0 and "top5" in results[part]["peer3"]
    assert Path(results["checkpoints"]["last"]).is_file()
    assert Path(results["checkpoints"]["best"]).is_file()
    assert results["config"]["backbone"]["name"] == "resnet20"
    assert "peer_mean" in proc.stdout and "ensemble" in proc.stdout  # the end-of-run table


def test_mcl_okd_run_logs_three_loss_terms_per_epoch(tmp_path, data_root):
    """The design card's command as typed (no data.root, no MCL_DATA_ROOT): the default data folder."""
    cache = tmp_path / "cache"
    (cache / "mcl_lightning" / "data").mkdir(parents=True)  # the per-user default, with the data in it
    (cache / "mcl_lightning" / "data" / "cifar-100-python").symlink_to(data_root / "cifar-100-python")
    env = {k: v for k, v in os.environ.items() if k != "MCL_DATA_ROOT"}
    run_dir = tmp_path / "run"
    with_progress_bar = [o for o in TINY if "progress_bar" not in o and "max_epochs" not in o]
    proc = subprocess.run([sys.executable, "-m", "mcl_lightning.train", "peers=4", "backbone=resnet20", "method.nce_k=256",
                           f"hydra.run.dir={run_dir}", *with_progress_bar, "trainer.max_epochs=2"],
                          capture_output=True, text=True, env={**env, "XDG_CACHE_HOME": str(cache)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch 1: 100%" in proc.stdout  # long work shows progress (TQDM bar) ...
    for term in ("ce=", "online_teacher_kd=", "contrastive="):  # ... with every loss term
        assert term in proc.stdout, term
    head = proc.stdout.split("Epoch 0")[0]  # printed before training starts: the resolved config, the run dir
    assert f"run directory: {run_dir}" in head and "nce_k: 256" in head and "root: null" in head
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mcl_okd" and results["peers"] == 4 and results["epochs_run"] == 2
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    for term in ("ce", "online_teacher_kd", "contrastive"):
        epochs = {int(r["epoch"]) for r in rows if r.get(f"train/loss/{term}")}
        assert epochs == {0, 1}, term
    assert any(r.get("val/ensemble/top1") for r in rows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_heterogeneous_peers_through_the_entry_point(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_train("peers=[resnet20,wrn_16_2,resnet32]", "method.nce_k=64", f"data.root={data_root}",
                     "data.batch_size=32", f"hydra.run.dir={run_dir}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["backbone"] == "resnet20+wrn_16_2+resnet32" and results["peers"] == 3
    assert results["topology"] == "independent" and set(results["test"]) >= {"peer0", "peer1", "peer2", "ensemble"}
    state = torch.load(results["checkpoints"]["last"], map_location="cpu", weights_only=True)["state_dict"]
    assert [state[f"method.heads.{i}.linear.weight"].shape[1] for i in range(3)] == [64, 128, 64]
    proc = run_train("peers=[resnet20,wrn_16_2]", "topology=shared_trunk", f"data.root={data_root}",
                     f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode == 2 and "cannot share a trunk; set topology=independent" in proc.stderr
    assert "Traceback" not in proc.stderr


# The shared-trunk baselines through the entry point: the loss terms each logs, a config value of its
# recipe, and the method's own state its checkpoint must hold.
SHARED_TRUNK_RUNS = {
    "one": (("ce", "ensemble_ce", "kd"), ("kd_temperature", 3.0), {"method.gate.fc.weight", "method.gate.norm.running_mean"}),
    "okddip": (("ce", "peer_kd", "leader_kd"), ("rampup_epochs", 80), {"method.query.weight", "method.key.weight"}),
    "cl_ilr": (("ce", "collaborative_kd"), ("kd_temperature", 2.0), set()),
}


@pytest.mark.parametrize("method", sorted(SHARED_TRUNK_RUNS))
def test_shared_trunk_methods_train_through_the_entry_point(tmp_path, data_root, method):
    terms, (option, value), method_state = SHARED_TRUNK_RUNS[method]
    results, _, _ = tiny_training_run(tmp_path / "run", data_root, f"method={method}", "peers=2",
                                      "backbone=resnet20", terms=terms)
    expected = instantiate(_compose([f"method={method}"]).method).ensemble_description
    state = check_two_peer_run(results, method, "shared_trunk", expected)
    assert results["config"]["method"][option] == value
    assert method_state <= set(state) and any(k.startswith("peers.trunk.") for k in state)


@pytest.mark.parametrize("method", ["cl_ilr", "one", "okddip"])
def test_methods_of_one_backbone_refuse_different_peers_with_one_line(tmp_path, method):
    """Their references share layers (or projections) between peers: different backbones are refused
    before any data is read, naming the method and the peers."""
    error = only_error_line(run_train(f"method={method}", "peers=[resnet20,wrn_16_2]", f"hydra.run.dir={tmp_path}"))
    assert f"'{method}'" in error and "resnet20, wrn_16_2" in error and "one backbone" in error


@pytest.mark.slow  # a real multirun: test_report.py runs one by default
def test_multirun_gives_each_job_its_own_directory(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "seed=0,1", "peers=2", "backbone=resnet20", "method=independent",
                     f"data.root={data_root}", f"hydra.sweep.dir={sweep}", *TINY, "trainer.limit_val_batches=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds = sorted(json.loads(p.read_text())["seed"] for p in sweep.glob("*/results.json"))
    assert seeds == [0, 1]


def test_missing_data_in_the_default_folder_says_where_to_put_it(tmp_path):
    """No data.root, no MCL_DATA_ROOT, no files, no download (tests never download): one message."""
    env = {k: v for k, v in os.environ.items() if k != "MCL_DATA_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "mcl_lightning.train", "peers=2", "backbone=resnet20",
                           "data.download=false", f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"files missing under {tmp_path / 'cache' / 'mcl_lightning' / 'data' / 'cifar-100-python'}" in proc.stderr
    assert "MCL_DATA_ROOT" in proc.stderr and "data.root" in proc.stderr


def test_a_failed_download_into_the_default_folder_says_where_to_put_the_files(tmp_path, monkeypatch):
    from mcl_lightning.data import cifar
    from mcl_lightning.core.errors import DatasetNotFoundError

    monkeypatch.delenv("MCL_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def offline(url, download_root, **kwargs):
        calls.append((url, download_root))
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as error:
        cifar.CIFARDataModule().prepare_data()
    folder = tmp_path / "mcl_lightning" / "data"
    assert calls == [(cifar.CIFAR100.url, str(folder))]  # it tried the default folder
    message = str(error.value)
    assert "download from" in message and "name resolution" in message and str(folder / "cifar-100-python" / "train") in message


@pytest.mark.slow  # both mistakes are cases of test_bad_inputs.py too
def test_bad_config_values_are_one_clear_message(tmp_path, data_root):
    proc = run_train("peers=1", "backbone=resnet20", f"data.root={data_root}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "peers >= 2" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train("method.nce_k=60000", "backbone=resnet20", f"data.root={data_root}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "nce_k=60000" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # resume through the CLI: test_checkpointing.py by default
def test_resume_through_the_entry_point_keeps_one_checkpoint_history(tmp_path, data_root):
    # multistep: its learning rate does not depend on max_epochs, so a resume may extend the run (cosine refuses)
    common = ["peers=2", "backbone=resnet20", "method.nce_k=32", "optim.scheduler=multistep", f"data.root={data_root}", *TINY]
    first = tmp_path / "first"
    assert run_train(*common, f"hydra.run.dir={first}").returncode == 0
    second = tmp_path / "second"
    proc = run_train(*common, "trainer.max_epochs=2", f"ckpt_path={first}/checkpoints/last.ckpt",
                     f"hydra.run.dir={second}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((second / "results.json").read_text())
    assert results["epochs_run"] == 2 and results["best_epoch"] in (0, 1)
    # checkpoints continue in the original folder, where ModelCheckpoint restores its best score
    assert Path(results["checkpoints"]["last"]).parent == first / "checkpoints"
    best = torch.load(results["checkpoints"]["best"], map_location="cpu", weights_only=True)
    assert [entry["epoch"] for entry in best["val_history"]][-1] == results["best_epoch"]
    proc = run_train(*common, f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode == 2 and "nope.ckpt does not exist" in proc.stderr


def test_results_best_is_one_coherent_epoch():
    from mcl_lightning.runtime.results import summarise

    history = [
        {"epoch": 0, "best_peer/top1": 0.5, "peer0/top1": 0.5, "ensemble/top1": 0.7},
        {"epoch": 1, "best_peer/top1": 0.6, "peer0/top1": 0.6, "ensemble/top1": 0.65},
        {"epoch": 2, "best_peer/top1": 0.55, "peer0/top1": 0.55, "ensemble/top1": 0.66},
    ]
    summary = summarise(history)
    assert summary["best_epoch"] == 1
    assert summary["best"]["ensemble"]["top1"] == 0.65  # the best epoch's row, not the max over epochs
    assert summary["max_over_epochs"]["ensemble"]["top1"] == 0.7
    assert summary["final"]["peer0"]["top1"] == 0.55


@pytest.mark.slow
def test_issue_acceptance_command_at_the_reference_k(tmp_path, data_root):
    """The MCL-OKD issue's acceptance command verbatim (K = 16384): about 7 minutes on 2 CPU cores."""
    run_dir = tmp_path / "run"
    proc = run_train("peers=4", "backbone=resnet32", f"data.root={data_root}", "trainer.max_epochs=2",
                     "trainer.limit_train_batches=30", "trainer.limit_val_batches=5", f"hydra.run.dir={run_dir}",
                     "trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mcl_okd" and results["peers"] == 4
    assert results["config"]["method"]["nce_k"] == 16384
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    for term in ("ce", "online_teacher_kd", "contrastive"):
        assert {int(r["epoch"]) for r in rows if r.get(f"train/loss/{term}")} == {0, 1}


@pytest.mark.slow
def test_foundation_acceptance_command(tmp_path, data_root):
    """The foundation issue's acceptance command verbatim (4 ResNet-56 peers, independent)."""
    run_dir = tmp_path / "run"
    proc = run_train("peers=4", "backbone=resnet56", "method=independent", f"data.root={data_root}",
                     "trainer.max_epochs=1", "trainer.limit_train_batches=20", "trainer.limit_val_batches=5",
                     f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["peers"] == 4 and {"peer3", "peer_mean", "ensemble"} <= set(results["final"])
    assert Path(results["checkpoints"]["last"]).is_file()
