"""Keyed random numbers: the tensor and Python-int versions agree bit for bit, and are uniform."""

from __future__ import annotations

import torch

from mcl_lightning import rng
from mcl_lightning.data import sample_key, sample_keys


def test_hash32_is_a_bijection_on_a_block_and_matches_the_int_version():
    x = torch.arange(1 << 16) * 65_537  # 65,536 distinct 32-bit values
    h = rng.hash32(x)
    assert h.min() >= 0 and h.max() <= rng.MASK32 and len(torch.unique(h)) == len(x)
    values = [0, 1, 2, 12345, rng.MASK32, (1 << 31) + 7, 0xDEADBEEF]
    assert [rng.hash32_int(v) for v in values] == rng.hash32(torch.tensor(values)).tolist()
    for seed in (0, 1, -1, 2**40 + 3):
        assert rng.key_int(seed, rng.STREAM_AUGMENT) == int(rng.key(seed, rng.STREAM_AUGMENT))
    indices = torch.randint(0, 1_300_000, (500,))
    assert sample_keys(7, 3, indices).tolist() == [sample_key(7, 3, i) for i in indices.tolist()]


def test_uniform_and_below_are_uniform():
    h = rng.mix(rng.key(0, 1), torch.arange(200_000))
    u = rng.uniform(h)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    counts = torch.bincount(rng.below(h, 7), minlength=7)
    assert len(counts) == 7 and (counts - 200_000 / 7).abs().max() < 600  # ~5 standard deviations
    assert [rng.below_int(v, 7) for v in h[:50].tolist()] == rng.below(h[:50], 7).tolist()
