"""Columnar experience batches: :class:`SampleBatch` and :class:`MultiAgentBatch`.

A :class:`SampleBatch` is a ``dict`` of equal-length numpy columns (one row per
environment step). It is the unit that rollout workers produce, operators pass
around, and policies learn on. Batches travel between Ray actors as plain numpy
arrays, so readers on the same node get zero-copy views.

Conventions
-----------
* Every column has the same length (``count``). The one exception is
  ``seq_lens`` (RNN sequence lengths), which has one entry per sequence and must
  sum to ``count``.
* ``len(batch)`` is the number of rows (like ``count``), not the number of
  columns; iterate ``batch.keys()`` for the columns.
* Slicing (``batch[10:20]``, ``batch.slice(10, 20)``) returns views, not copies.
* ``shuffle()`` permutes the rows in place and returns ``self``;
  ``minibatches()`` never mutates the batch.
* ``terminateds`` vs ``truncateds`` matters: the value of ``new_obs`` is
  bootstrapped on truncation, never on termination (see
  :func:`flowrl.policies.postprocessing.compute_advantages`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

DEFAULT_POLICY_ID = "default_policy"

__all__ = ["DEFAULT_POLICY_ID", "SampleBatch", "MultiAgentBatch", "minibatch_bounds"]


def minibatch_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """Split ``range(count)`` into contiguous ``(start, end)`` minibatch bounds.

    Every row lands in exactly one minibatch. A remainder smaller than half of
    ``size`` is merged into the previous minibatch (a tiny minibatch would make
    one noisy, over-weighted SGD step); a larger remainder is its own minibatch.
    ``size <= 0`` or ``size >= count`` gives one minibatch with everything.

    >>> minibatch_bounds(9, 4)
    [(0, 4), (4, 9)]
    >>> minibatch_bounds(11, 4)
    [(0, 4), (4, 8), (8, 11)]
    """
    if count <= 0:
        return []
    if size <= 0 or size >= count:
        return [(0, count)]
    starts = list(range(0, count, size))
    bounds = [(s, min(s + size, count)) for s in starts]
    last_start, last_end = bounds[-1]
    if len(bounds) > 1 and (last_end - last_start) * 2 < size:
        bounds.pop()
        prev_start, _ = bounds.pop()
        bounds.append((prev_start, count))
    return bounds


def _as_column(key: str, value: Any) -> np.ndarray:
    """Turn one column value into a numpy array (lists of dicts -> object array)."""
    if isinstance(value, np.ndarray):
        arr = value
    elif key == SampleBatch.INFOS or (
        isinstance(value, (list, tuple)) and value and isinstance(value[0], dict)
    ):
        # np.asarray would try to broadcast nested structures; build a 1-D object array.
        arr = np.empty(len(value), dtype=object)
        for i, item in enumerate(value):
            arr[i] = item
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        arr = value.detach().cpu().numpy()
    else:
        arr = np.asarray(value)
    if arr.ndim == 0:
        raise ValueError(f"column {key!r} must be a sequence (one entry per row), got a scalar")
    return arr


class SampleBatch(dict):
    """A dict of equal-length numpy columns, one row per step.

    >>> b = SampleBatch(obs=[[0.0], [1.0], [2.0]], rewards=[1.0, 0.0, 1.0])
    >>> b.count, b["obs"].shape
    (3, (3, 1))
    >>> b[1:].count
    2
    """

    OBS = "obs"
    NEW_OBS = "new_obs"
    ACTIONS = "actions"
    REWARDS = "rewards"
    TERMINATEDS = "terminateds"
    TRUNCATEDS = "truncateds"
    INFOS = "infos"
    EPS_ID = "eps_id"
    UNROLL_ID = "unroll_id"
    AGENT_INDEX = "agent_index"
    T = "t"
    ACTION_LOGP = "action_logp"
    ACTION_DIST_INPUTS = "action_dist_inputs"
    VF_PREDS = "vf_preds"
    ADVANTAGES = "advantages"
    VALUE_TARGETS = "value_targets"
    WEIGHTS = "weights"
    BATCH_INDEXES = "batch_indexes"
    SEQ_LENS = "seq_lens"

    def __init__(self, *args: Mapping[str, Any] | Iterable, **kwargs: Any) -> None:
        super().__init__()
        raw = dict(*args, **kwargs)
        for key, value in raw.items():
            dict.__setitem__(self, key, _as_column(key, value))
        lengths = self._row_lengths()
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
            raise ValueError(f"SampleBatch columns must have equal lengths, got: {detail}")
        self._check_seq_lens()

    @classmethod
    def from_arrays(cls, columns: Mapping[str, np.ndarray]) -> SampleBatch:
        """A batch of numpy columns that are known to be valid (equal lengths, no
        ``seq_lens``), taken as they are: no conversion and no checks.

            piece = SampleBatch.from_arrays({k: v[start:end] for k, v in columns.items()})

        For hot paths that build the columns themselves (the sampler's episode pieces,
        replayed rows), where the checks of ``SampleBatch(columns)`` cost more than
        the work (a DQN round builds several batches of 4 or 32 rows).
        """
        out = cls.__new__(cls)  # an empty dict; __init__ would only check it
        dict.update(out, columns)
        return out

    # ----------------------------------------------------------------- basics
    def _row_lengths(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.items() if k != self.SEQ_LENS}

    def _check_seq_lens(self) -> None:
        seq_lens = dict.get(self, self.SEQ_LENS)
        if seq_lens is not None and self._row_lengths():
            total = int(np.sum(seq_lens))
            if total != self.count:
                raise ValueError(
                    f"SampleBatch 'seq_lens' sums to {total} but the batch has {self.count} rows"
                )

    @property
    def count(self) -> int:
        """Number of rows (steps) in the batch."""
        for key, value in self.items():
            if key != self.SEQ_LENS:
                return len(value)
        return 0

    def __len__(self) -> int:
        """Number of rows, like ``count`` (use ``len(batch.keys())`` for columns)."""
        return self.count

    def agent_steps(self) -> int:
        """Number of agent steps (== ``count`` for a single-agent batch)."""
        return self.count

    def __getitem__(self, key: str | slice) -> Any:
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise ValueError("SampleBatch slicing supports step 1 only")
            start, end, _ = key.indices(self.count)
            return self.slice(start, end)
        return dict.__getitem__(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        arr = _as_column(key, value)
        if key != self.SEQ_LENS:
            others = [(k, len(v)) for k, v in self.items() if k not in (key, self.SEQ_LENS)]
            if others and len(arr) != others[0][1]:
                raise ValueError(
                    f"column {key!r} has length {len(arr)} but the batch has "
                    f"{others[0][1]} rows (e.g. column {others[0][0]!r})"
                )
        dict.__setitem__(self, key, arr)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Like ``dict.update`` but with the same length checks as item assignment."""
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        """Like ``dict.setdefault`` but with the same length checks as item assignment."""
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def copy(self) -> SampleBatch:
        """A deep copy of the columns (object columns are copied one level deep)."""
        out = SampleBatch()
        for key, value in self.items():
            dict.__setitem__(out, key, value.copy())
        return out

    def __repr__(self) -> str:
        cols = ", ".join(
            f"{k}: {v.dtype}{list(v.shape)}" if isinstance(v, np.ndarray) else k
            for k, v in self.items()
        )
        return f"SampleBatch(count={self.count}, {cols})"

    def size_bytes(self) -> int:
        """Approximate memory used by the columns (object columns add each element)."""
        total = 0
        for value in self.values():
            total += value.nbytes
            if value.dtype == object:
                total += sum(sys.getsizeof(item) for item in value.ravel())
        return total

    # ------------------------------------------------------------- combining
    @staticmethod
    def concat_samples(batches: list[SampleBatch] | list[MultiAgentBatch]) -> Any:
        """Concatenate batches row-wise.

        A list of :class:`MultiAgentBatch` gives a :class:`MultiAgentBatch`
        (per-policy concatenation, env steps summed). Empty batches are skipped;
        the remaining ones must have the same columns.
        """
        batches = list(batches)
        if any(isinstance(b, MultiAgentBatch) for b in batches):
            return MultiAgentBatch.concat_samples(batches)
        non_empty = [b for b in batches if b.count > 0]
        if not non_empty:
            return SampleBatch()
        keys = list(non_empty[0].keys())
        for b in non_empty[1:]:
            if set(b.keys()) != set(keys):
                missing = set(keys) ^ set(b.keys())
                raise ValueError(
                    f"cannot concat SampleBatches with different columns; differing: {sorted(missing)}"
                )
        out = SampleBatch()
        column = dict.__getitem__  # skips SampleBatch.__getitem__'s slice check per column
        for key in keys:
            dict.__setitem__(out, key, np.concatenate([column(b, key) for b in non_empty]))
        return out

    def concat(self, other: SampleBatch) -> SampleBatch:
        """A new batch with ``other``'s rows appended after this batch's rows."""
        return SampleBatch.concat_samples([self, other])

    def slice(self, start: int, end: int) -> SampleBatch:
        """Rows ``start:end`` as a new batch of views.

        With ``seq_lens`` present, ``start`` and ``end`` must fall on sequence
        boundaries (a sequence can't be cut in half).
        """
        out = SampleBatch()
        for key, value in self.items():
            if key != self.SEQ_LENS:
                dict.__setitem__(out, key, value[start:end])
        seq_lens = dict.get(self, self.SEQ_LENS)
        if seq_lens is not None:
            bounds = np.concatenate([[0], np.cumsum(seq_lens)])
            i, j = np.searchsorted(bounds, [start, end])
            if i >= len(bounds) or j >= len(bounds) or bounds[i] != start or bounds[j] != end:
                raise ValueError(
                    f"slice [{start}:{end}] does not fall on seq_lens boundaries {bounds.tolist()}"
                )
            dict.__setitem__(out, self.SEQ_LENS, seq_lens[i:j])
        return out

    def _take(self, indices: np.ndarray) -> SampleBatch:
        """Rows at ``indices`` (copies, via fancy indexing)."""
        out = SampleBatch()
        for key, value in self.items():
            dict.__setitem__(out, key, value[indices])
        return out

    def _require_no_seq_lens(self, what: str) -> None:
        if self.SEQ_LENS in self:
            raise ValueError(f"cannot {what} a SampleBatch with 'seq_lens' (it would cut sequences)")

    def shuffle(self, seed: int | None = None) -> SampleBatch:
        """Permute the rows of all columns with one permutation, in place; returns self."""
        self._require_no_seq_lens("shuffle")
        perm = np.random.default_rng(seed).permutation(self.count)
        for key, value in list(self.items()):
            dict.__setitem__(self, key, value[perm])
        return self

    def minibatches(
        self, size: int, shuffle: bool = True, seed: int | None = None
    ) -> Iterator[SampleBatch]:
        """Yield minibatches of about ``size`` rows covering every row once.

        The remainder rule is :func:`minibatch_bounds`: a last piece smaller than
        ``size / 2`` is merged into the previous minibatch, so minibatches hold
        between ``size`` and ``1.5 * size`` rows except when the whole batch is
        smaller than ``size``. The batch itself is not modified; with
        ``shuffle=False`` minibatches are views.
        """
        bounds = minibatch_bounds(self.count, size)
        if not shuffle:
            for start, end in bounds:
                yield self.slice(start, end)
            return
        self._require_no_seq_lens("shuffle")
        perm = np.random.default_rng(seed).permutation(self.count)
        for start, end in bounds:
            yield self._take(perm[start:end])

    def split_by_episode(self) -> list[SampleBatch]:
        """Split into contiguous runs of equal ``eps_id`` (views, in order)."""
        if self.count == 0:
            return []
        if self.EPS_ID not in self:
            raise ValueError("split_by_episode needs an 'eps_id' column")
        eps_ids = self[self.EPS_ID]
        cuts = np.flatnonzero(eps_ids[1:] != eps_ids[:-1]) + 1
        edges = [0, *cuts.tolist(), self.count]
        return [self.slice(s, e) for s, e in zip(edges[:-1], edges[1:])]

    def as_multi_agent(self, policy_id: str = DEFAULT_POLICY_ID) -> MultiAgentBatch:
        """Wrap as a one-policy :class:`MultiAgentBatch` (env steps = ``count``)."""
        return MultiAgentBatch({policy_id: self}, self.count)

    # Keep pickling independent of __init__ (Ray ships batches between actors).
    def __reduce__(self) -> tuple:
        return (SampleBatch, (dict(self),))


