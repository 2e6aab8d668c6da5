"""Resident memory (RSS) of the driver and the rollout workers over a long run.

    python benchmarks/memory.py [--ppo-iterations 300] [--dqn-iterations 100]

Trains PPO (2 remote workers) and then DQN (1 remote worker, replay in the driver) on
CartPole-v1 and prints, per iteration, the RSS of the driver and of each worker
(``VmRSS`` from ``/proc/<pid>/status``, Linux). The summary compares the mean RSS of
the first 20 iterations after warm-up with the mean of the last 20: growth under 5%
means no leak. DQN's replay buffer fills up during the run, so its driver is judged
after the buffer is full (``buffer_size`` is set small enough to fill early).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def track(name: str, agent, iterations: int, warmup: int) -> dict:
    import ray
    pids = {"driver": os.getpid()}
    for i, worker in enumerate(agent.workers.remote_workers(), start=1):
        pids[f"worker{i}"] = ray.get(worker.get_pid.remote())
    series: dict[str, list[float]] = {k: [] for k in pids}
    start = time.perf_counter()
    for it in range(1, iterations + 1):
        result = agent.train()
        for key, pid in pids.items():
            series[key].append(rss_mib(pid))
        print(f"{name} iter {it:4d}  ts {result['timesteps_total']:8d}  "
              f"reward {result['episode_reward_mean']:7.1f}  "
              + "  ".join(f"{k} {v[-1]:7.1f} MiB" for k, v in series.items()), flush=True)
    growth = {}
    for key, values in series.items():
        early = float(np.mean(values[warmup:warmup + 20]))
        late = float(np.mean(values[-20:]))
        growth[key] = (early, late, 100.0 * (late - early) / early)
    print(f"{name}: {iterations} iterations in {time.perf_counter() - start:.0f} s; RSS "
          f"mean of iterations {warmup + 1}-{warmup + 20} -> last 20:")
    for key, (early, late, pct) in growth.items():
        print(f"  {key:8s} {early:7.1f} -> {late:7.1f} MiB  ({pct:+.1f}%)")
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppo-iterations", type=int, default=300)
    parser.add_argument("--dqn-iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    import ray

    from flowrl import get_agent_class
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ppo = get_agent_class("PPO")(config={
        "num_workers": 2, "num_cpus_per_worker": 0.5, "num_envs_per_worker": 4,
        "rollout_fragment_length": 128, "train_batch_size": 1024,
        "sgd_minibatch_size": 128, "num_sgd_iter": 4, "seed": 0},
        env="CartPole-v1", log_to_disk=True)
    try:
        track("PPO", ppo, args.ppo_iterations, args.warmup)
    finally:
        ppo.stop()
    dqn = get_agent_class("DQN")(config={
        "num_workers": 1, "num_cpus_per_worker": 0.5, "buffer_size": 20000,
        "learning_starts": 1000, "timesteps_per_iteration": 1000, "seed": 0},
        env="CartPole-v1", log_to_disk=True)
    try:
        track("DQN", dqn, args.dqn_iterations, args.warmup)
    finally:
        dqn.stop()
    ray.shutdown()


if __name__ == "__main__":
    main()
