"""Env steps/s of RolloutWorker sampling on CartPole-v1, beside the raw gymnasium rate.

    python benchmarks/sampling.py [--seconds 5] [--variants box dict lstm] [--workers 0 1 2]

Measured in one run: the raw rate of a plain ``gymnasium`` loop (one env, random
actions, no policy) and flowrl's rate with the PPO policy (batched inference,
GAE postprocessing) for 1 and 8 envs per worker with 0 (local), 1 and 2 remote workers.
"Per worker" divides by the number of sampling processes. Ray runs on 2 CPUs.

Variants (``--variants``, default ``box``): ``box`` is CartPole as it is; ``dict`` the
same CartPole with a Dict observation (``position`` and ``velocity``, two Box leaves of
2 each): the same dynamics and policy size, so the gap to ``box`` is the cost of nested
observations (records, one encoder per leaf); ``lstm`` the Box CartPole with
``model.use_lstm`` (256 cells): the cost of a recurrent policy's per-step state.
"""

from __future__ import annotations

import argparse
import os
import time

import gymnasium as gym
import numpy as np


def raw_gymnasium_rate(seconds: float) -> float:
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, 2, size=100_000)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a in actions[:10_000]:
            _, _, terminated, truncated, _ = env.step(int(a))
            if terminated or truncated:
                env.reset()
        steps += 10_000
    return steps / (time.perf_counter() - start)


class DictCartPole(gym.ObservationWrapper):
    """CartPole-v1 whose observation is ``{"position": [x, angle], "velocity": [dx, dangle]}``."""

    def __init__(self, env_config: dict | None = None) -> None:
        super().__init__(gym.make("CartPole-v1"))
        box = self.env.observation_space
        self.observation_space = gym.spaces.Dict({
            "position": gym.spaces.Box(box.low[[0, 2]], box.high[[0, 2]], dtype=np.float32),
            "velocity": gym.spaces.Box(box.low[[1, 3]], box.high[[1, 3]], dtype=np.float32)})

    def observation(self, observation: np.ndarray) -> dict:
        return {"position": observation[[0, 2]], "velocity": observation[[1, 3]]}


def flowrl_rate(num_workers: int, num_envs: int, seconds: float, variant: str = "box") -> float:
    from flowrl.envs import make_env_creator
    from flowrl.flow import Metrics
    from flowrl.ops import ParallelRollouts
    from flowrl.plans.ppo import PPOAgent
    from flowrl.policies.ppo import PPOTorchPolicy
    from flowrl.workers import WorkerSet

    env = DictCartPole if variant == "dict" else "CartPole-v1"
    config = PPOAgent.merge_config({
        "env": env, "num_workers": num_workers, "num_envs_per_worker": num_envs,
        "rollout_fragment_length": max(64, 1024 // num_envs), "num_cpus_per_worker": 1,
        "seed": 0, "model": {"use_lstm": variant == "lstm"}})
    workers = WorkerSet(make_env_creator(env), PPOTorchPolicy, config)
    rollouts = ParallelRollouts(workers, Metrics(), mode="async" if num_workers else
                                "bulk_sync", num_async=2)
    next(rollouts)  # warm up (actors' first call, torch lazy init)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        steps += next(rollouts).count
    rate = steps / (time.perf_counter() - start)
    workers.stop()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--variants", nargs="+", choices=("box", "dict", "lstm"),
                        default=["box"], help="run each, row after row (see above)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    raw = raw_gymnasium_rate(args.seconds)
    print(f"CartPole-v1 sampling, {os.cpu_count()} cores, {args.seconds:g} s per row")
    print(f"raw gymnasium loop (1 env, no policy): {raw:10,.0f} steps/s")
    print("| variant | workers | envs/worker | steps/s total | steps/s per worker | "
          "per worker vs raw |")
    print("| --- | --- | --- | --- | --- | --- |")
    for num_workers in args.workers:
        for num_envs in (1, 8):
            for kind in args.variants:
                rate = flowrl_rate(num_workers, num_envs, args.seconds, kind)
                per_worker = rate / max(1, num_workers)
                print(f"| {kind} | {num_workers} | {num_envs} | {rate:,.0f} | "
                      f"{per_worker:,.0f} | {per_worker / raw:.0%} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
