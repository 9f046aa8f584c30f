"""Counter-based random numbers keyed by the sample, not by the process.

A random number here is a hash of *what it is for*: ``(seed, stream, epoch or step, dataset index,
slot)``. The crop of training image 1234 in epoch 7, or its negatives at step 900, are therefore
the same whichever rank sees the image, whatever the batch size or the world size and whoever else
is in the batch. Two things follow:

- under DDP every rank draws its own numbers (its samples differ), with no per-rank RNG state to
  seed, save or restore, and a seed reproduces a run;
- a 2-rank run with per-device batch B/2 draws exactly the augmentation and the negatives of a
  1-rank run with batch B on the same global batches (``tests/test_ddp_equivalence.py``).

Everything is integer arithmetic on int64 tensors holding 32-bit values, on any device (no host
synchronisation): ``hash32`` is Chris Wellons' "lowbias32" integer hash, with the 32-bit
multiplications done so that no int64 product overflows (``_mul32``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = [
    "MASK32",
    "STREAM_AUGMENT",
    "STREAM_BANK_INIT",
    "STREAM_NEGATIVES",
    "STREAM_POSITIVE",
    "STREAM_SAME_CLASS",
    "STREAM_SELECT",
    "below",
    "below_int",
    "hash32",
    "hash32_int",
    "key",
    "key_int",
    "mix",
    "mix_int",
    "run_seed",
    "uniform",
    "uniform_int",
]

MASK32 = 0xFFFFFFFF

# One tag per use, so that the same (seed, index) never gives correlated numbers to two uses.
STREAM_NEGATIVES = 0x6E656731  # negatives drawn with replacement / candidate pools
STREAM_SELECT = 0x73656C31  # selection keys of the without-replacement sampler
STREAM_POSITIVE = 0x706F7331  # the "relax" positive
STREAM_SAME_CLASS = 0x73616D31  # extra same-class positives (mutual_cl's bank variant, pos_k)
STREAM_AUGMENT = 0x61756731  # data augmentation (crops, flips)
STREAM_BANK_INIT = 0x62616E31  # the seed of the memory banks' initial rows


def run_seed(seed: int | None = None) -> int:
    """``seed`` if given, else the seed of ``lightning.seed_everything`` (``PL_GLOBAL_SEED``), else 0.

    The same convention as the ``DistributedSampler`` that Lightning injects, so every rank of a
    run (each calls ``seed_everything`` with the run's seed) agrees without communicating.
    """
    if seed is not None:
        return int(seed)
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for 0 <= x < 2**32 and 0 <= c < 2**32, in two ops without int64 overflow.

    c and c - 2**32 are equal mod 2**32, and one of them lies in [-2**31, 2**31): times x (< 2**32)
    its product stays inside int64, and ``& MASK32`` of the two's-complement result is the product
    mod 2**32 (exact; tests/test_rng.py checks it against Python's integers)."""
    k = c if c < 1 << 31 else c - (1 << 32)
    return (x * k) & MASK32


def hash32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (lowbias32) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix(h: Tensor | int, x: Tensor | int) -> Tensor | int:
    """Fold one more component ``x`` (int64 values; broadcast) into the hash ``h``.

    Either may be a Python int: its hash is computed on the host and enters the tensor arithmetic
    as a scalar, so no host-to-device copy (on CUDA, a stream synchronisation) is ever made.
    """
    if not isinstance(x, Tensor):
        hx = hash32_int(int(x))
        return hash32_int(h ^ hx) if not isinstance(h, Tensor) else hash32(h ^ hx)
    return hash32(hash32(x & MASK32) ^ h)


def key(seed: int, stream: int, device: torch.device | str | None = None) -> Tensor:
    """The 0-d root key of ``stream`` for ``seed`` (any Python int), on ``device``."""
    seed = int(seed)
    h = hash32(torch.tensor(stream & MASK32, dtype=torch.long, device=device))
    return mix(mix(h, seed & MASK32), (seed >> 32) & MASK32)


def uniform(h: Tensor) -> Tensor:
    """float32 in [0, 1) from the top 24 bits of a 32-bit hash (exact in float32)."""
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def below(h: Tensor, n: Tensor | int) -> Tensor:
    """Integers in [0, n) from a 32-bit hash: ``floor(h * n / 2**32)`` (n < 2**31), bias <= n / 2**32."""
    return (h * n) >> 32


# The same functions on Python ints, bit for bit (per-sample work in data-loading workers, where a
# handful of tensor ops per image would cost more than decoding it).
def hash32_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def mix_int(h: int, x: int) -> int:
    return hash32_int(h ^ hash32_int(x & MASK32))


def key_int(seed: int, stream: int) -> int:
    seed = int(seed)
    return mix_int(mix_int(hash32_int(stream & MASK32), seed & MASK32), (seed >> 32) & MASK32)


def uniform_int(h: int) -> float:
    return (h >> 8) * (1.0 / (1 << 24))


def below_int(h: int, n: int) -> int:
    return (h * n) >> 32
