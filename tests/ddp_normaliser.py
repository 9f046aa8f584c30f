"""Launched by test_ddp_equivalence.py under torchrun (2 CPU processes, gloo).

Rank r scores half of a fixed batch. With the global normaliser (the default) the mean over ranks of
the per-rank NCE losses equals the 1-rank loss of the whole batch; with per-rank normalisers it does
not. Rank 0 writes both relative differences to <out>.

    torchrun --standalone --nproc-per-node=2 tests/ddp_normaliser.py <out.json>
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from mcl_lightning.contrast.nce import nce_loss


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    # (N, N, B, K + 1) scores as exp(logit / tau): halves with different scales, as real batches have
    logits = torch.rand(3, 3, 16, 33, generator=g) * 2 - 1
    logits[:, :, 8:] += 0.5  # the second half scores higher: per-rank means differ
    scores = torch.exp(logits / 0.1)
    full = nce_loss(scores, num_samples=1000, global_normaliser=False)  # one process, whole batch
    mine = scores[:, :, rank * 8:(rank + 1) * 8]
    result = {}
    for name, global_normaliser in (("global", True), ("per_rank", False)):
        loss = nce_loss(mine, num_samples=1000, global_normaliser=global_normaliser)
        dist.all_reduce(loss)
        loss /= world
        result[name] = float(((loss - full).abs() / full.abs()).max())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
