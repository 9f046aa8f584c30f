"""Launched by test_ddp_equivalence.py: 3 MCL-OKD steps on real CIFAR-100 with W CPU processes.

    python tests/ddp_equivalence.py <data_root> <out_dir> <devices> <global_batch>

Each rank saves its loss terms and batch indices per step, and the system's state (peers, heads,
banks) before and after. The learning rate is 0.002: with the recipe's 0.05, float32 rounding
differences grow to ~1e-3 (relative, BN biases) within 3 steps, and do so just as much between two
1-rank runs that differ only in their thread count (1.5e-3) as between 1 and 2 ranks (1.3e-3). BatchNorm runs in eval mode: torch's SyncBatchNorm is GPU-only, so on CPU
batch statistics would differ between a rank's half batch and the whole batch. Everything else is
the library's own path: the global-order sampler, the keyed crops and negatives, the all-gathered
bank updates and the global NCE normaliser.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.modules.batchnorm import _BatchNorm

from mcl_lightning import CIFARDataModule, MCLOKD, OKDSystem, PeerNetwork


class BatchNormInEvalMode(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


class Save(L.Callback):
    def __init__(self, out: Path, devices: int, steps: list[dict]) -> None:
        self.out, self.devices, self.steps = out, devices, steps

    @staticmethod
    def state(module: OKDSystem) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = self.state(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"initial": self.initial, "final": self.state(pl_module), "steps": self.steps},
                   self.out / f"w{self.devices}_rank{trainer.global_rank}.pt")


def main(data_root: str, out: str, devices: int, global_batch: int) -> None:
    L.seed_everything(0, workers=True)
    data = CIFARDataModule(root=data_root, batch_size=global_batch, eval_batch_size=64)
    peers = PeerNetwork.from_backbone("resnet20", num_peers=2, num_classes=100)
    method = MCLOKD(nce_k=64)
    method.attach(peers.spec())  # what OKDSystem does; the forward is wrapped below first
    steps: list[dict] = []
    forward = method.forward

    def recording_forward(output, labels, indices):  # every loss term, per rank and step
        terms = forward(output, labels, indices)
        steps.append({"indices": indices.cpu().clone(), **{k: v.detach().cpu().clone() for k, v in terms.items()}})
        return terms

    method.forward = recording_forward
    # lr 0.002, not 0.05: at 0.05 float32 rounding is amplified (ReLU kinks) to ~1e-3 on the BN biases
    # after 3 steps, as much between two 1-rank runs with 1 and 2 threads as between 1 and 2 ranks.
    system = OKDSystem(peers, method, num_classes=100, lr=0.002)
    strategy = (DDPStrategy(process_group_backend="gloo", broadcast_buffers=False, start_method="popen")
                if devices > 1 else "auto")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, max_steps=3, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[BatchNormInEvalMode(), Save(Path(out), devices, steps)],
    )
    trainer.fit(system, datamodule=data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
