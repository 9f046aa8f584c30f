"""Top-k accuracy for every peer, the peers' mean and the ensemble (argmax of the mean logits)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy


TOP_K = (1, 5)  # the accuracies every peer and the ensemble report (top-5 only with more than 5 classes)
MONITOR = "val/best_peer/top1"  # checkpoints select on the best peer's validation top-1


def _topk_collection(num_classes: int, top_k: tuple[int, ...]) -> MetricCollection:
    return MetricCollection(
        {f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in top_k}
    )


class ImageCount(Metric):
    """How many images were evaluated, summed over DDP ranks (each image counts once: the
    evaluation samplers do not pad, see ``data/sampling.py``)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, labels: Tensor) -> None:
        self.count += labels.numel()

    def compute(self) -> Tensor:
        return self.count.float()  # exact up to 2**24 images; a float logs without a warning


class PeerMetrics(nn.Module):
    """One metric collection per peer plus one for the ensemble, for one stage (val or test).

    ``compute()`` returns flat names: ``peer{i}/top{k}``, ``peer_mean/top{k}`` (mean over peers),
    ``best_peer/top1`` (max over peers, what checkpoints select on) and ``ensemble/top{k}``. The
    ensemble is the method's own (``OKDMethod.ensemble``; by default the argmax of the mean of the
    peers' logits, as MCL-OKD's "Ens"). ``num_images`` is the number of images the values were
    computed on (all ranks together).
    """

    def __init__(self, num_peers: int, num_classes: int, top_k: tuple[int, ...] = TOP_K) -> None:
        super().__init__()
        self.top_k = tuple(k for k in top_k if k <= num_classes)
        self.peers = nn.ModuleList(_topk_collection(num_classes, self.top_k) for _ in range(num_peers))
        self.ensemble = _topk_collection(num_classes, self.top_k)
        self.num_images = ImageCount()

    def update(self, logits: Tensor, labels: Tensor, ensemble: Tensor | None = None) -> None:
        """``logits``: (N, B, classes); ``ensemble``: the method's ensemble logits (default: their mean)."""
        for metric, peer_logits in zip(self.peers, logits):
            metric.update(peer_logits, labels)
        self.ensemble.update(logits.mean(0) if ensemble is None else ensemble, labels)
        self.num_images.update(labels)

    def compute(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        per_peer = [metric.compute() for metric in self.peers]
        for i, peer in enumerate(per_peer):
            values.update({f"peer{i}/{name}": value for name, value in peer.items()})
        for name in per_peer[0]:
            stacked = [peer[name] for peer in per_peer]
            values[f"peer_mean/{name}"] = sum(stacked) / len(stacked)
        values["best_peer/top1"] = max(peer["top1"] for peer in per_peer)
        values.update({f"ensemble/{name}": value for name, value in self.ensemble.compute().items()})
        values["num_images"] = self.num_images.compute()
        return values

    def reset(self) -> None:
        for metric in self.peers:
            metric.reset()
        self.ensemble.reset()
        self.num_images.reset()


def validation_metrics(num_peers: int) -> list[str]:
    """The names OKDSystem logs after each validation (``PeerMetrics.compute`` under ``val/``)."""
    groups = [f"peer{i}" for i in range(num_peers)] + ["peer_mean", "ensemble"]
    return [MONITOR, *(f"val/{g}/top{k}" for g in groups for k in TOP_K), "val/num_images"]
