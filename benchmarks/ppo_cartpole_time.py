"""Wall time for PPO to reach a return on CartPole-v1, start-up included.

    python benchmarks/ppo_cartpole_time.py                 # both configurations, 3 seeds
    python benchmarks/ppo_cartpole_time.py --seeds 0 1 2 3 4 --target 450

Each run is a fresh Python process: the clock starts before ``import flowrl`` and
stops when ``episode_reward_mean`` (mean of the last 100 episodes) reaches the target.
Configurations: ``fastest`` = flowrl/tuned_examples/cartpole-ppo.yaml (one process,
no Ray); ``2-workers`` = the same with two remote rollout actors.
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
if config.get("num_workers", 0) > 0:
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

CONFIGS = {
    "fastest": {},
    "2-workers": {"num_workers": 2, "num_cpus_per_worker": 0.5, "num_envs_per_worker": 4},
}


def run(name: str, seed: int, target: float, budget: int, example: str) -> dict:
    overrides = {**CONFIGS[name], "seed": seed}
    out = subprocess.run([sys.executable, "-c", CHILD, example, json.dumps(overrides),
                          str(target), str(budget)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=450.0)
    parser.add_argument("--budget", type=int, default=400_000, help="give up after N steps")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--example", default=os.path.join(
        ROOT, "flowrl", "tuned_examples", "cartpole-ppo.yaml"))
    args = parser.parse_args()
    print(f"PPO CartPole-v1 to {args.target:g}, wall time incl. start-up ({os.cpu_count()} cores)")
    for name in args.configs:
        runs = [run(name, seed, args.target, args.budget, args.example) for seed in args.seeds]
        for seed, r in zip(args.seeds, runs):
            print(f"  {name:10s} seed {seed}: {r['seconds']:6.1f} s  {r['steps']:7d} steps  "
                  f"reward {r['reward']:.1f}{'' if r['solved'] else '  (NOT SOLVED)'}")
        times = [r["seconds"] for r in runs]
        print(f"  {name:10s} median {statistics.median(times):.1f} s, max {max(times):.1f} s, "
              f"solved {sum(r['solved'] for r in runs)}/{len(runs)}")


if __name__ == "__main__":
    main()
