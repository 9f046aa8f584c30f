"""Class-aware contrast indices drawn on the training device, per batch, from the labels.

For every anchor: ``[positive, K negatives]`` bank indices. Negatives never share the anchor's
class (the reference's ``cls_negative`` pools); the positive is the anchor itself (``exact``) or a
random sample of its class (``relax``). With ``same_class=P`` (winycg/MCL's ImageNet ``pos_k``),
P samples of the anchor's class, distinct, go between the two: ``[positive, P same-class, K
negatives]``. The reference draws these per item with NumPy inside the
dataset; here one vectorised draw per batch runs on the training device, with no host sync.

The random numbers are keyed by ``(seed, step, dataset index)`` (``mcl_lightning.core.rng``), not by
a process's RNG state: an anchor's negatives at a given step do not depend on which rank holds it
or on the rest of its batch, so every DDP rank draws its own negatives and a 2-rank run draws
exactly what a 1-rank run on the same global batches draws.

Without replacement, a row's K negatives are a uniformly random K-subset of its pool, drawn in one
of two ways, chosen once at ``NegativeSampler.bind`` by memory:

- ``sparse`` (whenever K is small next to the pool, e.g. every ImageNet setting): draw M >= K
  candidates with replacement and keep the first K distinct ones in draw order (the first K distinct
  values of an i.i.d. uniform sequence are a sample without replacement: a uniform K-subset); a
  reused (B, pool) table of first positions finds them without sorting for CIFAR-size pools (at
  most 131k, table at most 64 MB), a stable sort otherwise (the same result, so neither the batch
  size nor the device's choice ever changes a row's negatives).
  M is set so that
  fewer than K distinct candidates has probability below 1e-20 per row (then the row repeats a
  negative); memory is B x M, which does not grow with the dataset
  (M ~ K + K^2 / (2 pool) + sqrt(92 K) + 92), plus the table on CIFAR-size pools.
- ``dense`` (K a large fraction of the pool): random keys over the whole pool, K smallest kept;
  memory B x pool, taken only when that is at most twice the sparse path's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mcl_lightning.core import rng
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.core.registry import check_choice

POSITIVE_MODES = ("exact", "relax")
_BIG = 1 << 62  # keys above every real key (real keys < 2**63 / 2)


FIRST_POSITION_TABLE_LIMIT = 1 << 24  # entries (int32) of the first-position table: 64 MB
FIRST_POSITION_TABLE_MAX_POOL = 1 << 17  # CIFAR-size pools only: ImageNet's keep memory ~ B x M
_EMPTY = torch.iinfo(torch.int32).max  # a table entry no value has claimed


def first_distinct(values: Tensor, k: int, bound: int, table: Tensor | None = None) -> Tensor:
    """The first ``k`` distinct entries of each row of ``values`` (B, M), in order; ints in [0, bound).

    Fixed shapes, no host sync. First occurrences are found with ``table``, an int32 scratch of at
    least B * bound entries all ``_EMPTY`` (each value's first column by ``scatter_reduce`` amin;
    only the touched entries are reset afterwards, so one allocation serves every call), or, without
    a table, by a stable sort. Both give the same result. A running count then sends the first ``k``
    to their output slots; a row with fewer than ``k`` distinct entries leaves zeros.
    """
    batch, m = values.shape
    device = values.device
    column = torch.arange(m, device=device, dtype=torch.int32)
    if table is not None:
        flat = (values + torch.arange(batch, device=device)[:, None] * bound).view(-1)
        columns = column.repeat(batch)
        table = table[: batch * bound]
        table.scatter_reduce_(0, flat, columns, reduce="amin")
        is_first = (table.index_select(0, flat) == columns).view(batch, m)
        table.index_fill_(0, flat, _EMPTY)
    else:
        ordered, order = values.sort(dim=1, stable=True)  # equal values keep their column order
        first_sorted = torch.ones_like(ordered, dtype=torch.bool)
        first_sorted[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        is_first = torch.empty_like(first_sorted).scatter_(1, order, first_sorted)
    rank = is_first.cumsum(1)
    slot = torch.where(is_first & (rank <= k), rank - 1, k)  # the rest go to a spare column
    return values.new_zeros(batch, k + 1).scatter_(1, slot, values)[:, :k]


def candidates_needed(k: int, pool: int) -> int | None:
    """Draws with replacement from ``pool`` values that give >= ``k`` distinct ones except with
    probability < 1e-20; ``None`` when that needs about as many as ``pool``.

    The number D of distinct values is a sum of negatively associated indicators, so the Chernoff
    bound P(D <= E[D] - t) <= exp(-t^2 / (2 E[D])) holds; E[D] >= k + t with t = sqrt(92 k) + 92
    gives exp(-46) < 1.1e-20. Draws: M = -pool * log(1 - (k + t) / pool), since
    E[D] = pool * (1 - (1 - 1/pool)^M) >= pool * (1 - exp(-M / pool)).
    """
    need = k + math.sqrt(92.0 * k) + 92.0
    if need >= pool:
        return None
    return math.ceil(-pool * math.log1p(-need / pool))


class NegativeSampler(nn.Module):
    """Draw (B, K + 1) contrast indices: column 0 the positive, columns 1..K the negatives.

    Args:
        k: negatives per anchor (the reference's ``nce_k``).
        positive: ``exact`` or ``relax``.
        replacement: draw negatives with replacement (the reference's ImageNet behaviour). Without
            replacement (its CIFAR behaviour) the K negatives of a row are distinct, and K may not
            exceed the smallest negative pool.
        seed: the key of the random numbers; ``None`` takes the run's seed (``seed_everything``,
            see ``mcl_lightning.core.rng.run_seed``) at ``bind``.
        same_class: P extra columns after the positive, P distinct samples of the anchor's class
            (uniform P-subset of the class, the anchor itself included, as winycg/MCL@236da2f
            ``dataset/imagenet.py:69`` draws ``pos_k`` from ``cls_positive`` without replacement).
        k_option: the option name the errors give for ``k`` (``method.nce_k``, ``method.neg_k``).
    """

    def __init__(self, k: int, positive: str = "exact", replacement: bool = False, seed: int | None = None,
                 same_class: int = 0, k_option: str = "method.nce_k") -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"{k_option} must be >= 1, got {k}")
        if same_class < 0:
            raise ConfigError(f"method.pos_k must be >= 0, got {same_class}")
        check_choice("method.positive", positive, POSITIVE_MODES)
        self.k, self.positive, self.replacement, self.seed = k, positive, replacement, seed
        self.same_class, self.k_option = same_class, k_option
        self.largest_class = 0
        self.same_class_candidates = 0  # M of the sparse same-class draw (0: dense keys over the class)
        self.largest_pool = 0
        self.mode = "replacement" if replacement else "dense"
        self.num_candidates = 0  # M of the sparse path
        self._table: Tensor | None = None  # first_distinct's scratch (not state: rebuilt on demand)
        self._slot_hashes: dict[tuple, Tensor] = {}  # _slots' per-slot hashes (not state: rebuilt on demand)
        # Training-set indices sorted by class, and where each class starts in that order. Derived
        # from the labels at every setup, so kept out of checkpoints (persistent=False).
        self.register_buffer("order", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("class_start", torch.zeros(1, dtype=torch.long), persistent=False)
        # [seed, draws so far]: checkpointed, so a resumed run draws what the uninterrupted one would.
        self.register_buffer("stream", torch.zeros(2, dtype=torch.long))

    def bind(self, train_labels: Tensor) -> None:
        """Index the training set's labels (dataset-index order); checks K against the pools."""
        labels = train_labels.long().to(self.order.device)
        num_classes = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=num_classes)
        pool = len(labels) - counts  # negatives available to an anchor of each class
        smallest = int(pool[counts > 0].min())
        if not self.replacement and self.k > smallest:
            raise ConfigError(
                f"{self.k_option}={self.k} exceeds the {smallest} negatives available to an anchor "
                f"(training samples outside its class); lower {self.k_option} or set "
                "method.negatives_with_replacement=true"
            )
        smallest_class = int(counts[counts > 0].min())
        if self.same_class > smallest_class:
            raise ConfigError(
                f"method.pos_k={self.same_class} exceeds the {smallest_class} training samples of the smallest "
                f"class (same-class samples are drawn without replacement); lower method.pos_k"
            )
        self.largest_class = int(counts.max())
        m = candidates_needed(self.same_class, smallest_class) if self.same_class > 1 else None
        self.same_class_candidates = m if m is not None and 2 * m <= self.largest_class else 0
        self.order = torch.argsort(labels, stable=True)
        self.class_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.largest_pool = int(pool.max())  # Python ints: sampling never reads them off the device
        if not self.replacement:
            m = candidates_needed(self.k, smallest)
            sparse = m is not None and 2 * m <= self.largest_pool
            self.mode, self.num_candidates = ("sparse", m) if sparse else ("dense", 0)
        self.stream[0] = rng.run_seed(self.seed)

    def forward(self, indices: Tensor, labels: Tensor) -> Tensor:
        if self.order.numel() == 0:
            raise RuntimeError("NegativeSampler.bind(train_labels) must be called before sampling")
        # index_select / take rather than advanced indexing: on CPU the latter is far slower.
        start = self.class_start.index_select(0, labels)  # (B,)
        count = self.class_start.index_select(0, labels + 1) - start
        pool = len(self.order) - count  # (B,) negatives per anchor
        # One key per (seed, step, anchor): nothing depends on the batch's other rows.
        step_key = rng.mix(rng.mix(rng.hash32(self.stream[0] & rng.MASK32), self.stream[0] >> 32), self.stream[1])
        row = rng.mix(step_key, indices)[:, None]  # (B, 1)
        self.stream[1] += 1
        if self.replacement:
            pos = self._with_replacement(row, pool)
        elif self.mode == "sparse":
            pos = self._sparse(row, pool)
        else:
            pos = self._dense(row, pool)
        # Position p in the pool skips the anchor's class block [start, start + count).
        pos = pos + count[:, None] * (pos >= start[:, None])
        negatives = self.order.index_select(0, pos.reshape(-1)).view(pos.shape)  # take: 3-5x slower on CPU
        if self.positive == "exact":
            positive = indices
        else:
            h = rng.mix(row[:, 0], rng.STREAM_POSITIVE)
            positive = self.order.index_select(0, start + rng.below(h, count))
        columns = [positive[:, None], negatives]
        if self.same_class:
            same = start[:, None] + self._same_class_positions(row, count)
            columns.insert(1, self.order.index_select(0, same.reshape(-1)).view(same.shape))
        return torch.cat(columns, dim=1)

    def _same_class_positions(self, row: Tensor, count: Tensor) -> Tensor:
        """(B, P) distinct positions in [0, count) per row: one keyed draw for P = 1; for larger P
        the first P distinct of M keyed draws (memory B x M) or, when the class is small next to M,
        the P smallest random keys over the class (memory B x largest class)."""
        p = self.same_class
        if p == 1 or self.same_class_candidates:
            values = rng.below(self._slots(max(self.same_class_candidates, 1), rng.STREAM_SAME_CLASS, row),
                               count[:, None])
            return values if p == 1 else first_distinct(values, p, self.largest_class)
        width = self.largest_class
        position = torch.arange(width, device=row.device)
        keys = self._slots(width, rng.STREAM_SAME_CLASS ^ 1, row) * width + position
        keys.masked_fill_(position >= count[:, None], _BIG)
        return keys.topk(p, dim=1, largest=False, sorted=False).indices

    def _slots(self, n: int, stream: int, row: Tensor) -> Tensor:
        """(B, n) 32-bit hashes of (row, stream, slot)."""
        key = (n, stream, row.device)
        slots = self._slot_hashes.get(key)
        if slots is None:  # the same every step: hashed once (a dozen ops fewer per step)
            slots = self._slot_hashes[key] = rng.hash32(torch.arange(n, device=row.device) ^ stream)
        return rng.hash32(row ^ slots)

    def _with_replacement(self, row: Tensor, pool: Tensor) -> Tensor:
        return rng.below(self._slots(self.k, rng.STREAM_NEGATIVES, row), pool[:, None])

    def _dense(self, row: Tensor, pool: Tensor) -> Tensor:
        # K distinct positions in [0, pool): the K smallest of distinct random keys (hash, position).
        width = self.largest_pool
        position = torch.arange(width, device=row.device)
        keys = self._slots(width, rng.STREAM_SELECT, row) * width + position
        keys.masked_fill_(position >= pool[:, None], _BIG)
        return keys.topk(self.k, dim=1, largest=False, sorted=False).indices

    def _sparse(self, row: Tensor, pool: Tensor) -> Tensor:
        # M keyed candidates with replacement; the first K distinct ones in slot order are a sample
        # without replacement, i.e. a uniform K-subset (each row's choice depends on its own keys only).
        values = rng.below(self._slots(self.num_candidates, rng.STREAM_NEGATIVES, row), pool[:, None])
        size = values.shape[0] * self.largest_pool
        table = None
        if size <= FIRST_POSITION_TABLE_LIMIT and self.largest_pool <= FIRST_POSITION_TABLE_MAX_POOL:  # no sort
            table = self._table
            if table is None or table.device != values.device or table.numel() < size:  # metadata only
                table = self._table = torch.full((size,), _EMPTY, dtype=torch.int32, device=values.device)
        return first_distinct(values, self.k, self.largest_pool, table)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001
        # Checkpoints written before the stream existed load too (their run continues from step 0).
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "stream" not in state_dict and prefix + "stream" in missing_keys:
            missing_keys.remove(prefix + "stream")
