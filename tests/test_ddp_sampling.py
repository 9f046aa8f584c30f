"""DDP data order and evaluation: every image evaluated exactly once whatever the world size, the
training shards of W ranks are the 1-rank batches, and each rank draws its own crops."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from mcl_lightning.data import EvalShardSampler, GlobalOrderSampler, random_crop_flip, sample_keys


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 99, 4999])
def test_eval_shards_cover_every_image_exactly_once(world, n):
    dataset = range(n)
    shards = [list(EvalShardSampler(dataset, world, rank)) for rank in range(world)]
    assert [len(EvalShardSampler(dataset, world, rank)) for rank in range(world)] == [len(s) for s in shards]
    assert sorted(i for shard in shards for i in shard) == list(range(n))  # no padding, no repeats
    # torch's DistributedSampler (what Lightning would inject) repeats images when W does not divide n
    padded = sum(len(torch.utils.data.DistributedSampler(dataset, world, r, shuffle=False)) for r in range(world))
    assert padded == n + (-n) % world


@pytest.mark.parametrize("world", [2, 4])
def test_w_ranks_see_the_one_rank_batches(world):
    dataset, batch = range(96), 16
    for epoch in (0, 1):
        one = GlobalOrderSampler(dataset, 1, 0, seed=3)
        one.set_epoch(epoch)
        order = list(one)
        ranks = []
        for r in range(world):
            sampler = GlobalOrderSampler(dataset, world, r, seed=3)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        per_device = batch // world
        for step in range(len(order) // batch):
            together = [i for shard in ranks for i in shard[step * per_device:(step + 1) * per_device]]
            assert sorted(together) == sorted(order[step * batch:(step + 1) * batch])
    # for augmentation in worker processes, the sampler can tag each index with its epoch
    tagged, plain = GlobalOrderSampler(dataset, world, 0, seed=3, yield_epoch=True), GlobalOrderSampler(dataset, world, 0, seed=3)
    tagged.set_epoch(5), plain.set_epoch(5)
    pairs = list(tagged)
    assert [i for i, _ in pairs] == list(plain) and {epoch for _, epoch in pairs} == {5}


def test_crops_are_keyed_by_sample_not_by_rank_or_batch():
    """The old scheme drew crop i of every rank's batch from one shared RNG stream; now each image
    has its own key: two ranks' batches get independent crops, and an image's crop does not depend
    on its batch."""
    image = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 3, 32, 32)
    batch = image.expand(8, 3, 32, 32).contiguous()
    rank0, rank1 = torch.arange(0, 16, 2), torch.arange(1, 16, 2)
    crops0 = random_crop_flip(batch, keys=sample_keys(0, 0, rank0))
    crops1 = random_crop_flip(batch, keys=sample_keys(0, 0, rank1))
    assert not torch.equal(crops0, crops1)
    whole = random_crop_flip(image.expand(16, 3, 32, 32).contiguous(), keys=sample_keys(0, 0, torch.arange(16)))
    assert torch.equal(whole[0::2], crops0) and torch.equal(whole[1::2], crops1)
    assert not torch.equal(random_crop_flip(batch, keys=sample_keys(0, 1, rank0)), crops0)  # next epoch
    assert not torch.equal(random_crop_flip(batch, keys=sample_keys(1, 0, rank0)), crops0)  # another seed
    assert torch.equal(random_crop_flip(batch, keys=sample_keys(0, 0, rank0)), crops0)


def test_ddp_cpu_run_counts_every_test_image_once(tmp_path, data_root):
    """The acceptance command: trainer=ddp_cpu on real CIFAR-100; results.json records that the test
    metrics saw exactly 10,000 images, and validation on a 99-image holdout (odd: Lightning's sampler
    would pad it to 100) exactly 99."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mcl_lightning.train", "trainer=ddp_cpu", "peers=2", "backbone=resnet20",
         "method.nce_k=32", f"data.root={data_root}", "data.val_split=99", f"hydra.run.dir={run_dir}",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false",
         "data.eval_batch_size=500"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["test"]["num_images"] == 10_000
    assert results["final"]["num_images"] == results["best"]["num_images"] == 99
    assert results["selection"] == "holdout-selected"
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert [float(r["test/num_images"]) for r in rows if r.get("test/num_images")] == [10_000.0]
    assert "DistributedSampler" not in proc.stderr  # Lightning's "replicates some samples" warning
