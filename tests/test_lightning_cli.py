"""docs/guide/python.md's LightningCLI script and YAML (with the library's callbacks) fit OKDSystem on the real
CIFAR-100 for two steps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import doc_block
from mcl_lightning import OKDSystem

pytest.importorskip("jsonargparse", reason='pip install "mcl-lightning[cli]"')


def test_lightning_cli_fits_okd_system_from_the_documented_yaml(tmp_path, data_root):
    (tmp_path / "okd_cli.py").write_text(doc_block("lightning-cli-script", "python"))
    config = doc_block("lightning-cli-config", "yaml")
    assert "root: /path/to/data" in config and "max_epochs: 300" in config
    (tmp_path / "okd.yaml").write_text(config.replace("/path/to/data", str(data_root)))
    fast = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--data.batch_size=16",
            "--model.peers.init_args.backbone=resnet8", "--model.peers.init_args.peers=2"]
    proc = subprocess.run([sys.executable, "okd_cli.py", "fit", "--config", "okd.yaml", *fast], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    assert "MCLOKD" in (run / "config.yaml").read_text()  # LightningCLI saved the resolved config
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"  # the library's LastCheckpoint, from the YAML's trainer.callbacks
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2
    system = OKDSystem.from_checkpoint(checkpoint)  # rebuilt from the checkpoint alone
    assert type(system.method).__name__ == "MCLOKD" and system.method.constructor_options["nce_k"] == 256
    assert system.peers.num_peers == 2 and system.peers.build_spec["backbone"] == "resnet8"
    assert system.peers.build_spec["branch_point"] == 2  # resnet8's reference: stem + first stage shared
    assert len(system.val_history) == 1
