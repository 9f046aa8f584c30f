"""Launched by test_ddp.py: 2-process DDP (gloo, CPU) training of MCL-OKD; each rank saves its banks.

    python tests/ddp_banks.py <data_root> <out_dir>
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from mcl_lightning import CIFARDataModule, MCLOKD, OKDSystem, PeerNetwork


class SaveBanks(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: OKDSystem) -> None:
        self.initial = pl_module.method.memory_bank.memory.clone().cpu()

    def on_train_end(self, trainer: L.Trainer, pl_module: OKDSystem) -> None:
        torch.save(
            {
                "initial": self.initial,
                "memory": pl_module.method.memory_bank.memory.cpu(),
                "head": pl_module.method.heads[0].linear.weight.detach().cpu(),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(data_root: str, out: str) -> None:
    L.seed_everything(0, workers=True)
    data = CIFARDataModule(root=data_root, batch_size=32, eval_batch_size=64)
    peers = PeerNetwork.from_backbone("resnet20", num_peers=2, num_classes=100)
    system = OKDSystem(peers, MCLOKD(nce_k=32), num_classes=100)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo", broadcast_buffers=False),
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[SaveBanks(Path(out))],
    )
    trainer.fit(system, datamodule=data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
