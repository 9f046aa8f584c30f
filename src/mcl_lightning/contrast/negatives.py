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
        if positive not in POSITIVE_MODES:
            raise ConfigError(f"unknown positive mode {positive!r}; choose one of: {', '.join(POSITIVE_MODES)}")
        self.k, self.positive, self.replacement = k, positive, replacement
        self.largest_pool = 0
        self._table: Tensor | None = None  # first_distinct's scratch (not state: rebuilt on demand)
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
        # index_select instead of advanced indexing or take: both are several times slower on CPU.
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
        negatives = self.order.index_select(0, pos.view(-1)).view(pos.shape)
        if self.positive == "exact":
            positive = indices
        else:
            positive = self.order.index_select(0, start + (torch.rand(batch, device=device) * count).long())
        return torch.cat([positive[:, None], negatives], dim=1)

    def _distinct_from_draws(self, pool: Tensor, batch: int, device: torch.device) -> Tensor:
        """K distinct positions per row from ``draws`` i.i.d. uniform draws (memory ~ K, not the pool).

        The first K distinct values of an i.i.d. uniform sequence are a sample without replacement:
        a uniform K-subset of the pool, in uniformly random order. ``draws`` leaves at least K
        distinct values in every row except with probability below 1e-15 (see ``distinct_draws``).
        First occurrences are found with a (B, pool) table of first positions when that table is
        small (no sort: at K = 16384 on CIFAR about 20x cheaper on CPU than sorting the draws), and
        by sorting the draws otherwise (then K of the distinct values are picked with random keys,
        which is again a uniform K-subset).
        """
        draws = (torch.rand(batch, self.draws, device=device) * pool[:, None]).long()
        size = batch * self.largest_pool
        if size <= FIRST_POSITION_TABLE_LIMIT:
            table = self._table
            if table is None or table.device != device or table.numel() < size:  # metadata only
                table = self._table = torch.full((size,), _EMPTY, dtype=torch.int32, device=device)
            return first_distinct(draws, self.k, self.largest_pool, table)
        draws, _ = draws.sort(dim=1)
        repeated = torch.zeros_like(draws, dtype=torch.bool)
        repeated[:, 1:] = draws[:, 1:] == draws[:, :-1]
        keys = torch.rand(batch, self.draws, device=device).masked_fill_(repeated, 2.0)
        return draws.gather(1, keys.topk(self.k, dim=1, largest=False, sorted=False).indices)


FIRST_POSITION_TABLE_LIMIT = 1 << 24  # entries (int32) of the first-position table: 64 MB
_EMPTY = torch.iinfo(torch.int32).max  # a table entry no value has claimed


def first_distinct(values: Tensor, k: int, bound: int, table: Tensor | None = None) -> Tensor:
    """The first ``k`` distinct entries of each row of ``values`` (B, M), in order; ints in [0, bound).

    Fixed shapes, no sort, no host sync: a (B, bound) table receives each value's first column
    (``scatter_reduce`` amin, deterministic), an entry is a first occurrence where the table points
    back at it, and a running count sends the first ``k`` of them to their output slots. Rows with
    fewer than ``k`` distinct entries leave zeros in the missing slots.

    ``table``: optional int32 scratch of at least B * bound entries, all ``_EMPTY``; it is left
    that way (only the touched entries are reset), so one allocation serves every call.
    """
    batch, m = values.shape
    device = values.device
    flat = (values + torch.arange(batch, device=device)[:, None] * bound).view(-1)
    column = torch.arange(m, device=device, dtype=torch.int32).repeat(batch)
    scratch = table is not None
    table = table[: batch * bound] if scratch else torch.full((batch * bound,), _EMPTY, dtype=torch.int32, device=device)
    table.scatter_reduce_(0, flat, column, reduce="amin")
    is_first = (table.index_select(0, flat) == column).view(batch, m)
    if scratch:
        table.index_fill_(0, flat, _EMPTY)
    rank = is_first.cumsum(1)
    slot = torch.where(is_first & (rank <= k), rank - 1, k)  # the rest go to a spare column
    return values.new_zeros(batch, k + 1).scatter_(1, slot, values)[:, :k]


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
