"""Class-aware contrast indices drawn on the training device, per batch, from the labels.

For every anchor: ``[positive, K negatives]`` bank indices. Negatives never share the anchor's
class (the reference's ``cls_negative`` pools); the positive is the anchor itself (``exact``) or a
random sample of its class (``relax``). The reference draws these per item with NumPy inside the
dataset; here one vectorised draw per batch uses the torch RNG of the device, so
``seed_everything`` makes it reproducible and no CPU work sits on the data path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mcl_lightning.errors import ConfigError
from mcl_lightning.registry import check_choice

POSITIVE_MODES = ("exact", "relax")


class NegativeSampler(nn.Module):
    """Draw (B, K + 1) contrast indices: column 0 the positive, columns 1..K the negatives.

    Args:
        k: negatives per anchor (the reference's ``nce_k``).
        positive: ``exact`` or ``relax``.
        replacement: draw negatives with replacement (the reference's ImageNet behaviour). Without
            replacement (its CIFAR behaviour) the K negatives of a row are distinct, and K may not
            exceed the smallest negative pool.
    """

    def __init__(self, k: int, positive: str = "exact", replacement: bool = False) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"method.nce_k must be >= 1, got {k}")
        check_choice("method.positive", positive, POSITIVE_MODES)
        self.k, self.positive, self.replacement = k, positive, replacement
        self.largest_pool = 0
        # Training-set indices sorted by class, and where each class starts in that order. Derived
        # from the labels at every setup, so kept out of checkpoints (persistent=False).
        self.register_buffer("order", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("class_start", torch.zeros(1, dtype=torch.long), persistent=False)

    def bind(self, train_labels: Tensor) -> None:
        """Index the training set's labels (dataset-index order); checks K against the pools."""
        labels = train_labels.long().to(self.order.device)
        num_classes = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=num_classes)
        pool = len(labels) - counts  # negatives available to an anchor of each class
        smallest = int(pool[counts > 0].min())
        if not self.replacement and self.k > smallest:
            raise ConfigError(
                f"method.nce_k={self.k} exceeds the {smallest} negatives available to an anchor "
                f"(training samples outside its class); lower method.nce_k or set "
                "method.negatives_with_replacement=true"
            )
        self.order = torch.argsort(labels, stable=True)
        self.class_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.largest_pool = int(pool.max())  # Python ints: sampling never reads them off the device
        self.draws = 0 if self.replacement else distinct_draws(self.k, smallest)

    def forward(self, indices: Tensor, labels: Tensor) -> Tensor:
        if self.order.numel() == 0:
            raise RuntimeError("NegativeSampler.bind(train_labels) must be called before sampling")
        # index_select / take instead of advanced indexing: the latter is far slower on CPU.
        start = self.class_start.index_select(0, labels)  # (B,)
        count = self.class_start.index_select(0, labels + 1) - start
        pool = len(self.order) - count  # (B,) negatives per anchor
        batch, device = labels.shape[0], labels.device
        if self.replacement:
            pos = (torch.rand(batch, self.k, device=device) * pool[:, None]).long()
        elif self.draws and self.draws < self.largest_pool:
            pos = self._distinct_from_draws(pool, batch, device)
        else:
            # K distinct positions in [0, pool): the K smallest of uniform keys (a uniform K-subset).
            keys = torch.rand(batch, self.largest_pool, device=device)
            keys.masked_fill_(torch.arange(keys.shape[1], device=device) >= pool[:, None], 2.0)
            pos = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
        # Position p in the pool skips the anchor's class block [start, start + count).
        pos = pos + count[:, None] * (pos >= start[:, None])
        negatives = torch.take(self.order, pos)
        if self.positive == "exact":
            positive = indices
        else:
            positive = self.order.index_select(0, start + (torch.rand(batch, device=device) * count).long())
        return torch.cat([positive[:, None], negatives], dim=1)

    def _distinct_from_draws(self, pool: Tensor, batch: int, device: torch.device) -> Tensor:
        """K distinct positions per row from ``draws`` i.i.d. uniform draws (memory ~ K, not the pool).

        The set of distinct values among i.i.d. uniform draws is, given its size, a uniform subset of
        the pool (the draw is symmetric under permutations of the pool), so K of its members picked
        at random form a uniform K-subset. ``draws`` leaves at least K distinct values in every row
        except with probability below 1e-15 (see ``distinct_draws``).
        """
        draws = (torch.rand(batch, self.draws, device=device) * pool[:, None]).long()
        draws, _ = draws.sort(dim=1)
        repeated = torch.zeros_like(draws, dtype=torch.bool)
        repeated[:, 1:] = draws[:, 1:] == draws[:, :-1]
        keys = torch.rand(batch, self.draws, device=device).masked_fill_(repeated, 2.0)
        return draws.gather(1, keys.topk(self.k, dim=1, largest=False, sorted=False).indices)


def distinct_draws(k: int, pool: int, sigmas: float = 9.0) -> int:
    """The number of i.i.d. uniform draws from ``pool`` items that yields at least ``k`` distinct ones
    with a margin of ``sigmas`` standard deviations (9 sigmas: a miss below 1e-15 per row).

    Returns 0 when no number of draws below 4 * pool does (then drawing keys over the pool is cheaper).
    """
    def distinct_mean_std(m: int) -> tuple[float, float]:
        q1, q2 = (1 - 1 / pool) ** m, (1 - 2 / pool) ** m
        mean = pool * (1 - q1)
        var = pool * q1 + pool * (pool - 1) * q2 - (pool * q1) ** 2
        return mean, math.sqrt(max(var, 0.0))

    m = k
    while m < 4 * pool:
        mean, std = distinct_mean_std(m)
        if mean - sigmas * std - 1 >= k:
            return m
        m = int(m * 1.02) + 8
    return 0
