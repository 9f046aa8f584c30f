"""Cluster sweeps: the shipped hydra/launcher=slurm config composes onto hydra-submitit-launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf


def test_slurm_launcher_config_composes_and_follows_the_trainer():
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                 "hydra.launcher.partition=gpu", "data=imagenet"]
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4  # one task per GPU
    assert cfg.hydra.launcher.nodes == 2 and cfg.hydra.launcher.partition == "gpu"
    assert cfg.hydra.launcher.submitit_folder.endswith(".submitit/%j")
    launcher = instantiate(cfg.hydra.launcher)  # what Hydra does at `-m`: every key is one the plugin takes
    assert type(launcher).__name__ == "SlurmLauncher" and launcher.params["tasks_per_node"] == 4


@pytest.mark.slow
def test_multirun_through_submitit_local_executor(tmp_path, data_root):
    """The same launcher plugin with its local executor: each sweep point runs as a submitit job
    (about a minute on 2 cores)."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "mcl_lightning.train", "-m", "hydra/launcher=submitit_local", "seed=0,1", "peers=2",
         "backbone=resnet20", "method=independent", f"data.root={data_root}", f"hydra.sweep.dir={sweep}",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(json.loads(p.read_text())["seed"] for p in sweep.glob("*/results.json")) == [0, 1]
    assert list(sweep.glob(".submitit/*"))  # the jobs went through submitit
