"""Frame-stack storage: every distinct frame of ``obs`` / ``new_obs`` stacks is stored once.

Atari observations are stacks of the last ``k`` frames, shape ``(H, W, k)``
uint8 (channels-last, ``"HWC"``) as flowrl's Atari wrappers make them, or
``(k, H, W)`` (channels-first, ``"CHW"``) as gymnasium's
``FrameStackObservation`` makes them. Storing ``obs`` and ``new_obs`` per
transition costs ``2k`` frames (56 KB for 84x84x4), although consecutive
stacks share all but one frame.
:class:`FrameStackStorage` keeps a ring of single frames plus, per transition,
the ids of the ``k`` frames of ``obs`` and of ``new_obs``; in steady state a
transition costs about one frame (~7 KB), so 1M transitions fit in ~7.5 GB.
The replay buffers use it automatically for such observations::

    buffer = ReplayBuffer(1_000_000)       # frame_stack_storage="auto"
    buffer.add(batch)                      # obs/new_obs: (N, 84, 84, 4) uint8
    buffer.sample(32)["obs"]               # exactly the stacks that were added

Both layouts share one implementation: the storage knows which row axis is the
stack axis (``layout``), splits stacks into frames along it on ``add`` and
rebuilds C-contiguous stacks in the same layout on ``get``.

How frames are shared (content addressing, exact)
-------------------------------------------------
Nothing is assumed about how stacks relate (1-step or n-step ``new_obs``,
first-frame or zero padding at episode starts, several envs interleaved, batch
boundaries): frames are deduplicated by *content*. Each incoming frame gets a
64-bit fingerprint (a random linear hash over its bytes); frames with equal
fingerprints inside the added chunk, or equal to a recently stored frame (a
fingerprint index over the last ``window`` stored frames, which is how an
episode continued in a later batch reuses the frames already stored), are
compared byte for byte, and only exact matches share storage. Anything else,
hash collisions included, is stored as a new frame, so ``sample()`` always
returns exactly what was added; a chunk of random, unrelated stacks just costs
``2k`` frames per transition. After each chunk the first and last rows are
rebuilt from the ring and compared with the input as a guard.

Eviction
--------
Frames live in a ring of ``num_frames = capacity + extra`` slots (``extra`` =
``frame_slack * capacity``, at least 1024); frame ``id`` (a global counter)
lives in slot ``id % num_frames``. Every transition has a *key* = the smallest
frame id referenced by it or by any later transition (a suffix minimum, so keys
never decrease in FIFO order). Before frames are overwritten, the owning buffer
evicts the FIFO prefix of transitions whose key is below the oldest surviving
frame id; a live transition therefore never points at an overwritten frame.
References to stored frames are limited to the last ``window = extra // 2``
frames, so as long as transitions need about one new frame each, transitions
leave by FIFO capacity, not by frame pressure. If a stream needs more frames
than that (e.g. stacks that share nothing), transitions are evicted early: the
buffer then holds fewer than ``capacity`` transitions (``stats()`` reports
``num_early_evicted`` and ``frames_per_transition``) -- exactness is kept over
compression, and ``frame_stack_storage=False`` restores plain storage.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

__all__ = ["FrameStackStorage", "DEFAULT_FRAME_SLACK", "FrameLayout", "looks_like_frame_stacks",
           "stack_layout"]

#: Where the stack axis of one row lies: last (``(H, W, k)``) or first (``(k, H, W)``).
FrameLayout = Literal["HWC", "CHW"]
_LAYOUTS = ("HWC", "CHW")

#: Extra frame slots, as a fraction of the transition capacity.
DEFAULT_FRAME_SLACK = 0.06
# Minimum extra frame slots: small buffers fed by many interleaved envs still
# find an env's previous frames (a few MB for 84x84 frames).
_MIN_EXTRA_FRAMES = 1024
# Rows processed per chunk: bounds the temporary arrays (2k frames per row).
_MAX_CHUNK_ROWS = 64
# Fixed seed: fingerprints must agree across a buffer's lifetime and restores.
_FINGERPRINT_SEED = 0x5EED_F4A3


def stack_layout(row_shape: tuple[int, ...]) -> FrameLayout:
    """The layout the models read a 3-D image row as: ``"CHW"`` when
    ``shape[0] < shape[2]`` (``(4, 84, 84)``), else ``"HWC"`` (``(84, 84, 4)``)."""
    return "CHW" if row_shape[0] < row_shape[2] else "HWC"


def looks_like_frame_stacks(obs: np.ndarray, new_obs: np.ndarray,
                            layout: FrameLayout = "HWC") -> bool:
    """Whether ``(N, H, W, k)`` (``"HWC"``) or ``(N, k, H, W)`` (``"CHW"``) arrays
    show the sliding structure of frame stacks along the stack axis.

    True if some row's ``new_obs`` is its ``obs`` shifted by one frame, or some
    row's ``obs`` is the previous row's ``obs`` shifted by one frame. RGB images
    (``k = 3`` channels, not a time axis) show neither, so "auto" leaves them to
    plain storage. Only the first 64 rows are looked at.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if obs.ndim != 4 or obs.shape != new_obs.shape or len(obs) == 0:
        return False
    o, n = obs[:64], new_obs[:64]
    if layout == "CHW":  # a view with the stack axis last: one test serves both
        o, n = np.moveaxis(o, 1, -1), np.moveaxis(n, 1, -1)
    if o.shape[-1] < 2:
        return False
    same_row = np.all(n[..., :-1] == o[..., 1:], axis=(1, 2, 3))
    if same_row.any():
        return True
    if len(o) > 1:
        next_row = np.all(o[1:, ..., :-1] == o[:-1, ..., 1:], axis=(1, 2, 3))
        return bool(next_row.any())
    return False


