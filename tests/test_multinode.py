"""Multi-node DDP through torchrun: 2 "nodes" x 1 process on this machine, joined by torchrun's c10d
rendezvous on localhost, complete a tiny real-data run (as two machines would, docs/guide/ddp.md "Several machines")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_torchrun_rendezvous(tmp_path, data_root):
    run_dir = tmp_path / "run"
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mcl-two-nodes", "--max-restarts=0",
        "-m", "mcl_lightning.train",
        "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "peers=2", "backbone=resnet20",
        "method.nce_k=32", f"data.root={data_root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 64
    assert results["config"]["trainer"]["num_nodes"] == 2 and results["config"]["trainer"]["devices"] == 1
    assert results["test"]["num_images"] == 2 * 256  # one test batch on each node
    # both nodes really ran: each agent reports its worker group, ranks 0 and 1 between them
    logs = "".join(err for _, err in outputs)
    assert "GLOBAL_RANK: 0" in logs and "GLOBAL_RANK: 1" in logs