class MultiAgentBatch:
    """Per-policy :class:`SampleBatch` es plus the number of env steps they came from.

    ``count`` is the number of environment steps (``env_steps``); ``agent_steps()``
    is the total number of rows over all policies (several agents may act in
    one env step).
    """

    def __init__(self, policy_batches: dict[str, SampleBatch], env_steps: int) -> None:
        self.policy_batches: dict[str, SampleBatch] = dict(policy_batches)
        self.env_steps: int = int(env_steps)

    @property
    def count(self) -> int:
        """Environment steps (same as ``env_steps``)."""
        return self.env_steps

    def agent_steps(self) -> int:
        """Total rows over all policy batches."""
        return sum(b.count for b in self.policy_batches.values())

    @staticmethod
    def concat_samples(batches: list[MultiAgentBatch] | list[SampleBatch]) -> MultiAgentBatch:
        """Concatenate per policy id; env steps add up.

        Plain :class:`SampleBatch` entries are treated as the default policy's.
        """
        per_policy: dict[str, list[SampleBatch]] = {}
        env_steps = 0
        for b in batches:
            if isinstance(b, SampleBatch):
                b = b.as_multi_agent()
            for pid, pb in b.policy_batches.items():
                per_policy.setdefault(pid, []).append(pb)
            env_steps += b.env_steps
        return MultiAgentBatch(
            {pid: SampleBatch.concat_samples(pbs) for pid, pbs in per_policy.items()},
            env_steps,
        )

    def copy(self) -> MultiAgentBatch:
        """Deep copy of every policy batch."""
        return MultiAgentBatch({k: v.copy() for k, v in self.policy_batches.items()}, self.env_steps)

    def size_bytes(self) -> int:
        """Sum of the policy batches' sizes."""
        return sum(b.size_bytes() for b in self.policy_batches.values())

    def as_multi_agent(self) -> MultiAgentBatch:
        """Return self (lets callers treat both batch kinds alike)."""
        return self

    def __repr__(self) -> str:
        inner = ", ".join(f"{pid}: {b.count}" for pid, b in self.policy_batches.items())
        return f"MultiAgentBatch(env_steps={self.env_steps}, {{{inner}}})"
