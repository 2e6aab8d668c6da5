"""Wall time for an agent to reach a mean return, start-up included.

    python benchmarks/time_to_reward.py flowrl/tuned_examples/cartpole-ppo.yaml --target 450
    python benchmarks/time_to_reward.py flowrl/tuned_examples/cartpole-ppo.yaml --target 450 \\
        --override '{"num_workers": 2, "num_cpus_per_worker": 0.5, "num_envs_per_worker": 4}'
    python benchmarks/time_to_reward.py flowrl/tuned_examples/cartpole-dqn.yaml --target 150
    python benchmarks/time_to_reward.py flowrl/tuned_examples/cartpole-apex.yaml --target 150

Each seed runs in a fresh Python process: the clock starts before ``import flowrl`` and
stops when ``episode_reward_mean`` (mean of the last 100 episodes) reaches the target.
Ray is started inside the run (2 CPUs) when the config has remote workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import yaml
import flowrl
spec = next(iter(yaml.safe_load(open(sys.argv[1])).values()))
config = {**spec["config"], **json.loads(sys.argv[2])}
target, budget = float(sys.argv[3]), int(sys.argv[4])
if config.get("num_workers", 0) != 0:
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
agent = flowrl.get_agent_class(spec["run"])(config=config, env=spec["env"], log_to_disk=False)
while True:
    r = agent.train()
    if r["episode_reward_mean"] >= target or r["timesteps_total"] >= budget:
        break
print(json.dumps({"seconds": time.perf_counter() - start, "steps": r["timesteps_total"],
                  "reward": r["episode_reward_mean"], "solved": r["episode_reward_mean"] >= target}))
"""


def run(example: str, overrides: dict, target: float, budget: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, example, json.dumps(overrides),
                          str(target), str(budget)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"run failed ({overrides}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("example", help="a tuned example YAML")
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=400_000, help="give up after N steps")
    parser.add_argument("--override", default="{}", help="config overrides as JSON")
    args = parser.parse_args()
    overrides = json.loads(args.override)
    print(f"{os.path.basename(args.example)} {overrides or ''} to {args.target:g}, wall "
          f"time incl. start-up ({os.cpu_count()} cores)")
    runs = [run(args.example, {**overrides, "seed": seed}, args.target, args.budget)
            for seed in args.seeds]
    for seed, r in zip(args.seeds, runs):
        print(f"  seed {seed}: {r['seconds']:6.1f} s  {r['steps']:7d} steps  reward "
              f"{r['reward']:.1f}{'' if r['solved'] else '  (NOT SOLVED)'}")
    times = [r["seconds"] for r in runs]
    print(f"  median {statistics.median(times):.1f} s, max {max(times):.1f} s, solved "
          f"{sum(r['solved'] for r in runs)}/{len(runs)}")


if __name__ == "__main__":
    main()
