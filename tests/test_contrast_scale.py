"""MCL-OKD's contrastive machinery at ImageNet size: half-precision banks, a negative sampler whose
memory does not grow with the dataset, and exact uniformity of both without-replacement paths."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mcl_lightning.contrast import MemoryBank, NegativeSampler, multi_view_nce
from mcl_lightning.contrast.memory_bank import bank_bytes
from mcl_lightning.contrast.negatives import candidates_needed
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import MCLOKD

from conftest import attached

IMAGENET_TRAIN = 1_281_167


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_imagenet_size_negatives_without_replacement_stay_small():
    """1000 classes of ~1281 images, K = 16384 without replacement: never batch x pool keys."""
    labels = torch.arange(IMAGENET_TRAIN) % 1000
    sampler = NegativeSampler(k=16384)
    sampler.bind(labels)
    assert sampler.mode == "sparse" and sampler.num_candidates == candidates_needed(16384, IMAGENET_TRAIN - 1282)
    batch = 8
    indices = torch.randint(0, IMAGENET_TRAIN, (batch,))
    with LargestTensor() as probe:
        idx = sampler(indices, labels[indices])
    pool = IMAGENET_TRAIN - 1282
    assert probe.largest <= batch * sampler.num_candidates < batch * pool / 50  # 17.8k per row, not 1.28M
    assert idx.shape == (batch, 16385)
    assert all(len(set(row.tolist())) == 16384 for row in idx[:, 1:])  # distinct
    assert (labels[idx[:, 1:]] != labels[indices][:, None]).all()  # never the anchor's class


def test_sparse_sampler_is_an_exact_uniform_subset():
    """Marginals, order statistics and adjacency all as for a uniform K-subset of the pool (a
    "sort i.i.d. draws and spread them" shortcut would under-weight adjacent positions)."""
    n, k = 2000, 20
    labels = torch.arange(3 * 1000) % 3  # anchors of class 0 have the 2000 samples of classes 1, 2
    sampler = NegativeSampler(k=k)
    sampler.bind(labels)
    assert sampler.mode == "sparse"
    anchors = torch.arange(0, 3000, 3)  # the 1000 samples of class 0
    rows = torch.cat([sampler(anchors, labels[anchors])[:, 1:] for _ in range(6)])  # 6000 rows
    position = torch.empty_like(sampler.order)
    position[sampler.order] = torch.arange(len(sampler.order))
    rows = position[rows] - 1000  # pool positions 0..1999
    assert rows.min() >= 0 and rows.max() < n and all(len(set(r.tolist())) == k for r in rows[:500])
    counts = torch.bincount(rows.flatten(), minlength=n).double()
    expected = len(rows) * k / n  # 60 per position
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
    # E[min] = (n - K) / (K + 1) for a uniform K-subset of {0..n-1}; sd about n / K
    smallest = rows.min(1).values.double()
    assert abs(float(smallest.mean()) - (n - k) / (k + 1)) < 5 * float(smallest.std()) / math.sqrt(len(rows))
    # adjacent positions both chosen: K (K - 1) / n per row in expectation
    ordered = rows.sort(1).values
    adjacent = float(((ordered[:, 1:] - ordered[:, :-1]) == 1).sum())
    mean = len(rows) * k * (k - 1) / n  # 1140
    assert abs(adjacent - mean) < 5 * math.sqrt(mean)


def test_dense_path_for_k_close_to_the_pool_and_errors_either_way():
    labels = torch.arange(500) % 10  # 450 negatives per anchor
    dense = NegativeSampler(k=300)
    dense.bind(labels)
    assert dense.mode == "dense"  # the sparse path would need more candidates than the pool
    rows = dense(torch.arange(10), labels[:10])[:, 1:]
    assert all(len(set(r.tolist())) == 300 for r in rows)
    for k in (451, 10_000):  # K > pool: an error, whichever path would have drawn them
        with pytest.raises(ConfigError, match=f"nce_k={k} exceeds the 450 negatives"):
            NegativeSampler(k=k).bind(labels)


def test_half_precision_banks_score_and_update_in_float32():
    torch.manual_seed(0)
    reference = MemoryBank(2, 50, 16, dtype="float32", seed=0)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        bank = MemoryBank(2, 50, 16, dtype=dtype, seed=0)
        assert bank.memory.dtype == torch_dtype
        torch.testing.assert_close(bank.memory.float(), reference.memory, atol=2e-3, rtol=1e-2)  # same rows, rounded
        z = torch.nn.functional.normalize(torch.randn(2, 6, 16), dim=-1)
        idx = torch.arange(6)
        expected = 0.5 * bank.memory[:, idx].float() + 0.5 * z  # the float32 update of the stored rows
        bank.update(idx, z)
        torch.testing.assert_close(bank.memory[:, idx].float(), expected / expected.norm(dim=-1, keepdim=True),
                                   atol=1e-2, rtol=1e-2)
        rows = bank.gather(torch.randint(0, 50, (6, 9)))
        loss = multi_view_nce(rows, z, tau=0.07, num_samples=50)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, multi_view_nce(rows.float(), z, tau=0.07, num_samples=50))
        # a checkpoint restores the rows into the configured storage type
        restored = MemoryBank(2, 0, 16, dtype=dtype)
        restored.load_state_dict(bank.state_dict())
        assert restored.memory.dtype == torch_dtype and torch.equal(restored.memory, bank.memory)
    with pytest.raises(ConfigError, match="float64"):
        MemoryBank(2, 10, 16, dtype="float64")


def test_bank_dtype_reaches_the_method_and_the_documented_costs():
    method = attached(MCLOKD(nce_k=8, bank_dtype="bfloat16"), 2, 64)
    method.setup_data(torch.arange(100) % 5)
    assert method.memory_bank.memory.dtype == torch.bfloat16
    assert round(bank_bytes(4, IMAGENET_TRAIN) / 1e9, 2) == 2.62  # docs/guide/imagenet.md: N = 4, float32
    assert round(bank_bytes(4, IMAGENET_TRAIN, dtype="bfloat16") / 1e9, 2) == 1.31


def test_bank_initialisation_ignores_the_global_rng():
    """Lightning's DDP re-seeds the global RNG during setup: the banks must not depend on it."""
    torch.manual_seed(1)
    first = MemoryBank(2, 20, 8, seed=4)
    torch.manual_seed(2)
    assert torch.equal(MemoryBank(2, 20, 8, seed=4).memory, first.memory)
    assert not torch.equal(MemoryBank(2, 20, 8, seed=5).memory, first.memory)
