"""Peak memory of MCL-OKD's contrastive term alone against the reference's gathered tensors."""

from __future__ import annotations

from typing import Any

import torch

from mcl_lightning.tools.bench.settings import SEED, Settings
from mcl_lightning.tools.bench.timing import PeakMemory
from mcl_lightning.data import CIFARDataModule
from mcl_lightning.methods import MCLOKD
from mcl_lightning.models import PeerSpec

REFERENCE_DIM = 128  # the reference's projection width, for its gathered-tensor size


def contrastive_memory(settings: Settings, dm: CIFARDataModule) -> dict[str, Any]:
    """Peak memory of MCL-OKD's contrastive term alone (forward + backward + bank update) at
    B = batch, K = memory_k, N = peers, against the reference's N(N - 1) gathered tensors."""
    n, batch, k = settings.peers, settings.batch_size, settings.memory_k
    device = torch.device(settings.device)
    method = MCLOKD(nce_k=k)
    width = 64
    method.attach(PeerSpec(n, (width,) * n, dm.num_classes, settings.topology, trunk_channels=16))
    method.to(device)
    method.setup_data(dm.train_labels.to(device))
    g = torch.Generator().manual_seed(SEED)
    indices = torch.randperm(len(dm.train_labels), generator=g)[:batch].to(device)
    labels = dm.train_labels.to(device).index_select(0, indices)
    features = torch.randn(n, batch, width, generator=g).to(device).requires_grad_(True)
    memory = PeakMemory(device)
    memory.start()
    loss = method.contrastive(features, labels, indices)
    loss.backward()
    peak = memory.stop()
    reference = n * (n - 1) * batch * (k + 1) * REFERENCE_DIM * 4
    scoring = "dense" if method._dense_scoring(torch.Size([batch, k + 1])) else "gather"
    del method, features, loss
    return {
        "peers": n, "batch": batch, "nce_k": k, "scoring": scoring, "peak_bytes": peak, "kind": memory.kind,
        "reference_gathered_bytes": reference,
        "ratio_to_reference": None if peak is None else peak / reference,
        "target_ratio": 1 / (n - 1),
    }
