"""Segment trees with vectorised updates and prefix-sum search, for prioritized replay.

Prioritized replay keeps one :class:`SumSegmentTree` (to sample slots in
proportion to their priority) and one :class:`MinSegmentTree` (for the
importance-weight normaliser) over the buffer's slots::

    sums, mins = SumSegmentTree(capacity), MinSegmentTree(capacity)
    sums[slots] = priorities ** alpha          # one vectorised update per batch
    mins[slots] = priorities ** alpha
    u = rng.random(32) * sums.sum()
    sampled = sums.find_prefixsum_idx(u)       # 32 slots, no per-sample Python loop
    p_min = mins.min() / sums.sum()

Layout: a 64-ary tree stored as one flat array per level, ``levels[0]`` the leaves.
Every entry of level ``l + 1`` aggregates 64 consecutive entries of level ``l``; levels
are added until one has at most 1,024 entries (the top; 50,000 slots: 50,000 -> 782,
a million: 1,000,000 -> 15,625 -> 245). The root, the aggregate of the top level, is
computed when first asked for after an update. An update of ``k`` leaves costs one
numpy reduction over ``k x 64`` entries per level above the leaves, a search one
running sum over the top level plus one over ``k x 64`` entries per level below it:
a handful of numpy calls, where a binary tree needs several per level (16 levels for
50,000 slots); on batches of 32 rows the calls, not the arithmetic, are what costs.
Parents are always recomputed from their children (never updated by deltas), so
float sums do not drift however many updates happen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SegmentTree", "SumSegmentTree", "MinSegmentTree", "keep_last"]

_FANOUT_BITS = 6
_FANOUT = 1 << _FANOUT_BITS  # children per node
_TOP_MAX = 1024  # entries in the top level at most


def keep_last(idx: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, values)`` with only the last occurrence of each repeated index (numpy
    leaves the order of duplicate fancy assignments unspecified); unchanged, and
    cheap, when all indexes differ."""
    if idx.size > 1:
        ordered = np.sort(idx)
        if (ordered[1:] == ordered[:-1]).any():
            unique, first_in_reversed = np.unique(idx[::-1], return_index=True)
            return unique, values[::-1][first_in_reversed]
    return idx, values


