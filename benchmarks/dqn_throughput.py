"""Single-process DQN env steps/s on CartPole-v1: flowrl beside Stable-Baselines3.

    python benchmarks/dqn_throughput.py                      # this tree vs SB3
    python benchmarks/dqn_throughput.py --tree before=/tmp/dqn_before --tree after=.

Both sides run SB3's DQN update ratio: one 32-row gradient step per 4 env steps
(flowrl: ``rollout_fragment_length`` 4, ``train_batch_size`` 32, one replayed batch per
round, i.e. 8 replayed rows per sampled step), after the same ``learning_starts``, with
the same Q network (SB3's default MLP: obs -> 64 -> 64 -> actions, ReLU; flowrl: a
[64] trunk plus a [64] head, not dueling), 1-step targets without double Q (SB3's
DQN), the same target update interval, buffer size, epsilon schedule (SB3's
``exploration_fraction`` 0.1 of the run, final 0.05), grad-norm clip 10, lr 1e-4 and
one torch thread. SB3 has uniform replay only; flowrl runs with prioritized replay
on and off.

Every run is a fresh process (``--sb3-python`` for SB3, this interpreter with
``PYTHONPATH=<tree>`` for each flowrl tree); the clock covers the training loop only
(SB3 ``model.learn``; flowrl ``agent.train()`` until ``--steps``), not imports or
construction. Runs alternate (SB3, then each flowrl variant, repeat) so that load from
other processes hits all sides alike; the medians are reported, as env steps per
wall-clock second and per CPU second of the process (``time.process_time``; less
sensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SB3 = "SB3 (uniform)"

SB3_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import gymnasium as gym
from stable_baselines3 import DQN
args = json.loads(sys.argv[1])
model = DQN("MlpPolicy", gym.make("CartPole-v1"), learning_starts=args["learning_starts"],
            batch_size=32, train_freq=4, gradient_steps=1, learning_rate=1e-4,
            buffer_size=args["buffer_size"], max_grad_norm=10.0,
            target_update_interval=args["target_update"],
            policy_kwargs={"net_arch": [64, 64]}, seed=args["seed"], device="cpu")
start, cpu_start = time.perf_counter(), time.process_time()
model.learn(total_timesteps=args["steps"])
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
print(json.dumps({"steps": model.num_timesteps, "seconds": seconds, "cpu": cpu}))
"""

FLOWRL_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import flowrl
from flowrl.plans.dqn import DQNAgent
args = json.loads(sys.argv[1])
config = {
    "num_workers": 0, "num_envs_per_worker": 1, "rollout_fragment_length": 4,
    "train_batch_size": 32, "training_intensity": 8, "learning_starts": args["learning_starts"],
    "buffer_size": args["buffer_size"], "target_network_update_freq": args["target_update"],
    "prioritized_replay": args["prioritized"], "lr": 1e-4, "grad_clip": 10.0,
    "model": {"fcnet_hiddens": [64], "fcnet_activation": "relu"}, "hiddens": [64],
    "dueling": False, "double_q": False, "n_step": 1,
    "exploration_config": {"initial_epsilon": 1.0, "final_epsilon": 0.05,
                           "epsilon_timesteps": int(0.1 * args["steps"])},
    "timesteps_per_iteration": 1000, "num_cpus_for_driver": 1, "seed": args["seed"],
}
agent = DQNAgent(config=config, env="CartPole-v1", log_to_disk=False)
start, cpu_start = time.perf_counter(), time.process_time()
steps = 0
while steps < args["steps"]:
    result = agent.train()
    steps = result["timesteps_total"]
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
trained = result["info"]["num_steps_trained"]
print(json.dumps({"steps": steps, "seconds": seconds, "cpu": cpu, "trained": trained,
                  "file": flowrl.__file__}))
"""


class Variant(NamedTuple):
    """One side of the comparison: which interpreter runs which child with which args."""

    name: str
    python: str
    code: str
    args: dict
    pythonpath: str | None  # the flowrl tree (None for SB3)


def run_child(variant: Variant) -> dict:
    """One run in a fresh process; cwd is a scratch dir so only PYTHONPATH picks flowrl."""
    env = dict(os.environ)
    if variant.pythonpath is not None:
        env["PYTHONPATH"] = variant.pythonpath
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run([variant.python, "-c", variant.code, json.dumps(variant.args)],
                             capture_output=True, text=True, cwd=scratch, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_trees(specs: list[str]) -> list[tuple[str, str]]:
    """``label=path`` pairs (default: this tree as ``flowrl``)."""
    if not specs:
        return [("flowrl", ROOT)]
    trees = []
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--tree wants label=path, got {spec!r}")
        trees.append((label, os.path.abspath(path)))
    return trees


def build_variants(args: argparse.Namespace) -> list[Variant]:
    """SB3 (unless ``--no-sb3``), then every flowrl tree with PER on and off."""
    shared = {"steps": args.steps, "learning_starts": args.learning_starts,
              "target_update": args.target_update, "buffer_size": args.buffer_size,
              "seed": args.seed}
    variants = [] if args.no_sb3 else [
        Variant(SB3, args.sb3_python, SB3_CHILD, shared, None)]
    for label, path in parse_trees(args.tree):
        for prioritized in (True, False):
            variants.append(Variant(f"{label} ({'PER' if prioritized else 'uniform'})",
                                    sys.executable, FLOWRL_CHILD,
                                    {**shared, "prioritized": prioritized}, path))
    return variants


def run_alternating(variants: list[Variant], repeats: int
                    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Env steps per wall-clock second and per CPU second of every run, by variant."""
    wall = {v.name: [] for v in variants}
    cpu = {v.name: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants:
            r = run_child(variant)
            wall[variant.name].append(r["steps"] / r["seconds"])
            cpu[variant.name].append(r["steps"] / r["cpu"])
            extra = f", {r['trained']} rows trained" if "trained" in r else ""
            if "file" in r and repeat == 0:
                extra += f", {os.path.dirname(os.path.dirname(r['file']))}"
            print(f"  [{repeat + 1}] {variant.name:20s} {wall[variant.name][-1]:6.0f} steps/s "
                  f"wall, {cpu[variant.name][-1]:6.0f} per CPU second  ({r['steps']} steps in "
                  f"{r['seconds']:.2f} s, {r['cpu']:.2f} s CPU{extra})", flush=True)
    return wall, cpu


def report(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """Medians and their ratios to SB3's."""
    print("median env steps/s (wall clock | per CPU second of the process):")
    for name in wall:
        line = f"  {name:20s} {statistics.median(wall[name]):6.0f} | " \
               f"{statistics.median(cpu[name]):6.0f}"
        if SB3 in wall and name != SB3:
            line += (f"   {statistics.median(wall[name]) / statistics.median(wall[SB3]):.2f}x"
                     f" | {statistics.median(cpu[name]) / statistics.median(cpu[SB3]):.2f}x SB3")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--target-update", type=int, default=500)
    parser.add_argument("--buffer-size", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", action="append", default=[],
                        help="label=path of a flowrl source tree (repeatable)")
    parser.add_argument("--sb3-python", default="/work/sb3venv/bin/python")
    parser.add_argument("--no-sb3", action="store_true")
    args = parser.parse_args()
    print(f"DQN CartPole-v1, {args.steps} env steps, 1 gradient step (32 rows) per 4 env "
          f"steps after {args.learning_starts}, 1 torch thread, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    report(*run_alternating(build_variants(args), args.repeats))


if __name__ == "__main__":
    main()
