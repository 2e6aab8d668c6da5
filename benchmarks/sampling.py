"""Env steps/s of RolloutWorker sampling on CartPole-v1, beside the raw gymnasium rate.

    python benchmarks/sampling.py [--seconds 5]

Measured in one run: the raw rate of a plain ``gymnasium`` loop (one env, random
actions, no policy) and flowrl's rate with the PPO policy (batched inference,
GAE postprocessing) for 1 and 8 envs per worker with 0 (local), 1 and 2 remote workers.
"Per worker" divides by the number of sampling processes. Ray runs on 2 CPUs.
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


def flowrl_rate(num_workers: int, num_envs: int, seconds: float) -> float:
    from flowrl.envs import make_env_creator
    from flowrl.flow import Metrics
    from flowrl.ops import ParallelRollouts
    from flowrl.plans.ppo import PPOAgent
    from flowrl.policies.ppo import PPOTorchPolicy
    from flowrl.workers import WorkerSet

    config = PPOAgent.merge_config({
        "env": "CartPole-v1", "num_workers": num_workers, "num_envs_per_worker": num_envs,
        "rollout_fragment_length": max(64, 1024 // num_envs), "num_cpus_per_worker": 1,
        "seed": 0})
    workers = WorkerSet(make_env_creator("CartPole-v1"), PPOTorchPolicy, config)
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
    args = parser.parse_args()
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    raw = raw_gymnasium_rate(args.seconds)
    print(f"CartPole-v1 sampling, {os.cpu_count()} cores, {args.seconds:g} s per row")
    print(f"raw gymnasium loop (1 env, no policy): {raw:10,.0f} steps/s")
    print("| workers | envs/worker | steps/s total | steps/s per worker | per worker vs raw |")
    print("| --- | --- | --- | --- | --- |")
    for num_workers in (0, 1, 2):
        for num_envs in (1, 8):
            rate = flowrl_rate(num_workers, num_envs, args.seconds)
            per_worker = rate / max(1, num_workers)
            print(f"| {num_workers} | {num_envs} | {rate:,.0f} | {per_worker:,.0f} | "
                  f"{per_worker / raw:.0%} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
