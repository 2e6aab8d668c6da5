"""Replay buffers: uniform :class:`ReplayBuffer` and :class:`PrioritizedReplayBuffer`.

Both store transitions (rows of :class:`~flowrl.data.sample_batch.SampleBatch`) in
preallocated numpy columns with FIFO eviction, and return sampled rows as a new
SampleBatch. A DQN-style plan uses one in the driver process::

    buffer = PrioritizedReplayBuffer(50_000, alpha=0.6, seed=0)
    store_op = rollouts.for_each(lambda batch: (buffer.add(batch), batch)[1])
    ...
    beta = linear_schedule(timestep, 100_000, 0.4, 1.0)
    replayed = buffer.sample(32, beta=beta)        # + batch_indexes, weights
    td_error = policy.learn_on_batch(replayed)["td_error"]
    buffer.update_priorities(replayed["batch_indexes"], np.abs(td_error) + 1e-6)

and Ape-X shards them over :class:`~flowrl.replay.actor.ReplayActor` s.

Storage
-------
* Columns are whatever the first added batch has (``obs``, ``new_obs``,
  ``actions``, ``rewards``, ``terminateds``, ``truncateds``, n-step
  ``gammas``, ``eps_id``, ``t``, ...), allocated lazily at full capacity with
  the first batch's dtypes and row shapes (uint8 frames stay uint8). Later
  batches must have the same columns and row shapes (values are cast to the
  stored dtype). ``infos`` and ``batch_indexes`` (and, for the prioritized
  buffer, ``weights``) are not stored: they are per-sample outputs.
* Image-stack observations ``(H, W, k)`` (channels-last, Atari) or ``(k, H, W)``
  (channels-first, gymnasium's ``FrameStackObservation``) with ``k > 1`` go to
  :class:`~flowrl.replay.frame_storage.FrameStackStorage` (each frame stored
  once, ~1 frame per transition instead of ``2k``), chosen by
  ``frame_stack_storage``:

  - ``"auto"``: uint8 stacks whose first batch shows the sliding-window
    structure along the last row axis (``"HWC"``, tried first) or the first one
    (``"CHW"``); when both axes show it (blank frames slide along any axis),
    the layout the models would read the rows as decides (see
    :func:`~flowrl.replay.frame_storage.stack_layout`);
  - ``True``: any 4-D obs/new_obs pair of a plain dtype, exact even for
    unrelated stacks; channels-first when the rows' ``shape[0] < shape[2]``
    (the models' rule), else channels-last;
  - ``False``: plain columns.

  Nested observations (numpy records, ``dtype.names`` set) always use plain
  columns; ``True`` rejects them. ``sample`` returns stacks in the layout
  they were added in; ``stats()["frame_stack_layout"]`` and checkpoints
  record it.
* ``batch_indexes`` are *global insertion numbers*: the ``g``-th row ever
  added has index ``g`` and lives in slot ``g % capacity``. They are never
  reused, so :meth:`PrioritizedReplayBuffer.update_priorities` can tell
  (and skip) rows that were evicted after they were sampled.
* A batch is also accepted as a one-policy
  :class:`~flowrl.data.sample_batch.MultiAgentBatch` (unwrapped); use one buffer
  per policy for several policies. Buffers are not thread-safe: use them from
  one thread (or one actor).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from typing import Any

import numpy as np

from flowrl.replay.frame_storage import (
    FrameLayout,
    FrameStackStorage,
    _ring_runs,
    looks_like_frame_stacks,
    stack_layout,
)
from flowrl.replay.segment_tree import MinSegmentTree, SumSegmentTree, keep_last
from flowrl.data.sample_batch import MultiAgentBatch, SampleBatch

__all__ = ["ReplayBuffer", "PrioritizedReplayBuffer", "linear_schedule"]

_STATE_VERSION = 1
_OBS, _NEW_OBS = SampleBatch.OBS, SampleBatch.NEW_OBS


def linear_schedule(t: float, t_final: float, initial: float, final: float) -> float:
    """Linear interpolation from ``initial`` (at ``t = 0``) to ``final`` (at ``t >= t_final``).

    Used for PER beta annealing by the caller::

        beta = linear_schedule(num_steps_sampled, 2_000_000, 0.4, 1.0)
        batch = buffer.sample(512, beta=beta)

    ``t_final <= 0`` gives ``final`` at once; ``t < 0`` gives ``initial``.
    """
    if t_final <= 0:
        return float(final)
    frac = min(max(float(t) / float(t_final), 0.0), 1.0)
    return float(initial + frac * (final - initial))


def _frames_refused(obs: np.ndarray | None, new_obs: np.ndarray | None,
                    need: str) -> ValueError:
    """The error for ``frame_stack_storage=True`` on observations it cannot store."""
    got = "; ".join(f"{name}: dtype {value.dtype}, shape {list(value.shape)}"
                    for name, value in ((_OBS, obs), (_NEW_OBS, new_obs)) if value is not None)
    return ValueError(f"frame_stack_storage=True needs {need}; got {got or 'neither column'} "
                      f"(use frame_stack_storage='auto' or False)")


class _RateMeter:
    """Rows per second spent inside a call, over the last ``window`` calls."""

    def __init__(self, window: int = 100) -> None:
        self._rows: deque[int] = deque(maxlen=window)
        self._secs: deque[float] = deque(maxlen=window)

    def push(self, rows: int, seconds: float) -> None:
        self._rows.append(rows)
        self._secs.append(seconds)

    def rate(self) -> float:
        secs = sum(self._secs)
        return float(sum(self._rows) / secs) if secs > 0 else 0.0


class ReplayBuffer:
    """Uniform FIFO replay of transitions; ``sample`` draws rows with replacement.

    In a plan (DQN's store and replay branches)::

        buffer = ReplayBuffer(50_000, seed=0)
        store_op = rollouts.for_each(lambda b: (buffer.add(b), b)[1])

        def replayed(non_blocking):
            while True:
                yield buffer.sample(32) if len(buffer) >= learning_starts else NotReady

        replay_op = LocalIterator(replayed, metrics, "Replay").for_each(TrainOneStep(workers))

    ``sample(n)`` returns ``n`` rows (all stored columns, ``obs``/``new_obs``
    rebuilt from frame storage where used) plus ``batch_indexes`` (int64
    global insertion numbers). ``stats()`` and ``get_state``/``set_state``
    report and checkpoint it.
    """

    def __init__(self, capacity: int, seed: int | None = None,
                 frame_stack_storage: bool | str = "auto") -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
                or capacity < 1:
            raise ValueError(f"replay buffer capacity must be an int >= 1, got {capacity!r}")
        if frame_stack_storage not in (True, False, "auto"):
            raise ValueError(f"frame_stack_storage must be True, False or 'auto', "
                             f"got {frame_stack_storage!r}")
        self._capacity = int(capacity)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._frame_mode = frame_stack_storage
        self._columns: dict[str, np.ndarray] = {}  # plain columns (not frame-stored ones)
        self._column_order: list[str] = []
        self._frames: FrameStackStorage | None = None
        self._allocated = False
        self._head = 0  # global index of the next row == rows added so far
        self._tail = 0  # global index of the oldest live row
        self._num_sampled = 0
        self._num_evicted = 0
        self._num_early_evicted = 0
        self._add_rate = _RateMeter()
        self._sample_rate = _RateMeter()
        self._warned_early = False

    # ------------------------------------------------------------- basics
    @property
    def capacity(self) -> int:
        """Maximum number of stored transitions."""
        return self._capacity

    def __len__(self) -> int:
        """Number of transitions currently stored."""
        return self._head - self._tail

    @property
    def num_added(self) -> int:
        """Rows added so far (``stats()["num_added"]`` without building the stats)."""
        return self._head

    def __repr__(self) -> str:
        mode = (f"frame-stack {self._frames.layout}" if self._frames is not None
                else "plain")
        return f"{type(self).__name__}(size={len(self)}, capacity={self._capacity}, {mode})"

    def _dropped_columns(self) -> tuple[str, ...]:
        return (SampleBatch.INFOS, SampleBatch.BATCH_INDEXES)

    # ---------------------------------------------------------------- add
    def add(self, batch: SampleBatch) -> None:
        """Store every row of ``batch`` as one transition (oldest rows evicted first).

        ``rollouts.for_each(lambda b: (buffer.add(b), b)[1])``. A batch larger
        than the capacity keeps its last ``capacity`` rows.
        """
        self._add(batch, None)

    def _add(self, batch: SampleBatch, priorities: np.ndarray | None) -> None:
        start = time.perf_counter()
        cols = self._prepare(batch)
        n = len(next(iter(cols.values()))) if cols else 0
        if n == 0:
            return
        if priorities is not None and len(priorities) != n:
            raise ValueError(f"got {len(priorities)} priorities for {n} rows")
        if not self._allocated:
            self._allocate(cols)
        else:
            self._check_columns(cols)
        cap = self._capacity
        if n > cap:  # only the last `cap` rows can survive; count the others as evicted
            skip = n - cap
            self._evict_to(self._head)
            self._head += skip
            self._tail = self._head
            self._num_evicted += skip
            cols = {k: v[skip:] for k, v in cols.items()}
            priorities = None if priorities is None else priorities[skip:]
            n = cap

        chunk = self._frames.chunk_rows if self._frames is not None else n
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            m = b - a
            overflow = len(self) + m - cap
            if overflow > 0:
                self._evict_to(self._tail + overflow)
            if self._frames is not None:
                new_tail = self._frames.add(self._head, cols[_OBS][a:b], cols[_NEW_OBS][a:b],
                                            self._tail)
                if new_tail > self._tail:
                    self._num_early_evicted += new_tail - self._tail
                    self._evict_to(new_tail)
                    self._warn_early_eviction()
            for s, e, off in _ring_runs(self._head, m, cap):
                for name, arr in self._columns.items():
                    arr[s:e] = cols[name][a + off:a + off + (e - s)]
            self._on_rows_added(self._head, m, None if priorities is None else priorities[a:b])
            self._head += m
        self._add_rate.push(n, time.perf_counter() - start)

    def _prepare(self, batch: Any) -> dict[str, np.ndarray]:
        if isinstance(batch, MultiAgentBatch):
            if len(batch.policy_batches) != 1:
                raise TypeError(f"a replay buffer stores one policy's rows; got a MultiAgentBatch "
                                f"with policies {sorted(batch.policy_batches)} (use one buffer "
                                f"per policy)")
            batch = next(iter(batch.policy_batches.values()))
        if not isinstance(batch, SampleBatch):
            raise TypeError(f"ReplayBuffer.add expects a SampleBatch, got {type(batch).__name__}")
        if SampleBatch.SEQ_LENS in batch:
            raise ValueError("replay of RNN sequences ('seq_lens') is not supported")
        dropped = self._dropped_columns()
        return {k: v for k, v in batch.items() if k not in dropped}

    def _allocate(self, cols: dict[str, np.ndarray]) -> None:
        obs, new_obs = cols.get(_OBS), cols.get(_NEW_OBS)
        layout = self._frame_layout(obs, new_obs)
        use_frames = layout is not None
        if use_frames:
            self._frames = FrameStackStorage(self._capacity, obs.shape[1:], obs.dtype,
                                             layout=layout)
        for name, value in cols.items():
            if use_frames and name in (_OBS, _NEW_OBS):
                continue
            self._columns[name] = np.zeros((self._capacity, *value.shape[1:]), dtype=value.dtype)
        self._column_order = list(cols)
        self._allocated = True

    def _frame_layout(self, obs: np.ndarray | None,
                      new_obs: np.ndarray | None) -> FrameLayout | None:
        """The frame-stack layout the first batch's obs get, or None for plain columns."""
        mode = self._frame_mode
        if mode is False:
            return None
        if obs is None or new_obs is None:
            if mode is True:
                raise _frames_refused(obs, new_obs, "'obs' and 'new_obs' columns")
            return None
        # Records (nested obs), objects and sub-array dtypes have no frames to share.
        records = obs.dtype.names is not None or new_obs.dtype.names is not None
        plain_dtype = not (records or obs.dtype.hasobject or obs.dtype.subdtype is not None)
        pair = (plain_dtype and obs.ndim == 4 and obs.shape == new_obs.shape
                and obs.dtype == new_obs.dtype)
        if mode is True:
            if records:
                raise _frames_refused(obs, new_obs, "image stacks, not records (nested "
                                      "observations, structured dtype)")
            if not pair:
                raise _frames_refused(obs, new_obs, "'obs' and 'new_obs' of equal shape "
                                      "(N, H, W, k) or (N, k, H, W) and one plain dtype")
            return stack_layout(obs.shape[1:])
        if not pair or obs.dtype != np.uint8:
            return None
        # Channels-last first: Atari's (84, 84, 4) is decided by one test, as before.
        if obs.shape[-1] > 1 and looks_like_frame_stacks(obs, new_obs, "HWC"):
            # Blank frames slide along every axis; where the models read the rows
            # as channels-first, a channels-first match wins.
            if stack_layout(obs.shape[1:]) == "CHW" \
                    and looks_like_frame_stacks(obs, new_obs, "CHW"):
                return "CHW"
            return "HWC"
        if obs.shape[1] > 1 and looks_like_frame_stacks(obs, new_obs, "CHW"):
            return "CHW"
        return None

    def _check_columns(self, cols: dict[str, np.ndarray]) -> None:
        if set(cols) != set(self._column_order):
            missing = sorted(set(self._column_order) - set(cols))
            extra = sorted(set(cols) - set(self._column_order))
            raise ValueError(f"batch columns differ from the stored ones: missing {missing}, "
                             f"unexpected {extra}")
        for name, value in cols.items():
            if name in self._columns:
                want = self._columns[name].shape[1:]
                if value.shape[1:] != want:
                    raise ValueError(f"column {name!r} has rows of shape {value.shape[1:]}, "
                                     f"the buffer stores {want}")
            else:
                fr = self._frames
                assert fr is not None
                if value.shape[1:] != fr.stack_shape or value.dtype != fr.dtype:
                    raise ValueError(f"column {name!r} has rows {value.dtype}{value.shape[1:]}, "
                                     f"the frame storage holds {fr.dtype}{fr.stack_shape}")

    def _evict_to(self, new_tail: int) -> None:
        if new_tail > self._tail:
            self._on_evict(self._tail, new_tail)
            self._num_evicted += new_tail - self._tail
            self._tail = new_tail

    def _warn_early_eviction(self) -> None:
        # Occasional early evictions (bursts of new episodes) are harmless; warn
        # once they add up to 1% of the capacity.
        if self._warned_early or self._frames is None \
                or self._num_early_evicted < 0.01 * self._capacity:
            return
        self._warned_early = True
        fpt = self._frames.num_frames_pushed / max(self._head, 1)
        warnings.warn(
            f"{type(self).__name__}: frame-stack storage had to evict transitions before the "
            f"buffer was full ({fpt:.2f} frames stored per transition). The observations "
            f"share fewer frames than stacked Atari frames do; pass "
            f"frame_stack_storage=False to keep `capacity` transitions.", stacklevel=4)

    # Hooks for the prioritized buffer.
    def _on_rows_added(self, head: int, n: int, priorities: np.ndarray | None) -> None:
        """Uniform replay keeps no per-row state; the prioritized buffer sets priorities."""

    def _on_evict(self, lo: int, hi: int) -> None:
        """Uniform replay keeps no per-row state; the prioritized buffer clears priorities."""

    # ------------------------------------------------------------- sample
    def sample(self, num_items: int) -> SampleBatch:
        """``num_items`` rows drawn uniformly with replacement, plus ``batch_indexes``.

        ``batch = buffer.sample(32); policy.learn_on_batch(batch)``.
        """
        start = time.perf_counter()
        self._check_sample_args(num_items)
        idx = self._tail + self._rng.integers(0, len(self), size=num_items)
        out = self._gather(idx)
        self._num_sampled += num_items
        self._sample_rate.push(num_items, time.perf_counter() - start)
        return out

    def _check_sample_args(self, num_items: int) -> None:
        if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) \
                or num_items < 0:
            raise ValueError(f"num_items must be an int >= 0, got {num_items!r}")
        if len(self) == 0:
            raise ValueError(f"cannot sample from an empty {type(self).__name__}")

    def _slot_to_global(self, slots: np.ndarray) -> np.ndarray:
        return self._tail + (slots - self._tail) % self._capacity

    def _gather(self, global_idx: np.ndarray,
                extra: dict[str, np.ndarray] | None = None) -> SampleBatch:
        """The rows ``global_idx`` with ``batch_indexes`` and the ``extra`` per-row
        columns (e.g. PER weights) appended."""
        global_idx = np.asarray(global_idx, dtype=np.int64)
        slots = global_idx % self._capacity
        frames: tuple[np.ndarray, np.ndarray] | None = None
        if self._frames is not None:
            frames = self._frames.get(slots)
        out: dict[str, np.ndarray] = {}
        for name in self._column_order:
            if frames is not None and name == _OBS:
                out[name] = frames[0]
            elif frames is not None and name == _NEW_OBS:
                out[name] = frames[1]
            else:
                out[name] = self._columns[name][slots]
        out[SampleBatch.BATCH_INDEXES] = global_idx
        if extra:
            out.update(extra)
        return SampleBatch.from_arrays(out)  # one row per global_idx in every column

    # -------------------------------------------------------------- stats
    def _extra_nbytes(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        """Size, memory and throughput counters (plain numbers)::

            {"size", "capacity", "size_bytes", "bytes_per_transition", "num_added",
             "num_sampled", "num_evicted", "add_throughput", "sample_throughput",
             "frame_stack_storage", ...}

        ``size_bytes`` counts every numpy array the buffer holds (allocated at
        full capacity on the first add); ``bytes_per_transition`` is that per
        capacity slot. Throughputs are rows per second spent in ``add`` /
        ``sample`` over the last 100 calls. With frame storage also
        ``frames_per_transition`` (distinct frames stored per added row) and
        ``num_early_evicted`` (rows evicted to free frames before the buffer
        was full), ``frame_ring_size`` (frame slots held) and
        ``frame_stack_layout`` (``"HWC"`` or ``"CHW"``).
        """
        size_bytes = sum(int(a.nbytes) for a in self._columns.values()) + self._extra_nbytes()
        if self._frames is not None:
            size_bytes += self._frames.nbytes()
        out: dict[str, Any] = {
            "size": len(self),
            "capacity": self._capacity,
            "size_bytes": int(size_bytes),
            "bytes_per_transition": float(size_bytes / self._capacity),
            "num_added": self._head,
            "num_sampled": self._num_sampled,
            "num_evicted": self._num_evicted,
            "add_throughput": self._add_rate.rate(),
            "sample_throughput": self._sample_rate.rate(),
            "frame_stack_storage": self._frames is not None,
        }
        if self._frames is not None:
            out["frames_per_transition"] = float(self._frames.num_frames_pushed
                                                 / max(self._head, 1))
            out["num_early_evicted"] = self._num_early_evicted
            out["frame_ring_size"] = self._frames.num_frames
            out["frame_stack_layout"] = self._frames.layout
        return out

    # -------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """Contents and counters as numpy arrays and plain containers (for checkpoints).

        ``state = buffer.get_state(); ...; ReplayBuffer(cap).set_state(state)``.
        Only live rows are included; frame-stored observations stay compressed.
        """
        slots = np.arange(self._tail, self._head) % self._capacity
        return {
            "version": _STATE_VERSION,
            "kind": type(self).__name__,
            "capacity": self._capacity,
            "num_added": self._head,
            "tail": self._tail,
            "num_sampled": self._num_sampled,
            "num_evicted": self._num_evicted,
            "num_early_evicted": self._num_early_evicted,
            "rng_state": self._rng.bit_generator.state,
            "allocated": self._allocated,
            "column_order": list(self._column_order),
            "columns": {k: v[slots] for k, v in self._columns.items()},
            "frames": (self._frames.get_state(self._tail, self._head)
                       if self._frames is not None else None),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` output (same capacity; the stored layout is kept)."""
        if int(state.get("version", -1)) != _STATE_VERSION:
            raise ValueError(f"replay buffer state version {state.get('version')!r} is not "
                             f"supported (expected {_STATE_VERSION})")
        if int(state["capacity"]) != self._capacity:
            raise ValueError(f"replay buffer state has capacity {state['capacity']}, this "
                             f"buffer {self._capacity}")
        self._head = int(state["num_added"])
        self._tail = int(state["tail"])
        self._num_sampled = int(state["num_sampled"])
        self._num_evicted = int(state["num_evicted"])
        self._num_early_evicted = int(state.get("num_early_evicted", 0))
        self._rng.bit_generator.state = state["rng_state"]
        self._allocated = bool(state["allocated"])
        self._column_order = list(state["column_order"])
        self._columns = {}
        self._frames = None
        slots = np.arange(self._tail, self._head) % self._capacity
        for name, live in state["columns"].items():
            live = np.asarray(live)
            arr = np.zeros((self._capacity, *live.shape[1:]), dtype=live.dtype)
            arr[slots] = live
            self._columns[name] = arr
        fstate = state.get("frames")
        if fstate is not None:
            # States written before channels-first support have no layout: HWC.
            self._frames = FrameStackStorage(self._capacity, tuple(fstate["stack_shape"]),
                                             np.dtype(fstate["dtype"]),
                                             layout=fstate.get("layout", "HWC"))
            self._frames.set_state(fstate, self._tail, self._head)


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay (Schaul et al. 2016) over a sum tree.

    Row ``i`` is sampled with probability ``P(i) = p_i^alpha / sum_j p_j^alpha``;
    new rows get the largest priority seen so far (1.0 at first). ``sample``
    adds ``weights`` = ``(N P(i))^-beta / max_j (N P(j))^-beta`` (normalised by
    the largest weight over the whole buffer, i.e. the one of the smallest
    priority) and ``batch_indexes``. In a plan::

        batch = buffer.sample(32, beta=linear_schedule(t, 100_000, 0.4, 1.0))
        td = policy.learn_on_batch(batch)["td_error"]
        buffer.update_priorities(batch["batch_indexes"], np.abs(td) + 1e-6)

    Priorities for rows evicted (and possibly replaced) since they were
    sampled are ignored: a stale TD error says nothing about the new row in
    that slot (counted in ``stats()["num_stale_priority_updates"]``).
    """

    def __init__(self, capacity: int, alpha: float = 0.6, beta: float = 0.4,
                 eps: float = 1e-6, seed: int | None = None,
                 frame_stack_storage: bool | str = "auto") -> None:
        super().__init__(capacity, seed=seed, frame_stack_storage=frame_stack_storage)
        for name, value in (("alpha", alpha), ("beta", beta), ("eps", eps)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.eps = float(eps)
        self._sum_tree = SumSegmentTree(self._capacity)
        self._min_tree = MinSegmentTree(self._capacity)
        self._priorities = np.zeros(self._capacity, dtype=np.float64)
        self._max_priority = 1.0
        self._num_stale = 0

    def _dropped_columns(self) -> tuple[str, ...]:
        return (*super()._dropped_columns(), SampleBatch.WEIGHTS)

    # ---------------------------------------------------------------- add
    def add(self, batch: SampleBatch, priorities: np.ndarray | None = None) -> None:
        """Store the rows; priorities default to the max priority seen so far.

        ``priorities`` (one per row, finite and > 0) sets them explicitly, e.g.
        TD errors computed on the rollout worker (Ape-X worker-side
        prioritization): ``buffer.add(batch, np.abs(batch["td_error"]) + eps)``.
        """
        if priorities is not None:
            priorities = self._validate_priorities(priorities, None)
        self._add(batch, priorities)

    def _set_slots(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Priorities of distinct int64 ``slots`` (validated: finite, > 0)."""
        self._priorities[slots] = priorities
        scaled = priorities ** self.alpha
        # Finite priorities stay finite under alpha <= 1; a larger alpha may overflow.
        if self.alpha > 1 and not scaled.max() < np.inf:
            raise ValueError(f"priority ** alpha overflows: max priority {priorities.max()!r}, "
                             f"alpha {self.alpha}")
        # The trees' unchecked path: the slots and values are checked once, here.
        self._sum_tree.assign(slots, scaled)
        self._min_tree.assign(slots, scaled)

    def _on_rows_added(self, head: int, n: int, priorities: np.ndarray | None) -> None:
        slots = (head + np.arange(n)) % self._capacity
        if priorities is None:
            priorities = np.full(n, self._max_priority)
        else:
            self._max_priority = max(self._max_priority, float(priorities.max()))
        self._set_slots(slots, priorities)

    def _on_evict(self, lo: int, hi: int) -> None:
        slots = np.arange(lo, hi) % self._capacity  # hi - lo <= capacity: distinct
        self._priorities[slots] = 0.0
        self._sum_tree.assign(slots, np.zeros(len(slots)))
        self._min_tree.assign(slots, np.full(len(slots), np.inf))

    # ------------------------------------------------------------- sample
    def sample(self, num_items: int, beta: float | None = None) -> SampleBatch:
        """``num_items`` rows drawn in proportion to ``priority^alpha``, with replacement.

        Adds ``batch_indexes`` (int64) and ``weights`` (float32 importance
        weights, max 1). ``beta`` defaults to the constructor's; anneal it by
        passing ``beta=linear_schedule(...)``.
        """
        start = time.perf_counter()
        self._check_sample_args(num_items)
        beta = self.beta if beta is None else float(beta)
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
        total = self._sum_tree.sum()
        slots, scaled = self._sum_tree.find_leaves(self._rng.random(num_items) * total)
        prob = scaled / total
        prob_min = self._min_tree.min() / total
        # (N P)^-beta / (N P_min)^-beta == (P / P_min)^-beta
        weights = ((prob / prob_min) ** (-beta)).astype(np.float32)
        out = self._gather(self._slot_to_global(slots), {SampleBatch.WEIGHTS: weights})
        self._num_sampled += num_items
        self._sample_rate.push(num_items, time.perf_counter() - start)
        return out

    # --------------------------------------------------------- priorities
    def _validate_priorities(self, priorities: Any, indexes: np.ndarray | None) -> np.ndarray:
        p = np.asarray(priorities, dtype=np.float64).ravel()
        # min > 0 and max < inf are both False for NaN: two reductions check it all.
        if p.size == 0 or (p.min() > 0 and p.max() < np.inf):
            return p
        bad = np.flatnonzero(~(np.isfinite(p) & (p > 0)))
        if bad.size:
            i = int(bad[0])
            where = f" (row index {int(indexes[i])})" if indexes is not None else ""
            raise ValueError(f"priorities must be finite and > 0; got {p[i]!r} at position "
                             f"{i}{where} ({bad.size} bad value(s) in total)")
        return p

    def update_priorities(self, indexes: np.ndarray, priorities: np.ndarray) -> None:
        """Set new priorities (``|td_error| + eps`` style, finite and > 0) for sampled rows.

        ``indexes`` are the ``batch_indexes`` of a sampled batch. Rows that
        were evicted since sampling are skipped; with repeated indexes the
        last value wins. A non-finite or non-positive priority raises
        ``ValueError`` naming it, and nothing is updated.
        """
        idx = np.asarray(indexes)
        if idx.dtype.kind not in "iu":
            raise ValueError(f"indexes must be integers (batch_indexes), got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).ravel()
        if len(idx) != np.size(priorities):
            raise ValueError(f"got {len(idx)} indexes but {np.size(priorities)} priorities")
        p = self._validate_priorities(priorities, idx)
        if idx.size == 0:
            return
        lowest = idx.min()
        if lowest < 0 or idx.max() >= self._head:
            bad = idx[(idx < 0) | (idx >= self._head)][0]
            raise ValueError(f"index {int(bad)} was never handed out by this buffer "
                             f"({self._head} rows added so far)")
        if lowest < self._tail:  # some rows were evicted since they were sampled
            live = idx >= self._tail
            self._num_stale += int(idx.size - live.sum())
            idx, p = idx[live], p[live]
            if idx.size == 0:
                return
        # Live indexes lie within one capacity, so distinct indexes are distinct slots.
        slots, unique_p = keep_last(idx % self._capacity, p)
        self._set_slots(slots, unique_p)
        self._max_priority = max(self._max_priority, float(p.max()))

    def update_td_errors(self, indexes: np.ndarray, td_errors: np.ndarray) -> None:
        """``update_priorities(indexes, |td_errors| + eps)`` with this buffer's ``eps``."""
        td = np.asarray(td_errors, dtype=np.float64)
        self.update_priorities(indexes, np.abs(td) + self.eps)

    # -------------------------------------------------------- stats/state
    def _extra_nbytes(self) -> int:
        return int(self._sum_tree.nbytes + self._min_tree.nbytes
                   + self._priorities.nbytes)

    def stats(self) -> dict[str, Any]:
        """Base stats plus ``alpha``, ``beta``, ``max_priority``, ``num_stale_priority_updates``."""
        out = super().stats()
        out.update(alpha=self.alpha, beta=self.beta, max_priority=self._max_priority,
                   num_stale_priority_updates=self._num_stale)
        return out

    def get_state(self) -> dict[str, Any]:
        """Base state plus the live rows' priorities and the max priority."""
        state = super().get_state()
        slots = np.arange(self._tail, self._head) % self._capacity
        state["priorities"] = self._priorities[slots]
        state["max_priority"] = self._max_priority
        state["num_stale_priority_updates"] = self._num_stale
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore; a uniform buffer's state gets priority 1.0 for every row."""
        super().set_state(state)
        self._max_priority = float(state.get("max_priority", 1.0))
        self._num_stale = int(state.get("num_stale_priority_updates", 0))
        self._sum_tree = SumSegmentTree(self._capacity)
        self._min_tree = MinSegmentTree(self._capacity)
        self._priorities = np.zeros(self._capacity, dtype=np.float64)
        slots = np.arange(self._tail, self._head) % self._capacity
        prios = state.get("priorities")
        if prios is None:
            prios = np.full(len(slots), self._max_priority)
        if len(slots):
            self._set_slots(slots, np.asarray(prios, dtype=np.float64))
