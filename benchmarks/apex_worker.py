"""Where one APEX Atari worker's time goes: agent steps/s of one rollout worker.

    python benchmarks/apex_worker.py [--game Breakout] [--seconds 20] [--envs 1 4 16]

One ``RolloutWorker`` in this process, set up as Ape-X's remote worker 1 of 14 with
one torch thread (what a worker gets on a 16-core machine) and the network of
``breakout-apex.yaml``. For each number of envs per worker it measures, in
alternating slices so that load from other processes hits all alike:

* ``with priorities``: ``worker_side_prioritization`` on (APEX's default), so each
  fragment also gets its initial priorities;
* ``without``: the same worker with the priorities off: the cost of acting alone.

Beside them, the preprocessed env step rate of one env with random actions and no
policy (:func:`atari_env_rate.preprocessed_step_rate`): the ceiling for one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from atari_env_rate import interleaved_rates, preprocessed_step_rate  # noqa: E402


def apex_worker(game: str, num_envs: int, priorities: bool):
    """Remote worker 1 of 14 with ``breakout-apex.yaml``'s network, 1 torch thread."""
    from flowrl.envs import make_env_creator
    from flowrl.plans.apex import ApexAgent
    from flowrl.policies.dqn import DQNTorchPolicy
    from flowrl.workers.rollout_worker import RolloutWorker

    config = ApexAgent.merge_config({
        "env": game, "num_workers": 14, "num_cpus_per_worker": 1, "num_gpus": 0,
        "num_replay_buffer_shards": 1, "num_envs_per_worker": num_envs,
        "rollout_fragment_length": 50, "worker_side_prioritization": priorities,
        "model": {"fcnet_hiddens": [], "conv_filters": None}, "hiddens": [512],
        "seed": 0})
    return RolloutWorker(make_env_creator(game), DQNTorchPolicy, config,
                         worker_index=1, num_workers=14)


def _sampling_runner(worker):
    """``run(seconds) -> (agent steps, elapsed)`` of ``worker.sample()`` calls."""
    def run(seconds: float) -> tuple[int, float]:
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            steps += worker.sample().count
        return steps, time.perf_counter() - start
    return run


def measure(game: str, envs: list[int], seconds: float, rounds: int = 4) -> list[dict]:
    """Per env count: ``{"envs", "with_priorities", "without"}`` in agent steps/s."""
    rows = []
    for num_envs in envs:
        workers = {"with_priorities": apex_worker(game, num_envs, True),
                   "without": apex_worker(game, num_envs, False)}
        for worker in workers.values():
            worker.sample()  # warm-up: torch's first calls, env resets
        rates = interleaved_rates({name: _sampling_runner(worker)
                                   for name, worker in workers.items()}, seconds, rounds)
        rows.append({"envs": num_envs, **rates})
        for worker in workers.values():
            worker.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="measuring time per worker and env count (default 20)")
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    raw = preprocessed_step_rate(args.game, seconds=args.seconds / 2)
    print(f"{args.game}: preprocessed env steps/s, 1 env, random actions: {raw:,.0f}")
    print("| envs per worker | with priorities (steps/s) | without | with / without "
          "| with / env alone |")
    print("| --- | --- | --- | --- | --- |")
    for row in measure(args.game, args.envs, args.seconds):
        print(f"| {row['envs']} | {row['with_priorities']:,.0f} | {row['without']:,.0f} | "
              f"{row['with_priorities'] / row['without']:.2f} | "
              f"{row['with_priorities'] / raw:.0%} |", flush=True)


if __name__ == "__main__":
    main()
