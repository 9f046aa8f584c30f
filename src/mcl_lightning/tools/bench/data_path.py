"""The data path alone: loader, transfer and augmentation, then with class-aware negatives."""

from __future__ import annotations

import time

from mcl_lightning.tools.bench.runs import Bench
from mcl_lightning.tools.bench.timing import sync
from mcl_lightning.contrast import NegativeSampler


def data_path(bench: Bench, k: int | None, batches: int) -> float:
    """images/s of ``bench``'s loader + transfer + augmentation (+ negatives at K = k)."""
    sampler = None
    if k is not None:
        sampler = NegativeSampler(k).to(bench.device)
        sampler.bind(bench.dm.train_labels.to(bench.device))
    source = bench.batches()
    next(source)
    if sampler is not None:
        images, labels, indices = next(source)
        sampler(indices, labels)
    sync(bench.device)
    start = time.perf_counter()
    for _ in range(batches):
        images, labels, indices = next(source)
        if sampler is not None:
            sampler(indices, labels)
    sync(bench.device)
    return batches * bench.s.batch_size / (time.perf_counter() - start)
