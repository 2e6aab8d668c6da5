"""Replay: segment trees, uniform / prioritized buffers, frame-stack storage, replay actors.

References are slow pure-Python versions of the same computations. Ray tests
use real actors through the session fixture.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from flowrl.flow import NotReady, from_actors
from flowrl.replay import (
    FrameStackStorage,
    MinSegmentTree,
    PrioritizedReplayBuffer,
    ReplayActor,
    ReplayBuffer,
    SumSegmentTree,
    linear_schedule,
)
from flowrl.data.sample_batch import MultiAgentBatch, SampleBatch


# ----------------------------------------------------------------- helpers
def simple_batch(start: int, n: int, obs_dim: int = 3) -> SampleBatch:
    """Rows whose every column is a function of a unique ``row_id``."""
    ids = np.arange(start, start + n)
    return SampleBatch(
        obs=np.repeat(ids[:, None], obs_dim, 1).astype(np.float32),
        new_obs=np.repeat(ids[:, None] + 1, obs_dim, 1).astype(np.float32),
        actions=ids % 4,
        rewards=(ids * 0.5).astype(np.float32),
        terminateds=ids % 7 == 0,
        truncateds=np.zeros(n, bool),
        row_id=ids,
        infos=[{"i": int(i)} for i in ids],
    )


def check_rows(batch: SampleBatch) -> None:
    ids = batch["row_id"]
    np.testing.assert_array_equal(batch["obs"][:, 0], ids.astype(np.float32))
    np.testing.assert_array_equal(batch["new_obs"][:, 1], (ids + 1).astype(np.float32))
    np.testing.assert_array_equal(batch["actions"], ids % 4)
    np.testing.assert_array_equal(batch["rewards"], (ids * 0.5).astype(np.float32))
    np.testing.assert_array_equal(batch["terminateds"], ids % 7 == 0)


def is_plain(value) -> bool:
    """Only numpy arrays, numbers, strings, None and plain containers of them."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (np.ndarray, bool, int, float, str, np.generic))


class EpisodeStream:
    """Interleaved frame-stacked episodes from several envs, as rollout fragments.

    Episode frames are random uint8 images; ``obs`` at step t stacks frames
    ``t-k+1 .. t`` (padded with the first frame or with zeros), and ``new_obs``
    follows the n-step rule of fragment postprocessing: ``stack(min(t + n,
    fragment_end))``. Every row has a unique ``row_id``; ``expected`` maps it
    to the ``(obs, new_obs)`` that were added.
    """

    def __init__(self, seed: int, frame_shape=(8, 6), k: int = 4, n_step: int = 1,
                 num_envs: int = 3, pad: str = "first", max_fragment: int = 30) -> None:
        self.rng = np.random.default_rng(seed)
        self.frame_shape, self.k, self.n_step, self.pad = frame_shape, k, n_step, pad
        self.max_fragment = max_fragment
        self.envs = [{"t": 0, "L": 0} for _ in range(num_envs)]
        self.next_row = 0
        self.next_eps = 0
        self.expected: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.order: list[int] = []

    def _stacks(self, env, ts: np.ndarray) -> np.ndarray:
        idx = ts[:, None] + np.arange(-self.k + 1, 1)[None]
        frames = env["frames"][np.maximum(idx, 0)]  # (n, k, H, W)
        if self.pad == "zero":
            frames[idx < 0] = 0
        return np.ascontiguousarray(np.moveaxis(frames, 1, -1))

    def next_batch(self) -> SampleBatch:
        pieces = []
        num = int(self.rng.integers(1, len(self.envs) + 1))
        order = self.rng.permutation(len(self.envs))[:num]
        for e in (self.envs[i] for i in order):
            if e["t"] >= e["L"]:
                e["L"] = int(self.rng.integers(3, 50))
                e["frames"] = self.rng.integers(0, 256, (e["L"] + 1, *self.frame_shape),
                                                dtype=np.uint8)
                e["t"], e["eps"] = 0, self.next_eps
                self.next_eps += 1
            n = int(min(self.rng.integers(1, self.max_fragment), e["L"] - e["t"]))
            ts = np.arange(e["t"], e["t"] + n)
            end = e["t"] + n
            obs = self._stacks(e, ts)
            new_obs = self._stacks(e, np.minimum(ts + self.n_step, end))
            ids = np.arange(self.next_row, self.next_row + n)
            self.next_row += n
            terminated = np.zeros(n, bool)
            terminated[-1] = end == e["L"]
            pieces.append(SampleBatch(
                obs=obs, new_obs=new_obs, actions=ids % 3, rewards=np.ones(n, np.float32),
                terminateds=terminated, truncateds=np.zeros(n, bool),
                gammas=np.full(n, 0.99 ** self.n_step, np.float32),
                eps_id=np.full(n, e["eps"]), t=ts, row_id=ids))
            for i, rid in enumerate(ids.tolist()):
                self.expected[rid] = (obs[i], new_obs[i])
            self.order.extend(ids.tolist())
            e["t"] = end
        return SampleBatch.concat_samples(pieces)

    def check(self, batch: SampleBatch) -> None:
        for i, rid in enumerate(batch["row_id"].tolist()):
            obs, new_obs = self.expected[rid]
            assert np.array_equal(batch["obs"][i], obs), f"obs of row {rid} differs"
            assert np.array_equal(batch["new_obs"][i], new_obs), f"new_obs of row {rid} differs"


