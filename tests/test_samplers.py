"""MCL's class-balanced batch sampler: composition, epoch length and coverage, seeding, DDP split."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from mcl_lightning.data import CIFARDataModule
from mcl_lightning.data.samplers import ClassBalancedBatchSampler
from mcl_lightning.core.errors import ConfigError

CIFAR_LIKE = torch.arange(50_000) % 100  # 100 classes of 500, as CIFAR-100's training set


def _check_balanced(batch, labels, m, classes):
    counts = collections.Counter(labels[batch].tolist())
    assert len(batch) == len(set(batch)) == m * classes  # distinct samples
    assert len(counts) == classes and set(counts.values()) == {m}


@pytest.mark.parametrize("m, batch_size", [(2, 128), (4, 64), (1, 32)])
def test_every_batch_has_exactly_m_samples_of_each_of_its_classes(m, batch_size):
    sampler = ClassBalancedBatchSampler(CIFAR_LIKE, m, batch_size, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50_000 // batch_size  # the reference's 390 at B = 128
    for batch in batches:
        _check_balanced(batch, CIFAR_LIKE, m, batch_size // m)
        assert all(CIFAR_LIKE[batch[i]] == CIFAR_LIKE[batch[i + 1]] for i in range(0, len(batch), m) if m > 1)


def test_epoch_covers_the_data_as_the_reference_independent_draws():
    """Each batch is drawn independently (MPerClassSampler): an epoch sees a sample 0, 1, 2... times,
    Binomial(390, 128/50000), so about 1 - e^-1 = 63 % of the samples appear; classes and samples are uniform."""
    batches = list(ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=1))
    seen = torch.bincount(torch.tensor(batches).flatten(), minlength=50_000).float()
    p = 128 / 50_000
    assert abs((seen > 0).float().mean().item() - (1 - (1 - p) ** 390)) < 0.01
    assert abs(seen.var().item() - 390 * p * (1 - p)) < 0.05  # binomial counts: no sample favoured
    per_class = torch.bincount(CIFAR_LIKE[torch.tensor(batches).flatten()], minlength=100).float()
    expected = 390 * 128 / 100
    assert ((per_class - expected).abs() < 6 * math.sqrt(expected)).all()  # every class equally often


def test_samples_of_a_class_are_a_uniformly_random_subset():
    labels = torch.tensor([0] * 5 + [1] * 5)
    sampler = ClassBalancedBatchSampler(labels, 3, 3, seed=0)  # one class of 5 per batch, 3 of its samples
    subsets = collections.Counter()
    for epoch in range(1000):
        sampler.set_epoch(epoch)
        subsets.update(frozenset(batch) for batch in sampler)
    draws = sum(subsets.values())
    expected = draws / 20  # C(5, 3) subsets of each of the 2 classes
    assert len(subsets) == 20
    chi2 = sum((count - expected) ** 2 / expected for count in subsets.values())
    assert chi2 < 50  # 19 degrees of freedom: p < 1e-4 under uniformity


def test_unequal_and_small_classes():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 1 + [5] * 9)  # class 2 has fewer samples than m
    sampler = ClassBalancedBatchSampler(labels, 3, 6, seed=0)
    with_class_2 = 0
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts = collections.Counter(labels[batch].tolist())
            assert len(counts) == 2 and set(counts.values()) == {3}
            if 2 in counts:  # its one sample three times: with replacement, as the reference's safe_random_choice
                assert batch.count(10) == 3 and len(set(batch)) == 4
                with_class_2 += 1
            else:
                assert len(set(batch)) == 6
    assert with_class_2 > 0


def test_seeded_reproducible_and_new_each_epoch(monkeypatch):
    a = ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=3)
    b = ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and a.epoch == 1
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=4)) != first
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")  # seed=None: the seed_everything seed, as Lightning's samplers
    assert list(ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128)) == first


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_ranks_split_the_single_device_batch_by_whole_classes(world_size):
    single = list(ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=5))
    ranks = [list(ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=5, rank=r, world_size=world_size))
             for r in range(world_size)]
    assert all(len(r) == len(single) for r in ranks)
    for step, batch in enumerate(single):
        parts = [r[step] for r in ranks]
        assert sum(parts, []) == batch  # together exactly the single-device batch
        for part in parts:  # each rank's batch class-balanced on its own, classes disjoint across ranks
            _check_balanced(part, CIFAR_LIKE, 2, 64 // world_size)


def test_lightning_ddp_injection_keeps_the_rank_split_and_the_epoch():
    """Under DDP Lightning re-creates a BatchSampler subclass with a DistributedSampler as `sampler`
    (lightning.pytorch.utilities.data._update_dataloader) and calls set_epoch on that sampler."""
    from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
    from lightning.pytorch.utilities.data import _update_dataloader

    dataset = TensorDataset(CIFAR_LIKE)
    with _replace_dunder_methods(BatchSampler):  # as Lightning does around the *_dataloader hooks
        loader = DataLoader(dataset, batch_sampler=ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=5))
    injected = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True)
    loader = _update_dataloader(loader, injected)
    assert loader.batch_sampler.sampler is injected and loader.batch_sampler.rank == 1
    _set_sampler_epoch(loader, 2)
    expected = ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, seed=5, rank=1, world_size=2)
    expected.set_epoch(2)
    assert list(loader.batch_sampler) == list(expected)
    with pytest.raises(ValueError, match="rank=0 disagrees"):
        ClassBalancedBatchSampler(CIFAR_LIKE, 2, 128, rank=0, world_size=2, sampler=injected)


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="must divide data.batch_size=64"):
        CIFARDataModule(root=tmp_path, batch_size=64, samples_per_class=3)
    with pytest.raises(ConfigError, match="integer >= 1"):
        CIFARDataModule(root=tmp_path, samples_per_class=-2)
    with pytest.raises(ConfigError, match="needs 64 classes per batch, but the training set has 10"):
        ClassBalancedBatchSampler(torch.arange(1000) % 10, 2, 128)
    with pytest.raises(ConfigError, match="must divide by 4"):
        ClassBalancedBatchSampler(CIFAR_LIKE, 2, 12, world_size=4)
    assert CIFARDataModule(root=tmp_path, samples_per_class=None).samples_per_class is None


class _RecordIndices(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int], list[int]]] = []

    def training_step(self, batch, batch_idx):
        images, labels, indices = batch
        self.seen.append((self.current_epoch, indices.tolist(), labels.tolist()))
        return (self.weight * images.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_option_through_a_lightning_trainer(tmp_path, data_root):
    """Real CIFAR-100: every batch Lightning delivers is m-per-class, epochs differ, as the sampler says."""
    L.seed_everything(7)
    data = CIFARDataModule(root=data_root, batch_size=32, samples_per_class=2)
    module = _RecordIndices()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    labels = data.train_labels
    expected = ClassBalancedBatchSampler(labels, 2, 32, seed=7)
    for epoch in (0, 1):
        expected.set_epoch(epoch)
        want = list(expected)[:3]
        got = [(indices, batch_labels) for e, indices, batch_labels in module.seen if e == epoch]
        assert [indices for indices, _ in got] == want
        for indices, batch_labels in got:
            assert batch_labels == labels[indices].tolist()  # images, labels and indices stay together
            _check_balanced(indices, labels, 2, 16)
    assert len(data.train_dataloader()) == 50_000 // 32


@pytest.mark.slow
def test_real_ddp_run_with_class_balanced_batches(tmp_path, data_root):
    """Two gloo processes through the entry point (about a minute on 2 CPU cores)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mcl_lightning.train", "trainer=ddp_cpu", "method=mutual_cl", "peers=2",
         "backbone=resnet20", "data.samples_per_class=2", f"data.root={data_root}", f"hydra.run.dir={run_dir}",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["method"] == "mutual_cl"
