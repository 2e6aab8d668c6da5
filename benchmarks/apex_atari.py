"""APEX on Atari: sampled and trained steps/s beside the raw preprocessed ALE step rate.

    python benchmarks/apex_atari.py [--game Breakout] [--seconds 60] [--num-workers 2]

Measured in one run on this machine:
1. the raw preprocessed step rate of one env in one process (random actions, no policy);
2. APEX before learning starts (``learning_starts`` out of reach): sampled steps/s in
   total and per worker, and the ratio per worker / raw;
3. APEX while learning: sampled and trained steps/s (trained = rows the learner
   consumed), after a warm-up that fills ``learning_starts``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from atari_env_rate import preprocessed_step_rate  # noqa: E402


def apex_rates(game: str, seconds: float, num_workers: int, learning: bool,
               num_envs: int) -> dict:
    from flowrl.plans.apex import ApexAgent

    config = {"num_workers": num_workers, "num_cpus_per_worker": "auto", "num_gpus": "auto",
              "num_envs_per_worker": num_envs, "buffer_size": 100_000,
              "learning_starts": 2_000 if learning else 10**9,
              "timesteps_per_iteration": 0, "min_iter_time_s": 5}
    agent = ApexAgent(config=config, env=game, log_to_disk=False)
    try:
        # Warm-up: actors start, torch initializes, replay fills past learning_starts.
        result = agent.train()
        while learning and result["info"].get("num_steps_trained", 0) == 0:
            result = agent.train()
        sampled0 = result["info"]["num_steps_sampled"]
        trained0 = result["info"].get("num_steps_trained", 0)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            result = agent.train()
        elapsed = time.perf_counter() - start
        return {"sampled": (result["info"]["num_steps_sampled"] - sampled0) / elapsed,
                "trained": (result["info"].get("num_steps_trained", 0) - trained0) / elapsed,
                "num_workers": agent.config["num_workers"]}
    finally:
        agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--num-envs-per-worker", type=int, default=1)
    args = parser.parse_args()
    import ray
    ray.init(include_dashboard=False, log_to_driver=False)
    raw = preprocessed_step_rate(args.game, seconds=10.0)
    print(f"{args.game}: raw preprocessed step rate (1 env, 1 process): {raw:,.0f} steps/s")
    for learning in (False, True):
        r = apex_rates(args.game, args.seconds, args.num_workers, learning,
                       args.num_envs_per_worker)
        per_worker = r["sampled"] / r["num_workers"]
        phase = "while learning" if learning else "before learning"
        print(f"APEX {phase}: {r['num_workers']} workers x {args.num_envs_per_worker} env(s): "
              f"sampled {r['sampled']:,.0f} steps/s ({per_worker:,.0f} per worker = "
              f"{per_worker / raw:.0%} of raw), trained {r['trained']:,.0f} steps/s",
              flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
