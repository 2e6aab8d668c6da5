"""Sampling throughput of IMPALA and APPO vs A2C on CartPole-v1 with 2 workers, in one run.

    python benchmarks/impala_vs_a2c.py [--seconds 20]

All use their default configs with 2 remote workers (0.5 CPU each on this 2-core
machine); sampled and trained env steps/s are measured over ``--seconds`` of training
after a warm-up iteration. IMPALA samples asynchronously while its learner thread trains;
APPO runs the same plan with a costlier loss (a second forward pass through its target
network) and target-network syncs; A2C alternates sampling (a barrier over all workers)
and training.
"""

from __future__ import annotations

import argparse
import time


def agent_class(algorithm: str) -> type:
    if algorithm == "APPO":  # imported directly: works before and after it is registered
        from flowrl.plans.appo import APPOAgent
        return APPOAgent
    from flowrl import get_agent_class
    return get_agent_class(algorithm)


def sampled_rate(algorithm: str, seconds: float) -> tuple[float, float]:
    config = {"num_workers": 2, "num_cpus_per_worker": 0.5, "min_iter_time_s": 1}
    agent = agent_class(algorithm)(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        result = agent.train()
        sampled0 = result["timesteps_total"]
        trained0 = result["info"].get("num_steps_trained", 0)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            result = agent.train()
        elapsed = time.perf_counter() - start
        return ((result["timesteps_total"] - sampled0) / elapsed,
                (result["info"].get("num_steps_trained", 0) - trained0) / elapsed)
    finally:
        agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {name: sampled_rate(name, args.seconds) for name in ("A2C", "IMPALA", "APPO")}
    for name, (sampled, trained) in rates.items():
        print(f"{name:7s} 2 workers: sampled {sampled:9,.0f} steps/s, trained "
              f"{trained:9,.0f} steps/s")
    print(f"IMPALA / A2C sampled: {rates['IMPALA'][0] / rates['A2C'][0]:.2f}x")
    print(f"APPO / IMPALA sampled: {rates['APPO'][0] / rates['IMPALA'][0]:.2f}x, "
          f"trained: {rates['APPO'][1] / rates['IMPALA'][1]:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
