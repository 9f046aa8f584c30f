"""Each DDP rank's own BatchNorm running statistics, kept in checkpoints.

With ``trainer.sync_batchnorm=false`` (the default, as the reference's DataParallel) every rank
updates its BatchNorm running mean and variance from its own part of the batch, and DDP does not
broadcast rank 0's (``broadcast_buffers=false`` keeps the memory banks as they are), so each rank
evaluates its shard of the validation and test sets with its own statistics. A checkpoint holds
rank 0's module only: a W-rank run resumed from it would evaluate every shard with rank 0's
statistics and no longer equal the uninterrupted run (measured: epoch-0 validation top-5 differed).
``RankBatchNormStats`` all-gathers the statistics into the checkpoint when it is written (every
rank assembles the checkpoint; rank 0 writes it) and gives each rank its own back on resume, when
the world size is the same; otherwise every rank keeps rank 0's, as the state dict has them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.nn.modules.batchnorm import _BatchNorm

KEY = "rank_batchnorm_stats"


def _running_stats(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every BatchNorm running mean and variance, in module order."""
    stats = []
    for prefix, layer in module.named_modules():
        if isinstance(layer, _BatchNorm) and layer.track_running_stats and layer.running_mean is not None:
            stats += [(f"{prefix}.running_mean", layer.running_mean), (f"{prefix}.running_var", layer.running_var)]
    return stats


class RankBatchNormStats(L.Callback):
    """Checkpoint key ``rank_batchnorm_stats``: ``names`` and ``values`` (world size x statistics)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        stats = _running_stats(pl_module)
        if trainer.world_size < 2 or not stats:
            return
        flat = torch.cat([tensor.detach().reshape(-1).float() for _, tensor in stats])
        gathered = trainer.strategy.all_gather(flat)  # (world size, statistics), on every rank
        checkpoint[KEY] = {"names": [name for name, _ in stats], "values": gathered.cpu()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(KEY)
        stats = _running_stats(pl_module)
        if saved is None or saved["values"].shape[0] != trainer.world_size or saved["names"] != [n for n, _ in stats]:
            return  # another world size (or layout): rank 0's statistics, from the state dict
        own, offset = saved["values"][trainer.global_rank], 0
        with torch.no_grad():
            for _, tensor in stats:
                tensor.copy_(own[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()