# ----------------------------------------------------------- segment trees
def ref_find(values: list[float], p: float) -> int:
    """Linear scan: smallest i with sum(values[:i+1]) > p, else the last non-zero leaf."""
    running = 0.0
    for i, v in enumerate(values):
        running += v
        if running > p:
            return i
    return max(i for i, v in enumerate(values) if v > 0)


def test_segment_trees_match_reference():
    rng = np.random.default_rng(0)
    cap = 37  # not a power of two
    sums, mins = SumSegmentTree(cap), MinSegmentTree(cap)
    ref = [0.0] * cap
    ref_min = [float("inf")] * cap
    for _ in range(30):
        idx = rng.integers(0, cap, size=int(rng.integers(1, 10)))  # repeats: last wins
        vals = rng.random(len(idx)) * 10
        sums[idx] = vals
        mins[idx] = vals
        for i, v in zip(idx.tolist(), vals.tolist()):
            ref[i] = v
            ref_min[i] = v
    sums[5] = 2.5  # scalar update
    ref[5] = 2.5
    np.testing.assert_allclose(sums[np.arange(cap)], ref)
    assert sums[5] == 2.5
    for _ in range(50):
        a, b = sorted(rng.integers(0, cap + 1, size=2).tolist())
        assert sums.sum(a, b) == pytest.approx(sum(ref[a:b]))
        assert mins.min(a, b) == (min(ref_min[a:b]) if b > a else float("inf"))
    assert sums.sum() == pytest.approx(sum(ref))
    assert mins.min() == min(ref_min)


def test_find_prefixsum_idx_equals_linear_scan():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 4, size=50).astype(float)  # exact floats, many zero leaves
    values[-3:] = 0.0
    tree = SumSegmentTree(len(values))
    tree[np.arange(len(values))] = values
    total = values.sum()
    boundaries = np.cumsum(values)
    prefixes = np.concatenate([[0.0], boundaries, boundaries - 0.5, rng.random(500) * total,
                               [total, total + 3.0]])
    prefixes = prefixes[prefixes >= 0]
    got = tree.find_prefixsum_idx(prefixes)
    want = [ref_find(values.tolist(), p) for p in prefixes.tolist()]
    np.testing.assert_array_equal(got, want)
    assert all(values[i] > 0 for i in got)
    assert tree.find_prefixsum_idx(0.0) == ref_find(values.tolist(), 0.0)


