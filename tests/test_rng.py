"""Keyed random numbers: the tensor and Python-int versions agree bit for bit, and are uniform."""

from __future__ import annotations

import torch

from mcl_lightning.core import rng
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


def test_mul32_is_the_product_mod_2_32_without_overflow():
    """Both halves of the constant range (below and above 2**31), the extremes of x included."""
    x = torch.cat([torch.tensor([0, 1, 2, (1 << 31) - 1, 1 << 31, rng.MASK32 - 1, rng.MASK32]),
                   torch.randint(0, 1 << 32, (2000,))])
    for c in (0, 1, 0x7FEB352D, (1 << 31) - 1, 1 << 31, 0x846CA68B, rng.MASK32):
        assert rng._mul32(x, c).tolist() == [(v * c) % (1 << 32) for v in x.tolist()], hex(c)


def test_uniform_and_below_are_uniform():
    h = rng.mix(rng.key(0, 1), torch.arange(200_000))
    u = rng.uniform(h)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    counts = torch.bincount(rng.below(h, 7), minlength=7)
    assert len(counts) == 7 and (counts - 200_000 / 7).abs().max() < 600  # ~5 standard deviations
    assert [rng.below_int(v, 7) for v in h[:50].tolist()] == rng.below(h[:50], 7).tolist()


def test_keyed_draws_copy_nothing_from_the_host_to_the_device():
    """On CUDA, copying a host value to the device (``torch.tensor(v, device=...)``, a CPU tensor
    moved or mixed in) synchronises the stream. On the meta device such calls are recorded: the
    crops and every negative-sampling mode must make none (the labels are bound once, at setup)."""
    from torch.overrides import TorchFunctionMode

    from mcl_lightning.contrast import NegativeSampler
    from mcl_lightning.data import random_crop_flip

    class HostToDevice(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if name in ("tensor", "as_tensor", "asarray", "from_numpy") or any(
                    isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in flat):
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    labels_all = torch.arange(2000) % 10
    samplers = []
    for kwargs in ({"k": 8}, {"k": 1700}, {"k": 64, "positive": "relax", "replacement": True}):
        sampler = NegativeSampler(**kwargs)
        sampler.bind(labels_all)
        samplers.append(sampler.to("meta"))
    assert [s.mode for s in samplers] == ["sparse", "dense", "replacement"]
    images = torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta")
    indices = torch.empty(8, dtype=torch.long, device="meta")
    labels = torch.empty(8, dtype=torch.long, device="meta")
    with HostToDevice() as mode:
        random_crop_flip(images, keys=sample_keys(3, 5, indices))
        for sampler in samplers:
            sampler(indices, labels)
    assert mode.seen == []
    with HostToDevice() as mode:  # what the detector catches
        indices ^ torch.tensor(5, device="meta")
    assert mode.seen == ["tensor"]
