"""Replay memory per Atari transition, and add/sample rates, with frame-stack storage.

    python benchmarks/replay_memory.py [--num-transitions 100000] [--prioritized]
                                       [--n-step 3] [--num-envs 8] [--fragment 50]

Fills a buffer (capacity = ``--num-transitions``, then 25% more rows to measure
adding to a full buffer) with synthetic Atari-like transitions: 84x84 uint8
frames (a fixed background per episode with a moving ball, a paddle and a step
counter, so frames differ in a few pixels and never repeat within an episode),
stacked 4 deep with first-frame padding, from ``--num-envs`` interleaved envs
sending ``--fragment``-row pieces, with n-step ``new_obs`` (``obs`` of
``t + n``). It prints the bytes held per stored transition, the projection for
1M transitions (DESIGN target: <= 8 GB, vs ~56 GB storing both stacks per row),
and add / sample rates (rows per second inside the calls; generating the
synthetic frames is not timed). Sampled rows of a final check are compared
with what was added.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flowrl.replay import FrameStackStorage, PrioritizedReplayBuffer, ReplayBuffer
from flowrl.data.sample_batch import SampleBatch

H = W = 84
K = 4


class _Env:
    """One synthetic Atari-like episode stream (frames and their 4-frame stacks)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.eps_id = -1
        self._new_episode()

    def _new_episode(self) -> None:
        rng = self.rng
        self.eps_id += 1
        self.length = int(rng.integers(300, 2000))
        bg = rng.integers(0, 40, (H, W), dtype=np.uint8)
        frames = np.repeat(bg[None], self.length + 1, axis=0)
        # The ball moves every step (bouncing off the walls), so consecutive frames differ.
        steps = np.arange(self.length + 1)[:, None]
        pos = rng.integers(0, H - 3, 2) + rng.choice([-2, -1, 1, 2], 2) * steps
        period = 2 * (H - 3)
        pos = pos % period
        ball = np.where(pos > H - 3, period - pos, pos)
        paddle = np.clip(ball[:, 0] - 3, 0, H - 8)
        for t in range(self.length + 1):
            frames[t, ball[t, 0]:ball[t, 0] + 2, ball[t, 1]:ball[t, 1] + 2] = 236
            frames[t, paddle[t]:paddle[t] + 8, W - 4:W - 2] = 92
            frames[t, 0, :2] = (t % 256, t // 256)  # a "score" pixel pair: no frame repeats
        self.frames = frames
        self.t = 0

    def stacks(self, ts: np.ndarray) -> np.ndarray:
        idx = np.maximum(ts[:, None] + np.arange(-K + 1, 1)[None], 0)
        return np.ascontiguousarray(np.moveaxis(self.frames[idx], 1, -1))

    def fragment(self, n: int, n_step: int, row0: int) -> SampleBatch:
        if self.t >= self.length:
            self._new_episode()
        n = min(n, self.length - self.t)
        ts = np.arange(self.t, self.t + n)
        last = self.t + n
        self.t = last
        terminated = np.zeros(n, dtype=bool)
        terminated[-1] = last == self.length
        return SampleBatch(
            obs=self.stacks(ts), new_obs=self.stacks(np.minimum(ts + n_step, last)),
            actions=self.rng.integers(0, 6, n), rewards=np.zeros(n, np.float32),
            terminateds=terminated, truncateds=np.zeros(n, bool),
            gammas=np.full(n, 0.99 ** n_step, np.float32),
            eps_id=np.full(n, self.eps_id, np.int64), t=ts, row_id=np.arange(row0, row0 + n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-transitions", type=int, default=100_000)
    parser.add_argument("--prioritized", action="store_true")
    parser.add_argument("--n-step", type=int, default=3)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--fragment", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n_total = args.num_transitions
    buf: ReplayBuffer = (PrioritizedReplayBuffer(n_total, seed=args.seed) if args.prioritized
                         else ReplayBuffer(n_total, seed=args.seed))
    envs = [_Env(np.random.default_rng(args.seed * 1000 + i)) for i in range(args.num_envs)]
    added = 0
    keep: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a few rows to verify exactly

    def fill(num_rows: int) -> float:
        """Add ``num_rows`` rows; return rows/s spent inside ``add``."""
        nonlocal added
        add_s, target = 0.0, added + num_rows
        while added < target:
            env = envs[int(rng.integers(len(envs)))]
            batch = env.fragment(min(args.fragment, target - added), args.n_step, added)
            for i in range(0, batch.count, 97):
                keep[int(batch["row_id"][i])] = (batch["obs"][i], batch["new_obs"][i])
            start = time.perf_counter()
            buf.add(batch)
            add_s += time.perf_counter() - start
            added += batch.count
        return num_rows / add_s

    # Filling touches fresh memory (page faults); a full buffer overwrites warm memory.
    fill_rate = fill(n_total)
    steady_rate = fill(max(1, n_total // 4))

    sample_rates = {}
    for size in (32, 512):
        reps = max(20, 20_000 // size)
        start = time.perf_counter()
        for _ in range(reps):
            buf.sample(size)
        sample_rates[size] = reps * size / (time.perf_counter() - start)

    check = buf.sample(4096)
    checked = 0
    for i, rid in enumerate(check["row_id"].tolist()):
        if rid in keep:
            obs, new_obs = keep[rid]
            assert np.array_equal(check["obs"][i], obs) and np.array_equal(
                check["new_obs"][i], new_obs), f"row {rid} does not rebuild exactly"
            checked += 1

    st = buf.stats()
    frame = H * W
    naive = 2 * frame * K
    print(f"buffer: {type(buf).__name__}, capacity {n_total}, stored {st['size']}, "
          f"frame-stack storage: {st['frame_stack_storage']}")
    print(f"frame: {frame} B; naive obs+new_obs per transition: {naive} B")
    print(f"bytes per stored transition: {st['bytes_per_transition']:.0f} B "
          f"({st['bytes_per_transition'] / frame:.3f} frames; "
          f"{st.get('frames_per_transition', float('nan')):.3f} distinct frames stored "
          f"per added row)")
    projected = st["bytes_per_transition"] * 1e6
    if st["frame_stack_storage"]:
        # Per-slot bytes scale with capacity; the frame ring's minimum slack does not.
        per_frame = frame + 8  # frame + its fingerprint
        per_slot = st["bytes_per_transition"] - st["frame_ring_size"] * per_frame / n_total
        projected = per_slot * 1e6 + FrameStackStorage.ring_size(1_000_000, K) * per_frame
    print(f"projected for 1M transitions: {projected / 1e9:.2f} GB "
          f"(target <= 8 GB; naive {naive * 1e6 / 1e9:.1f} GB)")
    print(f"add rate: {fill_rate:,.0f} rows/s while filling, {steady_rate:,.0f} rows/s when "
          f"full (evicting)")
    print("sample rate: " + ", ".join(f"{r:,.0f} rows/s (batch {s})"
                                      for s, r in sample_rates.items()))
    print(f"exactness check: {checked} sampled rows compared with the added stacks, all equal")


if __name__ == "__main__":
    main()
