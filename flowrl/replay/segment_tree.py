"""Array-backed segment trees with vectorised updates and prefix-sum search.

Prioritized replay keeps one :class:`SumSegmentTree` (to sample slots in
proportion to their priority) and one :class:`MinSegmentTree` (for the
importance-weight normaliser) over the buffer's slots::

    sums, mins = SumSegmentTree(capacity), MinSegmentTree(capacity)
    sums[slots] = priorities ** alpha          # one vectorised update per batch
    mins[slots] = priorities ** alpha
    u = rng.random(32) * sums.sum()
    sampled = sums.find_prefixsum_idx(u)       # 32 slots, no per-sample Python loop
    p_min = mins.min() / sums.sum()

The tree is stored as one flat array of ``2 * size`` nodes (``size`` = capacity
rounded up to a power of two); node ``i`` has children ``2i`` and ``2i + 1``,
leaves start at ``size``. Parents are always recomputed from their children (not
updated by deltas), so float sums do not drift however many updates happen.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["SegmentTree", "SumSegmentTree", "MinSegmentTree"]


class SegmentTree:
    """A segment tree over ``capacity`` float leaves with an associative ``operation``.

    Use the concrete :class:`SumSegmentTree` / :class:`MinSegmentTree`.
    """

    def __init__(self, capacity: int, operation: Callable[..., Any], neutral: float) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or capacity < 1:
            raise ValueError(f"segment tree capacity must be an int >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        size = 1
        while size < self.capacity:
            size *= 2
        self._size = size  # number of leaves (power of two)
        self._depth = size.bit_length() - 1  # levels between root and leaves
        self._op = operation
        self._neutral = float(neutral)
        self._tree = np.full(2 * size, self._neutral, dtype=np.float64)

    # ------------------------------------------------------------ indexing
    def _check_idx(self, idx: np.ndarray) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity):
            bad = idx[(idx < 0) | (idx >= self.capacity)][0]
            raise IndexError(f"segment tree index {int(bad)} out of range [0, {self.capacity})")

    def _check_values(self, values: np.ndarray) -> None:
        """Hook for subclasses (the sum tree rejects negative values)."""

    def __setitem__(self, idx: int | np.ndarray, value: float | np.ndarray) -> None:
        """Set one leaf or many at once: ``tree[np.array([3, 5])] = [0.5, 2.0]``.

        With repeated indexes the last value wins. Each tree level is then
        recomputed with one numpy operation over the touched parents.
        """
        idx_arr = np.asarray(idx)
        if idx_arr.dtype.kind not in "iu":
            raise TypeError(f"segment tree indexes must be integers, got dtype {idx_arr.dtype}")
        idx_arr = idx_arr.astype(np.int64, copy=False).ravel()
        values = np.broadcast_to(np.asarray(value, dtype=np.float64),
                                 np.asarray(idx).shape).ravel()
        self._check_idx(idx_arr)
        self._check_values(values)
        if idx_arr.size == 0:
            return
        if idx_arr.size > 1:
            # Keep the last occurrence of each index (numpy leaves duplicate
            # fancy-assignment order unspecified).
            rev_unique, rev_first = np.unique(idx_arr[::-1], return_index=True)
            values = values[::-1][rev_first]
            idx_arr = rev_unique
        pos = idx_arr + self._size
        tree = self._tree
        tree[pos] = values
        for _ in range(self._depth):
            pos = np.unique(pos >> 1)
            tree[pos] = self._op(tree[2 * pos], tree[2 * pos + 1])

    def __getitem__(self, idx: int | np.ndarray) -> Any:
        """Leaf value(s): ``tree[3]`` -> float, ``tree[idx_array]`` -> array."""
        idx_arr = np.asarray(idx)
        if idx_arr.dtype.kind not in "iu":
            raise TypeError(f"segment tree indexes must be integers, got dtype {idx_arr.dtype}")
        self._check_idx(idx_arr.ravel())
        out = self._tree[idx_arr.astype(np.int64) + self._size]
        return float(out) if out.ndim == 0 else out

    # ---------------------------------------------------------- reductions
    def reduce(self, start: int = 0, end: int | None = None) -> float:
        """``operation`` over leaves ``[start, end)`` (``end`` defaults to capacity)."""
        if end is None:
            end = self.capacity
        if not 0 <= start <= end <= self.capacity:
            raise IndexError(f"segment tree range [{start}, {end}) is not within "
                             f"[0, {self.capacity}]")
        if start == 0 and end >= self.capacity:
            return float(self._tree[1])  # the root (padding leaves are neutral)
        result = self._neutral
        lo, hi = start + self._size, end + self._size
        tree, op = self._tree, self._op
        while lo < hi:
            if lo & 1:
                result = op(result, tree[lo])
                lo += 1
            if hi & 1:
                hi -= 1
                result = op(result, tree[hi])
            lo >>= 1
            hi >>= 1
        return float(result)

    def values(self) -> np.ndarray:
        """A copy of all ``capacity`` leaf values."""
        return self._tree[self._size:self._size + self.capacity].copy()


class SumSegmentTree(SegmentTree):
    """Sum tree: range sums and vectorised prefix-sum search (values must be >= 0).

    >>> t = SumSegmentTree(4); t[np.arange(4)] = [1.0, 0.0, 2.0, 1.0]
    >>> t.sum(), t.sum(1, 3), t.find_prefixsum_idx(np.array([0.5, 1.0, 3.5]))
    (4.0, 2.0, array([0, 2, 3]))
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, np.add, 0.0)

    def _check_values(self, values: np.ndarray) -> None:
        if values.size and not (np.all(values >= 0) and np.all(np.isfinite(values))):
            bad = values[~((values >= 0) & np.isfinite(values))][0]
            raise ValueError(f"SumSegmentTree values must be finite and >= 0, got {bad!r}")

    def sum(self, start: int = 0, end: int | None = None) -> float:
        """Sum of leaves ``[start, end)``; ``sum()`` is the total (O(1))."""
        return self.reduce(start, end)

    def find_prefixsum_idx(self, prefixsums: float | np.ndarray) -> Any:
        """For each ``p``, the smallest leaf ``i`` with ``sum(0, i + 1) > p``.

        Vectorised: the whole batch descends the tree together, one numpy step
        per level. For ``0 <= p < sum()`` this equals
        ``np.searchsorted(np.cumsum(leaves), p, side="right")``, so leaves with
        value 0 are never returned. ``p >= sum()`` (float round-off) gives the
        last non-zero leaf instead of running off the end. Negative ``p`` is
        treated as 0. A scalar argument gives an int, an array an int64 array.
        """
        scalar = np.ndim(prefixsums) == 0
        p = np.maximum(np.asarray(prefixsums, dtype=np.float64), 0.0).copy()
        idx = np.ones(p.shape, dtype=np.int64)
        tree = self._tree
        for _ in range(self._depth):
            left = idx * 2
            left_sum = tree[left]
            # Never step into an empty right subtree: with p past the total by
            # round-off we stay left and end on the last non-empty leaf.
            go_right = (p >= left_sum) & (tree[left + 1] > 0)
            p = np.where(go_right, p - left_sum, p)
            idx = left + go_right
        out = idx - self._size
        return int(out) if scalar else out


class MinSegmentTree(SegmentTree):
    """Min tree (empty leaves are ``+inf``).

    >>> t = MinSegmentTree(4); t[np.array([0, 2])] = [3.0, 1.5]
    >>> t.min(), t.min(0, 2)
    (1.5, 3.0)
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, np.minimum, float("inf"))

    def min(self, start: int = 0, end: int | None = None) -> float:
        """Minimum of leaves ``[start, end)``; ``min()`` over all leaves is O(1)."""
        return self.reduce(start, end)