@pytest.mark.parametrize("capacity", [5, 3000, 70_000])  # one, two and three levels
def test_segment_trees_of_every_height_match_a_linear_scan(capacity):
    rng = np.random.default_rng(capacity)
    values = rng.integers(0, 4, size=capacity).astype(float)  # exact sums, zero leaves
    values[-(capacity // 3 + 1):] = 0.0  # an empty tail: the descent must not stray there
    sums, mins = SumSegmentTree(capacity), MinSegmentTree(capacity)
    min_values = np.where(values > 0, values, np.inf)
    sums[np.arange(capacity)] = values
    mins[np.arange(capacity)] = min_values
    total = values.sum()
    assert sums.sum() == total and mins.min() == min_values.min()
    boundaries = np.cumsum(values)
    prefixes = np.concatenate([[0.0], boundaries[:50], boundaries[-5:], rng.random(300) * total,
                               [total - 0.5, total, total + 3.0]])
    want = np.minimum(np.searchsorted(boundaries, prefixes, side="right"),
                      np.flatnonzero(values)[-1])  # past the total: the last non-zero leaf
    np.testing.assert_array_equal(sums.find_prefixsum_idx(prefixes), want)
    # Updates keep every level consistent, repeated indexes included (the last wins).
    idx = rng.integers(0, capacity, size=40)
    idx[1] = idx[0]
    new = rng.integers(1, 5, size=40).astype(float)
    sums[idx] = new
    mins[idx] = new
    for i, v in zip(idx.tolist(), new.tolist()):
        values[i] = min_values[i] = v
    assert sums.sum() == values.sum()
    assert mins.min() == min_values.min()
    assert mins.min(0, capacity // 2) == min_values[:capacity // 2].min()
    p = rng.random(300) * values.sum()
    np.testing.assert_array_equal(sums.find_prefixsum_idx(p),
                                  np.searchsorted(np.cumsum(values), p, side="right"))
    found, leaf_values = sums.find_leaves(p)
    np.testing.assert_array_equal(leaf_values, values[found])
    # assign(): the unchecked path for distinct, valid slots
    sums.assign(np.array([0, capacity - 1]), np.array([7.0, 9.0]))
    values[[0, capacity - 1]] = [7.0, 9.0]
    assert sums.sum() == values.sum() and sums.sum(0, 1) == 7.0


def test_segment_tree_errors():
    tree = SumSegmentTree(4)
    with pytest.raises(IndexError):
        tree[4] = 1.0
    with pytest.raises(ValueError, match="-1"):
        tree[np.array([0, 1])] = [1.0, -1.0]
    with pytest.raises(ValueError):
        SumSegmentTree(0)
    single = SumSegmentTree(1)
    single[0] = 3.0
    assert single.sum() == 3.0
    assert single.find_prefixsum_idx(np.array([0.0, 2.9])).tolist() == [0, 0]


def test_linear_schedule():
    assert linear_schedule(0, 100, 0.4, 1.0) == pytest.approx(0.4)
    assert linear_schedule(50, 100, 0.4, 1.0) == pytest.approx(0.7)
    assert linear_schedule(500, 100, 0.4, 1.0) == pytest.approx(1.0)
    assert linear_schedule(-5, 100, 0.4, 1.0) == pytest.approx(0.4)
    assert linear_schedule(3, 0, 0.4, 1.0) == 1.0


# ---------------------------------------------------------- uniform buffer
def test_uniform_fifo_eviction_columns_and_uniformity():
    buf = ReplayBuffer(10, seed=0)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    for start in (0, 4, 8):
        buf.add(simple_batch(start, 4))
    assert len(buf) == 10
    batch = buf.sample(20_000)
    check_rows(batch)
    assert "infos" not in batch
    assert batch["obs"].dtype == np.float32 and batch["terminateds"].dtype == bool
    # FIFO: rows 0 and 1 are gone; batch_indexes are the rows' insertion numbers.
    np.testing.assert_array_equal(batch["batch_indexes"], batch["row_id"])
    counts = np.bincount(batch["row_id"], minlength=12)
    assert counts[:2].sum() == 0
    assert np.all(np.abs(counts[2:] / 20_000 - 0.1) < 0.01)
    # A batch larger than the capacity keeps its last rows.
    buf.add(simple_batch(100, 25))
    assert set(buf.sample(2000)["row_id"].tolist()) == set(range(115, 125))
    assert buf.stats()["num_added"] == 37


def test_column_checks_and_multi_agent():
    buf = ReplayBuffer(8)
    buf.add(simple_batch(0, 3).as_multi_agent())
    bad = simple_batch(3, 2)
    del bad["rewards"]
    with pytest.raises(ValueError, match="rewards"):
        buf.add(bad)
    wrong_shape = simple_batch(3, 2, obs_dim=5)
    with pytest.raises(ValueError, match="obs"):
        buf.add(wrong_shape)
    two = MultiAgentBatch({"a": simple_batch(0, 1), "b": simple_batch(1, 1)}, 1)
    with pytest.raises(TypeError, match="one buffer per policy"):
        buf.add(two)


def test_stats():
    buf = ReplayBuffer(100, seed=0)
    buf.add(simple_batch(0, 30))
    buf.add(simple_batch(30, 30))
    buf.sample(16)
    st = buf.stats()
    row_bytes = 3 * 4 + 3 * 4 + 8 + 4 + 1 + 1 + 8  # obs, new_obs, actions, rewards, ..., row_id
    assert st["size"] == 60 and st["capacity"] == 100
    assert st["size_bytes"] == 100 * row_bytes
    assert st["bytes_per_transition"] == row_bytes
    assert st["num_added"] == 60 and st["num_sampled"] == 16
    assert st["add_throughput"] > 0 and st["sample_throughput"] > 0
    assert st["frame_stack_storage"] is False


@pytest.mark.parametrize("kind", ["uniform", "prioritized", "frames"])
def test_get_set_state_round_trip(kind):
    stream = EpisodeStream(seed=3, n_step=3)
    if kind == "prioritized":
        make = lambda: PrioritizedReplayBuffer(40, alpha=0.7, seed=5)  # noqa: E731
    else:
        make = lambda: ReplayBuffer(40, seed=5)  # noqa: E731
    buf = make()
    for _ in range(8):
        num_added = buf.stats()["num_added"]
        buf.add(stream.next_batch() if kind == "frames" else simple_batch(num_added, 9))
    if kind == "prioritized":
        s = buf.sample(10)
        buf.update_priorities(s["batch_indexes"], np.linspace(0.1, 5, 10))
    state = buf.get_state()
    assert is_plain(state)
    restored = make()
    restored.set_state(state)
    assert len(restored) == len(buf) and restored.stats()["num_added"] == buf.stats()["num_added"]
    a, b = buf.sample(64), restored.sample(64)  # same rng state -> same rows
    assert a.keys() == b.keys()
    for key in a.keys():
        np.testing.assert_array_equal(a[key], b[key])
    if kind == "frames":
        assert restored.stats()["frame_stack_storage"]
        stream.check(b)
        # The restored buffer keeps adding and evicting correctly.
        for _ in range(5):
            restored.add(stream.next_batch())
        stream.check(restored.sample(200))
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(41).set_state(state)


# ------------------------------------------------------ prioritized buffer
def test_per_sampling_frequencies_and_weights_vs_reference():
    alpha, beta = 0.7, 0.5
    priorities = np.array([0.5, 1.0, 2.0, 4.0, 0.1, 3.0, 1.5])
    buf = PrioritizedReplayBuffer(10, alpha=alpha, beta=beta, seed=0)
    buf.add(simple_batch(0, len(priorities)), priorities=priorities)
    n = 200_000
    batch = buf.sample(n)
    check_rows(batch)
    scaled = priorities ** alpha
    probs = scaled / scaled.sum()
    freq = np.bincount(batch["batch_indexes"], minlength=len(priorities)) / n
    np.testing.assert_allclose(freq, probs, atol=0.004)

    # Slow per-sample importance weights: (N P(i))^-beta / max_j (N P(j))^-beta.
    big_n = len(priorities)
    max_w = max((big_n * (p ** alpha / sum(q ** alpha for q in priorities))) ** -beta
                for p in priorities)
    small = buf.sample(50, beta=0.9)
    for i, w in zip(small["batch_indexes"].tolist(), small["weights"].tolist()):
        p_i = priorities[i] ** alpha / sum(q ** alpha for q in priorities)
        max_w9 = max((big_n * (p ** alpha / sum(q ** alpha for q in priorities))) ** -0.9
                     for p in priorities)
        assert w == pytest.approx((big_n * p_i) ** -0.9 / max_w9, rel=1e-5)
    for i, w in zip(batch["batch_indexes"][:50].tolist(), batch["weights"][:50].tolist()):
        p_i = priorities[i] ** alpha / sum(q ** alpha for q in priorities)
        assert w == pytest.approx((big_n * p_i) ** -beta / max_w, rel=1e-5)
    assert batch["weights"].dtype == np.float32 and batch["weights"].max() <= 1.0


def test_per_new_rows_get_max_priority_and_updates_change_sampling():
    buf = PrioritizedReplayBuffer(64, alpha=1.0, seed=0)
    buf.add(simple_batch(0, 32))
    counts = np.bincount(buf.sample(20_000)["batch_indexes"], minlength=32)
    assert counts.min() > 400  # all at priority 1: uniform
    buf.update_priorities(np.arange(32), np.where(np.arange(32) == 7, 100.0, 1.0))
    buf.add(simple_batch(32, 1))  # gets the max priority seen so far (100)
    freq = np.bincount(buf.sample(20_000)["batch_indexes"], minlength=33) / 20_000
    want = 100 / (100 + 100 + 31)
    assert abs(freq[7] - want) < 0.02 and abs(freq[32] - want) < 0.02
    assert buf.stats()["max_priority"] == 100.0


def test_invalid_priorities_and_stale_indexes():
    buf = PrioritizedReplayBuffer(4, seed=0)
    buf.add(simple_batch(0, 4))
    for bad, text in ((np.nan, "nan"), (np.inf, "inf"), (0.0, "0.0"), (-1.0, "-1.0")):
        with pytest.raises(ValueError, match=text):
            buf.update_priorities(np.array([0, 1]), np.array([1.0, bad]))
    with pytest.raises(ValueError, match="never handed out"):
        buf.update_priorities(np.array([9]), np.array([1.0]))
    with pytest.raises(ValueError, match="integers"):
        buf.update_priorities(np.array([0.0]), np.array([1.0]))
    with pytest.raises(ValueError):
        buf.add(simple_batch(4, 1), priorities=np.array([np.nan]))
    assert len(buf) == 4 and buf.stats()["num_added"] == 4  # nothing was stored
    buf.add(simple_batch(4, 1))
    # Row 0 was evicted by row 4: its (stale) priority is ignored.
    buf.update_priorities(np.array([0, 2]), np.array([50.0, 2.0]))
    assert buf.stats()["num_stale_priority_updates"] == 1
    assert buf.stats()["max_priority"] == 2.0
    assert 0 not in buf.sample(1000)["batch_indexes"]


# ------------------------------------------------------ frame-stack storage
@pytest.mark.parametrize("n_step,pad", [(1, "first"), (3, "first"), (1, "zero"), (3, "zero")])
def test_frame_stacks_rebuild_exactly_with_wraparound(n_step, pad):
    stream = EpisodeStream(seed=n_step * 10 + len(pad), n_step=n_step, pad=pad)
    buf = ReplayBuffer(300, seed=0)
    while stream.next_row < 3000:  # ten times the capacity: the rings wrap many times
        buf.add(stream.next_batch())
        stream.check(buf.sample(32))
    st = buf.stats()
    assert st["frame_stack_storage"] is True
    assert len(buf) == 300 and st["num_early_evicted"] == 0
    assert st["frames_per_transition"] < 1.2
    sample = buf.sample(3000)
    stream.check(sample)
    assert set(sample["row_id"].tolist()) == set(stream.order[-300:])  # FIFO


def test_frame_stacks_with_prioritized_replay_and_odd_frame_size():
    stream = EpisodeStream(seed=7, frame_shape=(7, 9), n_step=3, num_envs=5)
    buf = PrioritizedReplayBuffer(200, seed=1)
    while stream.next_row < 1500:
        buf.add(stream.next_batch())
        s = buf.sample(32)
        stream.check(s)
        buf.update_priorities(s["batch_indexes"], np.random.default_rng(0).random(32) + 0.1)
    assert buf.stats()["frame_stack_storage"]
    sample = buf.sample(2000)
    stream.check(sample)
    assert set(sample["row_id"].tolist()) <= set(stream.order[-200:])


@pytest.mark.parametrize("n_step,pad", [(1, "zero"), (3, "first")])
def test_frame_storage_tight_ring_stays_exact(monkeypatch, n_step, pad):
    # A ring with almost no slack (318 frames for 300 rows) and many short
    # episodes: frames run out, transitions are evicted early, and zero
    # padding frames are shared far back -- rows must still rebuild exactly
    # and leave in FIFO order.
    import flowrl.replay.frame_storage as fs

    monkeypatch.setattr(fs, "_MIN_EXTRA_FRAMES", 0)
    stream = EpisodeStream(seed=5, n_step=n_step, pad=pad, num_envs=6, max_fragment=8)
    buf = ReplayBuffer(300, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while stream.next_row < 3000:
            buf.add(stream.next_batch())
            sample = buf.sample(32)
            stream.check(sample)
            assert set(sample["row_id"].tolist()) <= set(stream.order[-len(buf):])
    st = buf.stats()
    assert st["frame_ring_size"] == 318 and st["num_early_evicted"] > 0
    assert 100 < len(buf) <= 300
    stream.check(buf.sample(1000))


def test_frame_storage_unrelated_stacks_stay_exact():
    # Stacks that share nothing: every frame is stored; transitions leave early.
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(500, seed=0, frame_stack_storage=True)  # 1524 frame slots
    expected = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for start in range(0, 2000, 50):
            obs = rng.integers(0, 256, (50, 5, 4, 4), dtype=np.uint8)
            new_obs = rng.integers(0, 256, (50, 5, 4, 4), dtype=np.uint8)
            ids = np.arange(start, start + 50)
            for i, r in enumerate(ids):
                expected[int(r)] = (obs[i], new_obs[i])
            buf.add(SampleBatch(obs=obs, new_obs=new_obs, row_id=ids))
            s = buf.sample(64)
            for i, r in enumerate(s["row_id"].tolist()):
                assert np.array_equal(s["obs"][i], expected[r][0])
                assert np.array_equal(s["new_obs"][i], expected[r][1])
    st = buf.stats()
    assert st["frames_per_transition"] == pytest.approx(8.0)
    assert st["num_early_evicted"] > 0 and 150 < len(buf) < 500
    assert any("frame_stack_storage=False" in str(w.message) for w in caught)


def test_auto_detection():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    plain = ReplayBuffer(50)
    plain.add(SampleBatch(obs=rgb[:-1], new_obs=rgb[1:]))
    assert plain.stats()["frame_stack_storage"] is False
    floats = ReplayBuffer(50)
    floats.add(SampleBatch(obs=rgb[:-1].astype(np.float32), new_obs=rgb[1:].astype(np.float32)))
    assert floats.stats()["frame_stack_storage"] is False
    stream = EpisodeStream(seed=0)
    stacked = ReplayBuffer(50)
    stacked.add(stream.next_batch())
    assert stacked.stats()["frame_stack_storage"] is True
    forced_off = ReplayBuffer(50, frame_stack_storage=False)
    forced_off.add(stream.next_batch())
    assert forced_off.stats()["frame_stack_storage"] is False
    with pytest.raises(ValueError, match="frame_stack_storage"):
        ReplayBuffer(50, frame_stack_storage=True).add(simple_batch(0, 3))


def test_frame_storage_bytes_per_transition_is_about_one_frame():
    capacity = 12_000
    stream = EpisodeStream(seed=11, frame_shape=(84, 84), n_step=3, num_envs=4,
                           max_fragment=50)
    buf = ReplayBuffer(capacity, seed=0)
    while stream.next_row < capacity + 500:
        buf.add(stream.next_batch())
    stream.check(buf.sample(256))
    st = buf.stats()
    frame = 84 * 84
    assert len(buf) == capacity
    assert st["bytes_per_transition"] < 1.12 * frame, st
    assert st["size_bytes"] < 1.12 * frame * capacity
    assert st["frame_ring_size"] == FrameStackStorage.ring_size(capacity, 4)


# ------------------------------------------------------------ replay actor
def actor_config(**overrides):
    config = {
        "buffer_size": 400, "prioritized_replay": True, "prioritized_replay_alpha": 0.6,
        "prioritized_replay_beta": 0.4, "final_prioritized_replay_beta": 1.0,
        "prioritized_replay_beta_annealing_timesteps": 1000, "prioritized_replay_eps": 1e-6,
        "learning_starts": 100, "train_batch_size": 8, "seed": 0,
    }
    config.update(overrides)
    return config


def test_replay_actor_locally():
    actor = ReplayActor(actor_config(), shard_index=1, num_shards=2)
    assert actor.worker_index == 1 and actor.buffer.capacity == 200
    assert actor.replay() is None
    actor.par_iter_init("it", [], "Replay")
    assert actor.par_iter_next("it") is NotReady
    actor.add_batch(simple_batch(0, 49))
    assert actor.replay() is None  # 49 < 100 / 2
    actor.add_batch(simple_batch(49, 1))
    batch = actor.par_iter_next("it")
    assert batch.count == 8 and "batch_indexes" in batch and "weights" in batch
    # beta anneals on rows added to this shard x num_shards: 50 * 2 of 1000 steps.
    assert actor.current_beta() == pytest.approx(0.4 + 0.6 * 0.1)
    actor.update_priorities(batch["batch_indexes"], -np.ones(8))  # |td| + eps
    with pytest.raises(ValueError, match="nan"):
        actor.update_priorities(batch["batch_indexes"][:1], np.array([np.nan]))
    st = actor.stats()
    assert st["shard_index"] == 1 and st["size"] == 50 and st["num_replayed_batches"] == 1
    restored = ReplayActor(actor_config(), shard_index=1, num_shards=2)
    restored.set_state(actor.get_state())
    assert len(restored.buffer) == 50
    # Worker-side prioritization: the td_error column becomes the initial priority.
    ws = ReplayActor(actor_config(worker_side_prioritization=True), 0, 1)
    b = simple_batch(0, 4)
    b["td_error"] = np.array([1.0, 2.0, 3.0, 4.0])
    ws.add_batch(b.as_multi_agent())
    assert "td_error" not in ws.buffer.sample(4)
    assert ws.buffer.stats()["max_priority"] == pytest.approx(4.0 + 1e-6)
    uniform = ReplayActor(actor_config(prioritized_replay=False, learning_starts=0), 0, 1)
    uniform.add_batch(simple_batch(0, 5))
    assert "weights" not in uniform.replay()
    uniform.update_priorities(np.arange(2), np.ones(2))  # a no-op


def _not_ready(item) -> bool:
    # A gather with_source yields NotReady alone or paired with its shard.
    return item is NotReady or (isinstance(item, tuple) and item[1] is NotReady)


def _pull(it, want: int, timeout: float = 30.0):
    """Pull items until ``want`` real ones arrived (NotReady items are skipped)."""
    got, deadline = [], time.time() + timeout
    while len(got) < want:
        assert time.time() < deadline, f"only {len(got)} of {want} items in {timeout}s"
        item = next(it)
        if _not_ready(item):
            continue
        got.append(item)
    return got


def test_replay_actors_gather_async_after_learning_starts(ray_session):
    import ray

    cls = ray.remote(num_cpus=0)(ReplayActor)
    shards = [cls.remote(actor_config(prioritized_replay=False), i, 2) for i in range(2)]
    it = from_actors(shards, "Replay").gather_async(num_async=4, with_source=True)
    for _ in range(20):  # nothing stored yet: the shards only answer NotReady
        assert _not_ready(next(it))
    ray.get([s.add_batch.remote(simple_batch(100 * i, 30)) for i, s in enumerate(shards)])
    for _ in range(20):
        assert _not_ready(next(it))  # 30 < 100 / 2 rows per shard
    ray.get([s.add_batch.remote(simple_batch(100 * i + 30, 30)) for i, s in enumerate(shards)])
    # Async: a loaded machine may answer many batches from one shard before the other's
    # in-flight NotReady replies clear; pull until both shards were heard (bounded).
    items = _pull(it, 12)
    while len({shards.index(actor) for actor, _ in items}) < 2 and len(items) < 400:
        items += _pull(it, 12)
    sources = set()
    for actor, batch in items:
        assert isinstance(batch, SampleBatch) and batch.count == 8
        check_rows(batch)
        shard = shards.index(actor)
        sources.add(shard)
        assert np.all((batch["row_id"] >= 100 * shard) & (batch["row_id"] < 100 * shard + 60))
    assert sources == {0, 1}
    # The plain gather of the brief yields the batches themselves.
    plain = from_actors(shards, "Replay").gather_async(num_async=4)
    assert all(isinstance(b, SampleBatch) for b in _pull(plain, 4))
    stats = ray.get(shards[0].stats.remote())
    assert stats["size"] == 60 and stats["num_replayed_batches"] > 0


def test_replay_actor_priorities_reach_the_shard(ray_session):
    import ray

    cls = ray.remote(num_cpus=0)(ReplayActor)
    config = actor_config(learning_starts=0, prioritized_replay_alpha=1.0)
    shards = [cls.remote(config, i, 2) for i in range(2)]
    ray.get([s.add_batch.remote(simple_batch(0, 64)) for s in shards])
    it = from_actors(shards, "Replay").gather_async(num_async=2, with_source=True)
    before = _pull(it, 10)
    target = shards[1]
    rows = np.concatenate([b["row_id"] for a, b in before if a == target] or [np.zeros(0, int)])
    assert len(rows) == 0 or np.mean(rows == 7) < 0.2
    td = np.where(np.arange(64) == 7, 1000.0, 0.01)
    ray.get(target.update_priorities.remote(np.arange(64), td))
    # At most num_async=2 requests per shard were in flight when the update was sent:
    # the target's first 2 batches after it may predate it, later ones cannot.
    def per_shard(items) -> list[list[SampleBatch]]:
        return [[b for a, b in items if a == shard] for shard in shards]

    after = _pull(it, 24)
    # Async: a loaded machine may answer many batches from one shard before the other's
    # in-flight replies clear; pull until both shards were heard enough (bounded).
    while (len(per_shard(after)[0]) < 5 or len(per_shard(after)[1]) < 2 + 5) \
            and len(after) < 800:
        after += _pull(it, 12)
    other_batches, target_batches = per_shard(after)
    assert len(other_batches) >= 5 and len(target_batches) >= 7, \
        f"batches per shard after the update: {len(other_batches)}, {len(target_batches)}"
    target_rows = np.concatenate([b["row_id"] for b in target_batches[2:]])
    other_rows = np.concatenate([b["row_id"] for b in other_batches])
    assert np.mean(target_rows == 7) > 0.9
    assert np.mean(other_rows == 7) < 0.2  # the other shard was not touched


# ------------------------------------------------- Ape-X replay checkpoints with shards
APEX_TWO_SHARDS = {"num_workers": 1, "num_cpus_per_worker": 0.5, "num_replay_buffer_shards": 2,
                   "buffer_size": 5000, "learning_starts": 200, "rollout_fragment_length": 50,
                   "train_batch_size": 32, "timesteps_per_iteration": 400,
                   "min_iter_time_s": 0, "checkpoint_replay_buffer": True, "seed": 0}


def shard_contents(agent) -> list[dict]:
    """Each replay shard's stored rows, priorities and counters, in shard order."""
    import ray

    states = ray.get([s.get_state.remote() for s in agent.plan.state["replay"].buffers])
    assert [state["shard_index"] for state in states] == list(range(len(states)))
    # Sampling state (rng, num_sampled) moves with in-flight replay requests: left out.
    return [{"columns": state["buffer"]["columns"], "num_added": state["buffer"]["num_added"],
             "priorities": state["buffer"]["priorities"]} for state in states]


def test_apex_checkpoint_restores_each_replay_shards_rows_and_refuses_another_shard_count(
        ray_session, tmp_path):
    from flowrl.plans.apex import ApexAgent

    agent = ApexAgent(config=APEX_TWO_SHARDS, env="CartPole-v1", log_to_disk=False)
    try:
        for _ in range(20):  # rollouts go to a random shard: until both hold rows
            agent.train()
            saved = shard_contents(agent)
            if all(len(s["priorities"]) > 0 for s in saved):
                break
        path = agent.save(str(tmp_path / "apex"))
        saved = shard_contents(agent)  # nothing is stored between train() calls
    finally:
        agent.stop()
    sizes = [len(s["priorities"]) for s in saved]
    assert min(sizes) > 0, sizes
    # Different rows in each shard, so a restore into the wrong shard would show.
    assert not np.array_equal(saved[0]["columns"]["obs"][:min(sizes)],
                              saved[1]["columns"]["obs"][:min(sizes)])

    fresh = ApexAgent(config=APEX_TWO_SHARDS, env="CartPole-v1", log_to_disk=False)
    try:
        assert all(len(s["priorities"]) == 0 for s in shard_contents(fresh))
        fresh.restore(path)
        for index, (restored, original) in enumerate(zip(shard_contents(fresh), saved)):
            np.testing.assert_equal(restored, original, err_msg=f"replay shard {index}")
    finally:
        fresh.stop()

    one_shard = ApexAgent(config={**APEX_TWO_SHARDS, "num_replay_buffer_shards": 1},
                          env="CartPole-v1", log_to_disk=False)
    try:
        with pytest.raises(ValueError, match=r"The checkpoint holds 2 replay shards, this "
                           r"agent has 1: set num_replay_buffer_shards to 2"):
            one_shard.restore(path)
    finally:
        one_shard.stop()