def _ring_runs(start: int, n: int, size: int) -> list[tuple[int, int, int]]:
    """``(ring_start, ring_end, offset)`` runs covering ring slots of ids ``start..start+n``
    (also used by the transition ring in buffers.py)."""
    runs = []
    done = 0
    while done < n:
        s = (start + done) % size
        e = min(size, s + (n - done))
        runs.append((s, e, done))
        done += e - s
    return runs


def _rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row of two ``(n, d)`` arrays, whether all bytes are equal (8 bytes at a time)."""
    a = np.ascontiguousarray(a).view(np.uint8).reshape(len(a), -1)
    b = np.ascontiguousarray(b).view(np.uint8).reshape(len(b), -1)
    if a.shape[1] % 8 == 0:
        a, b = a.view(np.uint64), b.view(np.uint64)
    return np.all(a == b, axis=1)


class FrameStackStorage:
    """Stores ``obs`` / ``new_obs`` stacks of shape ``(H, W, k)`` (``layout="HWC"``)
    or ``(k, H, W)`` (``layout="CHW"``) as shared single frames.

    Used by :class:`~flowrl.replay.ReplayBuffer` (it owns the transition
    slots; global transition ``g`` lives in slot ``g % capacity``)::

        frames = FrameStackStorage(capacity, (84, 84, 4), np.uint8)   # or (4, 84, 84), "CHW"
        new_tail = frames.add(head, obs[:n], new_obs[:n], tail)  # n <= frames.chunk_rows
        # the caller evicts transitions [tail, new_tail), then rows
        # [head, head + n) are live
        obs, new_obs = frames.get(slots)   # C-contiguous, in the layout they were added in
    """

    def __init__(self, capacity: int, stack_shape: tuple[int, ...], dtype: Any,
                 frame_slack: float = DEFAULT_FRAME_SLACK, layout: FrameLayout = "HWC") -> None:
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        stack_axis = 2 if layout == "HWC" else 0
        if len(stack_shape) != 3 or stack_shape[stack_axis] < 1:
            want = "(H, W, k)" if layout == "HWC" else "(k, H, W)"
            raise ValueError(f"{layout} frame stacks must have shape {want}, got {stack_shape}")
        dtype = np.dtype(dtype)
        if dtype.names is not None or dtype.hasobject or dtype.subdtype is not None:
            raise ValueError(f"frame stacks need a plain numeric dtype, got {dtype}")
        self.capacity = int(capacity)
        self.layout: FrameLayout = layout
        self.stack_shape = tuple(int(s) for s in stack_shape)
        self.k = self.stack_shape[stack_axis]
        self.frame_shape = (self.stack_shape[:2] if layout == "HWC"
                            else self.stack_shape[1:])
        self.dtype = dtype
        self.num_frames = self.ring_size(self.capacity, self.k, frame_slack)
        extra = self.num_frames - self.capacity
        #: How far back (in frame ids) a new transition may reference stored frames.
        self.window = extra // 2
        #: Rows per call of :meth:`add` (one chunk never pushes more than ``window`` frames).
        self.chunk_rows = max(1, min(_MAX_CHUNK_ROWS, self.window // (2 * self.k)))

        self._frames = np.zeros((self.num_frames, *self.frame_shape), dtype=self.dtype)
        self._frame_fp = np.zeros(self.num_frames, dtype=np.uint64)
        self._obs_ids = np.zeros((self.capacity, self.k), dtype=np.int64)
        self._new_obs_ids = np.zeros((self.capacity, self.k), dtype=np.int64)
        self._keys = np.zeros(self.capacity, dtype=np.int64)
        self._pushed = 0  # frame ids handed out so far
        # fingerprint -> newest stored frame id, for ids >= _index_lo only.
        self._index: dict[int, int] = {}
        self._index_lo = 0
        frame_bytes = int(np.prod(self.frame_shape)) * self.dtype.itemsize
        self._frame_bytes = frame_bytes
        self._fp_words = -(-frame_bytes // 8)
        rng = np.random.default_rng(_FINGERPRINT_SEED)
        self._fp_weights = rng.integers(1, 2**63, size=self._fp_words, dtype=np.uint64) \
            | np.uint64(1)

    @staticmethod
    def ring_size(capacity: int, k: int, frame_slack: float = DEFAULT_FRAME_SLACK) -> int:
        """Frame slots a storage for ``capacity`` transitions of ``k``-frame stacks holds."""
        # >= 4k keeps window >= 2k: one row's frames always fit in one chunk.
        return int(capacity) + max(math.ceil(frame_slack * capacity), _MIN_EXTRA_FRAMES, 4 * k)

    # ------------------------------------------------------------- helpers
    @property
    def num_frames_pushed(self) -> int:
        """Frames written to the ring so far (distinct frames stored, over all time)."""
        return self._pushed

    def nbytes(self) -> int:
        """Bytes of all numpy arrays held (frame ring, fingerprints, per-slot ids, keys)."""
        return int(self._frames.nbytes + self._frame_fp.nbytes + self._obs_ids.nbytes
                   + self._new_obs_ids.nbytes + self._keys.nbytes)

    def _split_frames(self, obs: np.ndarray, new_obs: np.ndarray) -> np.ndarray:
        """``(2 n k, H*W)`` contiguous frames: obs frames of all rows, then new_obs frames."""
        n, k = len(obs), self.k
        out = np.empty((2, n, k, *self.frame_shape), dtype=self.dtype)
        if self.layout == "CHW":  # rows are already frame after frame
            np.copyto(out[0], obs)
            np.copyto(out[1], new_obs)
            return out.reshape(2 * n * k, -1)
        # Per-frame strided copies are ~3x faster than one transposing copy.
        for j in range(k):
            np.copyto(out[0, :, j], obs[..., j])
            np.copyto(out[1, :, j], new_obs[..., j])
        return out.reshape(2 * n * k, -1)

    def _fingerprint(self, frames: np.ndarray) -> np.ndarray:
        """64-bit random linear hash of each frame's bytes (wrapping uint64 arithmetic)."""
        raw = np.ascontiguousarray(frames).view(np.uint8).reshape(len(frames), -1)
        if raw.shape[1] % 8:
            padded = np.zeros((len(raw), self._fp_words * 8), dtype=np.uint8)
            padded[:, :raw.shape[1]] = raw
            raw = padded
        # One pass, no mixing step: a linear hash mod 2^64 can be fooled by
        # differences confined to the top bit of words, but every match is
        # verified byte for byte, so a collision only costs compression.
        with np.errstate(over="ignore"):
            return raw.view(np.uint64) @ self._fp_weights

    def _first_key_at_least(self, threshold: int, lo: int, hi: int, strict: bool = False) -> int:
        """First global transition in ``[lo, hi)`` whose key is >= (or >) ``threshold``."""
        keys, cap = self._keys, self.capacity
        while lo < hi:  # keys are non-decreasing in FIFO order: binary search
            mid = (lo + hi) // 2
            key = int(keys[mid % cap])
            if key > threshold or (not strict and key == threshold):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _stack(self, ids: np.ndarray) -> np.ndarray:
        """Rebuild C-contiguous ``(B, *stack_shape)`` stacks from ``(B, k)`` frame ids."""
        if self.layout == "CHW":  # one gather gives (B, k, H, W) directly
            return self._frames[ids % self.num_frames]
        out = np.empty((len(ids), *self.stack_shape), dtype=self.dtype)
        for j in range(self.k):
            out[..., j] = self._frames[ids[:, j] % self.num_frames]
        return out

    # ----------------------------------------------------------------- add
    def add(self, head: int, obs: np.ndarray, new_obs: np.ndarray, tail: int) -> int:
        """Store rows as global transitions ``head, head+1, ...``; return the new tail.

        ``[tail, head)`` are the live transitions. The caller must treat
        ``[tail, returned)`` as evicted (their frames may be overwritten now).
        At most :attr:`chunk_rows` rows per call.
        """
        n, k, R = len(obs), self.k, self.num_frames
        if n > self.chunk_rows:
            raise ValueError(f"add at most {self.chunk_rows} rows per call, got {n}")
        if obs.shape[1:] != self.stack_shape or new_obs.shape[1:] != self.stack_shape:
            raise ValueError(f"frame stacks must have shape {self.stack_shape}, got obs "
                             f"{obs.shape[1:]} and new_obs {new_obs.shape[1:]}")
        if n == 0:
            return tail
        P = self._pushed
        self._expire_index(P - self.window)

        frames = self._split_frames(obs, new_obs)
        fps = self._fingerprint(frames)
        M = len(frames)

        # 1) Duplicates inside the chunk: same fingerprint, then verified byte for byte.
        uniq_fp, first, inverse = np.unique(fps, return_index=True, return_inverse=True)
        rep = first[inverse]
        dup = np.flatnonzero(rep != np.arange(M))
        collided = np.empty(0, dtype=np.int64)
        if dup.size:
            differs = ~_rows_equal(frames[dup], frames[rep[dup]])
            collided = dup[differs]  # equal hash, different bytes: stored separately

        # 2) Frames already in the ring (recent ones only), verified byte for byte.
        index = self._index
        cand = np.fromiter((index.get(f, -1) for f in uniq_fp.tolist()),
                           dtype=np.int64, count=len(uniq_fp))
        hit = np.flatnonzero(cand >= 0)
        if hit.size:
            stored = self._frames[cand[hit] % R].reshape(hit.size, -1)
            same = _rows_equal(stored, frames[first[hit]])
            cand[hit[~same]] = -1

        # 3) Ids: existing frames keep theirs, new ones get P, P+1, ...
        new_u = np.flatnonzero(cand < 0)
        uniq_ids = cand
        uniq_ids[new_u] = P + np.arange(new_u.size)
        ids = uniq_ids[inverse]
        ids[collided] = P + new_u.size + np.arange(collided.size)
        src = np.concatenate([first[new_u], collided])  # chunk frames to write, in id order
        m = src.size

        # 4) Make room: transitions keyed below the oldest surviving frame go first.
        threshold = P + m - R
        new_tail = tail
        if threshold > 0 and tail < head:
            new_tail = self._first_key_at_least(threshold, tail, head)

        # 5) Write the new frames into the ring.
        for s, e, off in _ring_runs(P, m, R):
            chosen = src[off:off + (e - s)]
            self._frames[s:e] = frames[chosen].reshape(e - s, *self.frame_shape)
            self._frame_fp[s:e] = fps[chosen]
        for f, fid in zip(fps[first[new_u]].tolist(), uniq_ids[new_u].tolist()):
            index[f] = fid
        self._pushed = P + m

        # 6) Per-row ids and keys (suffix minimum of each row's oldest frame).
        obs_ids = ids[:n * k].reshape(n, k)
        new_obs_ids = ids[n * k:].reshape(n, k)
        oldest = np.minimum(obs_ids.min(axis=1), new_obs_ids.min(axis=1))
        keys = np.minimum.accumulate(oldest[::-1])[::-1]
        # Earlier live transitions must not outlive the frames these rows use.
        lower_from = self._first_key_at_least(int(keys[0]), new_tail, head, strict=True)
        for s, e, _ in _ring_runs(lower_from, head - lower_from, self.capacity):
            self._keys[s:e] = keys[0]
        for s, e, off in _ring_runs(head, n, self.capacity):
            self._obs_ids[s:e] = obs_ids[off:off + e - s]
            self._new_obs_ids[s:e] = new_obs_ids[off:off + e - s]
            self._keys[s:e] = keys[off:off + e - s]

        # 7) Guard: rebuild the chunk's first and last rows and compare.
        check = np.array([0, n - 1])
        if not (np.array_equal(self._stack(obs_ids[check]), obs[check])
                and np.array_equal(self._stack(new_obs_ids[check]), new_obs[check])):
            raise RuntimeError("flowrl FrameStackStorage: a stored frame stack does not "
                               "rebuild exactly (internal error); use "
                               "frame_stack_storage=False and report this")
        return new_tail

    def _expire_index(self, lo: int) -> None:
        """Forget index entries for frame ids below ``lo`` (too old to reference)."""
        if lo <= self._index_lo:
            return
        index, R = self._index, self.num_frames
        for fid in range(self._index_lo, lo):
            f = int(self._frame_fp[fid % R])
            if index.get(f) == fid:
                del index[f]
        self._index_lo = lo

    # ----------------------------------------------------------------- get
    def get(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(obs, new_obs)`` stacks of the transitions in ``slots``."""
        return self._stack(self._obs_ids[slots]), self._stack(self._new_obs_ids[slots])

    # --------------------------------------------------------------- state
    def get_state(self, tail: int, head: int) -> dict[str, Any]:
        """Numpy-only state for the live transitions ``[tail, head)``."""
        slots = np.arange(tail, head) % self.capacity
        lo = int(self._keys[tail % self.capacity]) if head > tail else self._pushed
        frame_ids = np.arange(lo, self._pushed)
        return {
            "stack_shape": list(self.stack_shape),
            "layout": self.layout,
            "dtype": self.dtype.str,
            "num_frames": self.num_frames,
            "pushed": self._pushed,
            "frames_lo": lo,
            "frames": self._frames[frame_ids % self.num_frames],
            "obs_ids": self._obs_ids[slots],
            "new_obs_ids": self._new_obs_ids[slots],
            "keys": self._keys[slots],
        }

    def set_state(self, state: dict[str, Any], tail: int, head: int) -> None:
        """Restore :meth:`get_state` output into a storage of the same geometry."""
        # States written before CHW support carry no layout: they are HWC.
        layout = state.get("layout", "HWC")
        if layout != self.layout or tuple(state["stack_shape"]) != self.stack_shape:
            raise ValueError(f"frame storage state holds {layout} stacks of shape "
                             f"{tuple(state['stack_shape'])}, this storage {self.layout} "
                             f"{self.stack_shape}")
        if int(state["num_frames"]) != self.num_frames:
            raise ValueError(f"frame ring size differs: state has {state['num_frames']} "
                             f"frames, this storage {self.num_frames}")
        self._pushed = int(state["pushed"])
        lo = int(state["frames_lo"])
        pos = np.arange(lo, self._pushed) % self.num_frames
        frames = np.asarray(state["frames"], dtype=self.dtype)
        if len(frames):
            self._frames[pos] = frames
            self._frame_fp[pos] = self._fingerprint(frames.reshape(len(frames), -1))
        slots = np.arange(tail, head) % self.capacity
        self._obs_ids[slots] = state["obs_ids"]
        self._new_obs_ids[slots] = state["new_obs_ids"]
        self._keys[slots] = state["keys"]
        # Rebuild the recent-frame index so continued episodes keep sharing frames.
        self._index = {}
        self._index_lo = max(lo, self._pushed - self.window)
        for fid in range(self._index_lo, self._pushed):
            self._index[int(self._frame_fp[fid % self.num_frames])] = fid
