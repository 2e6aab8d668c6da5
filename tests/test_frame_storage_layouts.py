"""Frame-stack replay storage for channels-first ``(k, H, W)`` stacks and for records.

Channels-first stacks (gymnasium's ``FrameStackObservation``) must be stored
once per frame like Atari's channels-last ones, come back exactly as added,
and survive checkpoints; nested observations (numpy records) stay in plain
columns.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowrl.data.sample_batch import SampleBatch
from flowrl.replay import FrameStackStorage, PrioritizedReplayBuffer, ReplayBuffer
from flowrl.replay.frame_storage import looks_like_frame_stacks


class SlidingStacks:
    """Interleaved episodes of several envs as rollout fragments of frame stacks.

    ``obs`` at step t stacks frames ``t-k+1 .. t`` of the episode (padded with
    the first frame or zeros at the start); ``new_obs`` is the stack at
    ``min(t + n_step, fragment_end)``, as n-step postprocessing writes it. The
    stack axis is first (``"CHW"``) or last (``"HWC"``) of each row. Each row has
    a unique ``row_id``; ``expected`` keeps the stacks that were added.
    """

    def __init__(self, seed: int, layout: str = "CHW", frame_shape=(10, 12), k: int = 4,
                 n_step: int = 1, num_envs: int = 3, pad: str = "first",
                 max_fragment: int = 30) -> None:
        self.rng = np.random.default_rng(seed)
        self.layout, self.frame_shape, self.k = layout, frame_shape, k
        self.n_step, self.pad, self.max_fragment = n_step, pad, max_fragment
        self.envs = [{"t": 0, "L": 0} for _ in range(num_envs)]
        self.next_row = 0
        self.expected: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.order: list[int] = []

    def _stacks(self, env: dict, ts: np.ndarray) -> np.ndarray:
        idx = ts[:, None] + np.arange(-self.k + 1, 1)[None]
        frames = env["frames"][np.maximum(idx, 0)]  # (n, k, H, W)
        if self.pad == "zero":
            frames[idx < 0] = 0
        if self.layout == "HWC":
            frames = np.moveaxis(frames, 1, -1)
        return np.ascontiguousarray(frames)

    def next_batch(self) -> SampleBatch:
        pieces = []
        num = int(self.rng.integers(1, len(self.envs) + 1))
        for i in self.rng.permutation(len(self.envs))[:num]:
            env = self.envs[i]
            if env["t"] >= env["L"]:  # reset: a new episode with new frames
                env["L"] = int(self.rng.integers(3, 50))
                env["frames"] = self.rng.integers(0, 256, (env["L"] + 1, *self.frame_shape),
                                                  dtype=np.uint8)
                env["t"] = 0
            n = int(min(self.rng.integers(1, self.max_fragment), env["L"] - env["t"]))
            ts = np.arange(env["t"], env["t"] + n)
            end = env["t"] + n
            obs = self._stacks(env, ts)
            new_obs = self._stacks(env, np.minimum(ts + self.n_step, end))
            ids = np.arange(self.next_row, self.next_row + n)
            self.next_row += n
            terminated = np.zeros(n, bool)
            terminated[-1] = end == env["L"]
            pieces.append(SampleBatch(obs=obs, new_obs=new_obs, actions=ids % 3,
                                      rewards=np.ones(n, np.float32), terminateds=terminated,
                                      truncateds=np.zeros(n, bool), row_id=ids))
            for j, rid in enumerate(ids.tolist()):
                self.expected[rid] = (obs[j], new_obs[j])
            self.order.extend(ids.tolist())
            env["t"] = end
        return SampleBatch.concat_samples(pieces)

    def check(self, batch: SampleBatch) -> None:
        for key in ("obs", "new_obs"):
            assert batch[key].flags.c_contiguous
            assert batch[key].dtype == np.uint8
        for i, rid in enumerate(batch["row_id"].tolist()):
            obs, new_obs = self.expected[rid]
            assert np.array_equal(batch["obs"][i], obs), f"obs of row {rid} differs"
            assert np.array_equal(batch["new_obs"][i], new_obs), f"new_obs of row {rid} differs"


def make_buffer(kind: str, capacity: int, mode: bool | str = "auto") -> ReplayBuffer:
    if kind == "prioritized":
        return PrioritizedReplayBuffer(capacity, alpha=0.6, seed=1, frame_stack_storage=mode)
    return ReplayBuffer(capacity, seed=1, frame_stack_storage=mode)


# ------------------------------------------------------ channels-first stacks
@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
@pytest.mark.parametrize("mode", ["auto", True])
@pytest.mark.parametrize("n_step,pad", [(1, "first"), (3, "zero")])
def test_chw_stacks_round_trip_exactly(kind, mode, n_step, pad):
    stream = SlidingStacks(seed=n_step + 7 * len(pad), n_step=n_step, pad=pad)
    buf = make_buffer(kind, 300, mode)
    rng = np.random.default_rng(0)
    while stream.next_row < 3000:  # ten capacities: both rings wrap many times
        buf.add(stream.next_batch())
        sample = buf.sample(32)
        assert sample["obs"].shape[1:] == (4, 10, 12)
        stream.check(sample)
        if kind == "prioritized":
            buf.update_priorities(sample["batch_indexes"], rng.random(32) + 0.1)
    st = buf.stats()
    assert st["frame_stack_storage"] is True and st["frame_stack_layout"] == "CHW"
    assert st["frames_per_transition"] < 1.2
    assert len(buf) == 300 and st["num_early_evicted"] == 0
    sample = buf.sample(2000)
    stream.check(sample)
    assert set(sample["row_id"].tolist()) <= set(stream.order[-300:])  # FIFO


def test_chw_costs_what_hwc_costs():
    # The same episodes in both layouts: identical frame counts and bytes.
    stats = {}
    for layout in ("HWC", "CHW"):
        stream = SlidingStacks(seed=4, layout=layout, frame_shape=(16, 16), n_step=3,
                               num_envs=4, max_fragment=50)
        buf = ReplayBuffer(2000, seed=0)
        while stream.next_row < 2500:
            buf.add(stream.next_batch())
        stream.check(buf.sample(256))
        stats[layout] = buf.stats()
    hwc, chw = stats["HWC"], stats["CHW"]
    assert hwc["frame_stack_layout"] == "HWC" and chw["frame_stack_layout"] == "CHW"
    assert chw["frames_per_transition"] == hwc["frames_per_transition"] < 1.1
    assert chw["size_bytes"] == hwc["size_bytes"]
    plain = ReplayBuffer(2000, frame_stack_storage=False)
    plain.add(SlidingStacks(seed=4, frame_shape=(16, 16)).next_batch())
    assert chw["bytes_per_transition"] < 0.4 * plain.stats()["bytes_per_transition"]


def test_layout_detection():
    rng = np.random.default_rng(0)
    chw = SlidingStacks(seed=1).next_batch()
    assert looks_like_frame_stacks(chw["obs"], chw["new_obs"], "CHW")
    assert not looks_like_frame_stacks(chw["obs"], chw["new_obs"], "HWC")
    hwc = SlidingStacks(seed=1, layout="HWC").next_batch()
    assert looks_like_frame_stacks(hwc["obs"], hwc["new_obs"], "HWC")
    # Channels-first RGB images (a colour axis, not time) stay in plain columns.
    rgb = rng.integers(0, 256, (20, 3, 12, 12), dtype=np.uint8)
    buf = ReplayBuffer(50)
    buf.add(SampleBatch(obs=rgb[:-1], new_obs=rgb[1:]))
    assert buf.stats()["frame_stack_storage"] is False
    # Blank frames slide along every axis: the models' reading of (4, 12, 12) decides.
    blank = np.zeros((6, 4, 12, 12), np.uint8)
    buf = ReplayBuffer(50)
    buf.add(SampleBatch(obs=blank, new_obs=blank))
    assert buf.stats()["frame_stack_layout"] == "CHW"
    buf = ReplayBuffer(50)
    buf.add(SampleBatch(obs=np.zeros((6, 12, 12, 4), np.uint8),
                        new_obs=np.zeros((6, 12, 12, 4), np.uint8)))
    assert buf.stats()["frame_stack_layout"] == "HWC"
    # frame_stack_storage=True follows the models' rule, even for unrelated stacks.
    for shape, layout in (((4, 9, 9), "CHW"), ((9, 9, 4), "HWC"), ((5, 4, 4), "HWC")):
        obs = rng.integers(0, 256, (8, *shape), dtype=np.uint8)
        new_obs = rng.integers(0, 256, (8, *shape), dtype=np.uint8)
        buf = ReplayBuffer(50, frame_stack_storage=True)
        buf.add(SampleBatch(obs=obs, new_obs=new_obs, row_id=np.arange(8)))
        assert buf.stats()["frame_stack_layout"] == layout
        s = buf.sample(16)
        np.testing.assert_array_equal(s["obs"], obs[s["row_id"]])
        np.testing.assert_array_equal(s["new_obs"], new_obs[s["row_id"]])
    with pytest.raises(ValueError, match="layout"):
        FrameStackStorage(10, (4, 8, 8), np.uint8, layout="NCHW")


# --------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_chw_state_round_trip(kind):
    stream = SlidingStacks(seed=3, n_step=3)
    buf = make_buffer(kind, 60)
    for _ in range(10):
        buf.add(stream.next_batch())
    state = buf.get_state()
    assert state["frames"]["layout"] == "CHW"
    restored = make_buffer(kind, 60)
    restored.set_state(state)
    assert restored.stats()["frame_stack_layout"] == "CHW"
    a, b = buf.sample(100), restored.sample(100)  # same rng state: same rows
    for key in a.keys():
        np.testing.assert_array_equal(a[key], b[key])
    stream.check(b)
    for _ in range(8):  # the restored buffer keeps sharing frames and evicting in order
        restored.add(stream.next_batch())
        stream.check(restored.sample(64))
    assert restored.stats()["frames_per_transition"] < 1.3


def test_state_without_layout_restores_as_hwc():
    stream = SlidingStacks(seed=9, layout="HWC", n_step=3)
    buf = ReplayBuffer(60, seed=2)
    for _ in range(10):
        buf.add(stream.next_batch())
    state = buf.get_state()
    del state["frames"]["layout"]  # as written before channels-first support
    restored = ReplayBuffer(60, seed=2)
    restored.set_state(state)
    assert restored.stats()["frame_stack_layout"] == "HWC"
    sample = restored.sample(200)
    assert sample["obs"].shape[1:] == (10, 12, 4)
    stream.check(sample)
    restored.add(stream.next_batch())
    stream.check(restored.sample(200))


# ------------------------------------------------------------------- records
def record_batch(n: int) -> SampleBatch:
    dtype = np.dtype([("image", np.uint8, (4, 8, 8)), ("speed", np.float32, (2,))])
    obs = np.zeros(n + 1, dtype=dtype)
    obs["image"] = np.random.default_rng(0).integers(0, 256, (n + 1, 4, 8, 8), dtype=np.uint8)
    obs["speed"] = np.arange(2 * (n + 1), dtype=np.float32).reshape(n + 1, 2)
    return SampleBatch(obs=obs[:-1], new_obs=obs[1:], actions=np.arange(n),
                       row_id=np.arange(n))


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_records_use_plain_columns(kind):
    batch = record_batch(12)
    buf = make_buffer(kind, 20)
    buf.add(batch)
    assert buf.stats()["frame_stack_storage"] is False
    s = buf.sample(30)
    assert s["obs"].dtype == batch["obs"].dtype
    np.testing.assert_array_equal(s["obs"], batch["obs"][s["row_id"]])
    np.testing.assert_array_equal(s["new_obs"], batch["new_obs"][s["row_id"]])


def test_records_refused_by_frame_stack_storage_true():
    batch = record_batch(5)
    buf = ReplayBuffer(20, frame_stack_storage=True)
    with pytest.raises(ValueError, match="records") as err:
        buf.add(batch)
    assert str(batch["obs"].dtype) in str(err.value)
    with pytest.raises(ValueError, match="plain numeric dtype"):
        FrameStackStorage(10, (4, 8, 8), batch["obs"].dtype, layout="CHW")
