"""Real 2-process DDP on CPU (gloo): memory banks stay identical on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def test_ddp_ranks_keep_identical_memory_banks(tmp_path, data_root):
    proc = subprocess.run([sys.executable, str(HERE / "ddp_banks.py"), str(data_root), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["head"], rank1["head"])  # DDP keeps parameters in sync
    # both ranks' batches were written into both ranks' banks: 3 steps x 2 ranks x 16 items
    assert torch.equal(rank0["memory"], rank1["memory"])
    assert torch.equal(rank0["initial"], rank1["initial"])
    updated = (rank0["memory"] != rank0["initial"]).any(-1)  # (peers, rows)
    assert updated[0].sum() == updated[1].sum() == 3 * 2 * 16
    torch.testing.assert_close(rank0["memory"][updated].norm(dim=-1), torch.ones(2 * 3 * 2 * 16))


@pytest.mark.slow  # DDP through the CLI: test_ddp_sampling.py and test_ddp_failures.py run it by default
def test_ddp_through_the_hydra_entry_point(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mcl_lightning.train", "trainer=ddp_cpu", "peers=2", "backbone=resnet20",
         "method.nce_k=32", f"data.root={data_root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=1",
         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 64
