"""Long runs that lose nothing across resumes (issue 25): the loader's position with workers, the
run's history (CSV, TensorBoard, trackers), schedule changes on resume, short runs' summaries,
train.log, and a soak test of interruptions."""

from __future__ import annotations

import torch

from mcl_lightning.data.resumable import ResumableLoader, ResumableOrderSampler


class _Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


def _loader(seed: int = 3) -> ResumableLoader:
    data = _Indices()
    return ResumableLoader(data, batch_size=4, sampler=ResumableOrderSampler(data, 1, 0, seed), num_workers=2,
                           persistent_workers=True)


def test_loader_state_counts_the_batches_training_consumed_not_what_workers_prefetched():
    loader = _loader()
    loader.sampler.set_epoch(2)
    full = [batch.tolist() for batch in loader]
    iterator = iter(loader)
    head = [next(iterator).tolist() for _ in range(3)]  # the workers have fetched several batches more
    state = loader.state_dict()
    assert state["yielded"] == 12 and state["epoch"] == 2
    resumed = _loader(seed=0)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert head + [batch.tolist() for batch in resumed] == full  # batch 4 next, nothing skipped
    assert resumed.state_dict()["yielded"] == 40