class SegmentTree:
    """A segment tree over ``capacity`` float leaves with an associative ``operation``
    (a numpy ufunc with ``reduce``: ``np.add``, ``np.minimum``).

    Use the concrete :class:`SumSegmentTree` / :class:`MinSegmentTree`.
    """

    def __init__(self, capacity: int, operation: np.ufunc, neutral: float) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or capacity < 1:
            raise ValueError(f"segment tree capacity must be an int >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self._op = operation
        self._neutral = float(neutral)
        # Entries per level, bottom up, until one has at most _TOP_MAX (the top).
        counts = [self.capacity]
        while len(counts) == 1 or counts[-1] > _TOP_MAX:
            counts.append(-(-counts[-1] // _FANOUT))
        # Every entry of a level has _FANOUT children below it, padding included, so a
        # descent that strays into the padding (float round-off) stays in range; the
        # padding stays neutral.
        sizes = [counts[-1]]
        for _ in counts[:-1]:
            sizes.insert(0, sizes[0] * _FANOUT)
        self._levels: list[np.ndarray] = [np.full(size, self._neutral) for size in sizes]
        # Per level below the top, a [nodes, _FANOUT] view: row i = children of node i.
        self._children = [level.reshape(-1, _FANOUT) for level in self._levels[:-1]]
        self._root: float | None = self._neutral  # None: recompute on the next read

    @property
    def _leaves(self) -> np.ndarray:
        return self._levels[0]

    # ------------------------------------------------------------ indexing
    def _check_idx(self, idx: np.ndarray) -> None:
        if idx.size and not (idx.min() >= 0 and idx.max() < self.capacity):
            bad = idx[(idx < 0) | (idx >= self.capacity)][0]
            raise IndexError(f"segment tree index {int(bad)} out of range [0, {self.capacity})")

    def _check_values(self, values: np.ndarray) -> None:
        """Hook for subclasses (the sum tree rejects negative values)."""

    def __setitem__(self, idx: int | np.ndarray, value: float | np.ndarray) -> None:
        """Set one leaf or many at once: ``tree[np.array([3, 5])] = [0.5, 2.0]``.

        With repeated indexes the last value wins. The touched parents are then
        recomputed, one numpy reduction per level.
        """
        idx_arr = np.asarray(idx)
        if idx_arr.dtype.kind not in "iu":
            raise TypeError(f"segment tree indexes must be integers, got dtype {idx_arr.dtype}")
        idx_arr = idx_arr.astype(np.int64, copy=False).ravel()
        values = np.asarray(value, dtype=np.float64)
        if values.shape != idx_arr.shape:
            values = np.broadcast_to(values, np.shape(idx)).ravel()
        if idx_arr.size == 0:
            return
        self._check_idx(idx_arr)
        self._check_values(values)
        self.assign(*keep_last(idx_arr, values))

    def assign(self, idx: np.ndarray, values: np.ndarray) -> None:
        """``tree[idx] = values`` without the checks: ``idx`` int64, distinct and in
        range, ``values`` float64 and valid for the tree (the sum tree: finite, >= 0).

        For callers that validated them already, e.g. a prioritized buffer setting
        the same slots in its sum and min trees.
        """
        self._levels[0][idx] = values
        # A parent touched twice gets the same value twice: cheaper than a unique.
        for children, parents in zip(self._children, self._levels[1:]):
            idx = idx >> _FANOUT_BITS
            parents[idx] = self._op.reduce(children[idx], axis=1)
        self._root = None

    def __getitem__(self, idx: int | np.ndarray) -> Any:
        """Leaf value(s): ``tree[3]`` -> float, ``tree[idx_array]`` -> array."""
        idx_arr = np.asarray(idx)
        if idx_arr.dtype.kind not in "iu":
            raise TypeError(f"segment tree indexes must be integers, got dtype {idx_arr.dtype}")
        self._check_idx(idx_arr.ravel())
        out = self._leaves[idx_arr.astype(np.int64, copy=False)]
        return float(out) if out.ndim == 0 else out

    # ---------------------------------------------------------- reductions
    def reduce(self, start: int = 0, end: int | None = None) -> float:
        """``operation`` over leaves ``[start, end)`` (``end`` defaults to capacity).

        The whole range is the root (O(1) between updates); a part of it is reduced
        from its leaves.
        """
        if end is None:
            end = self.capacity
        if not 0 <= start <= end <= self.capacity:
            raise IndexError(f"segment tree range [{start}, {end}) is not within "
                             f"[0, {self.capacity}]")
        if start == 0 and end == self.capacity:
            if self._root is None:
                self._root = float(self._op.reduce(self._levels[-1]))
            return self._root  # the padding is neutral
        if start == end:
            return self._neutral
        return float(self._op.reduce(self._leaves[start:end]))

    def values(self) -> np.ndarray:
        """A copy of all ``capacity`` leaf values."""
        return self._leaves[:self.capacity].copy()

    @property
    def nbytes(self) -> int:
        """Bytes held by the tree's arrays."""
        return int(sum(level.nbytes for level in self._levels))


class SumSegmentTree(SegmentTree):
    """Sum tree: range sums and vectorised prefix-sum search (values must be >= 0).

    >>> t = SumSegmentTree(4); t[np.arange(4)] = [1.0, 0.0, 2.0, 1.0]
    >>> t.sum(), t.sum(1, 3), t.find_prefixsum_idx(np.array([0.5, 1.0, 3.5]))
    (4.0, 2.0, array([0, 2, 3]))
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, np.add, 0.0)

    def _check_values(self, values: np.ndarray) -> None:
        # min >= 0 and max < inf are both False for NaN: two reductions check it all.
        if values.size and not (values.min() >= 0 and values.max() < np.inf):
            bad = values[~((values >= 0) & np.isfinite(values))][0]
            raise ValueError(f"SumSegmentTree values must be finite and >= 0, got {bad!r}")

    def sum(self, start: int = 0, end: int | None = None) -> float:
        """Sum of leaves ``[start, end)``; ``sum()`` is the total (O(1) between updates)."""
        return self.reduce(start, end)

    def find_prefixsum_idx(self, prefixsums: float | np.ndarray) -> Any:
        """For each ``p``, the smallest leaf ``i`` with ``sum(0, i + 1) > p``.

        Vectorised: one search over the running sums of the top level, then the whole
        batch descends level by level. For ``0 <= p < sum()`` this equals
        ``np.searchsorted(np.cumsum(leaves), p, side="right")``, so leaves with
        value 0 are never returned. ``p >= sum()`` (float round-off) gives the
        last non-zero leaf instead of running off the end. Negative ``p`` is
        treated as 0. A scalar argument gives an int, an array an int64 array.
        """
        p = np.maximum(np.asarray(prefixsums, dtype=np.float64), 0.0).ravel()
        idx, _ = self.find_leaves(p)
        return int(idx[0]) if np.ndim(prefixsums) == 0 else idx.reshape(np.shape(prefixsums))

    def find_leaves(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`find_prefixsum_idx` of a 1-D float64 array ``p >= 0``, with the found
        leaves' values: ``(idx, tree[idx])`` (what a prioritized sampler needs next)."""
        top = self._levels[-1]
        ends = np.cumsum(top)
        node = np.minimum(np.searchsorted(ends, p, side="right"), len(top) - 1)
        before = ends[node] - top[node]  # sum of the entries left of each node
        rest = p
        rows = np.arange(len(p))
        for children in reversed(self._children):
            rest = rest - before  # what is left of p within the chosen node
            child_values = children[node]
            running = np.cumsum(child_values, axis=1)
            # The first child whose running sum exceeds what is left; past the last
            # (only float round-off) the last child, which the zero check below catches.
            col = np.minimum(np.count_nonzero(running <= rest[:, None], axis=1),
                             _FANOUT - 1)
            if children is not self._children[0]:  # the leaves need no remainder
                before = running[rows, col] - child_values[rows, col]
            node = (node << _FANOUT_BITS) + col
        values = self._leaves[node]
        if not values.all():
            # Only float round-off (or p >= the total) ends on a zero leaf: redo those
            # with one exact search over all leaves.
            zero = values == 0
            node[zero] = self._exact_find(p[zero])
            values = self._leaves[node]
        return node, values

    def _exact_find(self, p: np.ndarray) -> np.ndarray:
        """The O(capacity) search of :meth:`find_prefixsum_idx`, for the rare ``p``
        that the tree descent cannot place exactly."""
        leaves = self._leaves[:self.capacity]
        positive = np.flatnonzero(leaves > 0)
        if positive.size == 0:
            return np.zeros(len(p), dtype=np.int64)
        found = np.searchsorted(np.cumsum(leaves), np.maximum(p, 0.0), side="right")
        return np.minimum(found, positive[-1])  # past the total: the last non-zero leaf


class MinSegmentTree(SegmentTree):
    """Min tree (empty leaves are ``+inf``).

    >>> t = MinSegmentTree(4); t[np.array([0, 2])] = [3.0, 1.5]
    >>> t.min(), t.min(0, 2)
    (1.5, 3.0)
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, np.minimum, float("inf"))

    def min(self, start: int = 0, end: int | None = None) -> float:
        """Minimum of leaves ``[start, end)``; ``min()`` over all leaves is O(1) between
        updates."""
        return self.reduce(start, end)
