"""A DQN variant with its own replay schedule, built from the stock operators.

    python examples/dqn_replay_schedule.py
    python scripts/train.py --run examples/dqn_replay_schedule.py:DQNBurstReplay \\
        --env CartPole-v1 --stop '{"episode_reward_mean": 150}'

Stock DQN interleaves one stored fragment with replay at a fixed ratio. Here training
happens in bursts: ``burst_every`` fragments are stored, then ``burst_size`` replayed
batches are trained on back to back (``Concurrently`` with weights
``[burst_every, burst_size]``), and priorities are off (uniform replay). A burst that
follows a long collection phase is how some off-policy systems trade freshness for
fewer weight syncs.
"""

from __future__ import annotations

import argparse

from flowrl import build_agent
from flowrl.flow import Metrics, Plan
from flowrl.ops import (BroadcastWeights, Concurrently, ParallelRollouts, Replay,
                        StandardMetricsReporting, StoreToReplay, TrainOneStep,
                        UpdateTargetNetwork)
from flowrl.plans.dqn import DEFAULT_CONFIG, validate_dqn_config
from flowrl.policies.dqn import DQNTorchPolicy
from flowrl.replay.actor import ReplayActor
from flowrl.replay.checkpoint import ReplayCheckpoint
from flowrl.workers.worker_set import WorkerSet

CONFIG = {**DEFAULT_CONFIG, "prioritized_replay": False, "burst_every": 8, "burst_size": 8,
          "learning_starts": 1000, "target_network_update_freq": 500, "n_step": 3,
          "timesteps_per_iteration": 1000, "hiddens": [64]}


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    replay_buffer = ReplayActor(config, shard_index=0, num_shards=1)
    store_op = (ParallelRollouts(workers, metrics, mode="bulk_sync")
                .for_each(StoreToReplay(local_buffer=replay_buffer))
                .for_each(BroadcastWeights(workers, metrics)))
    replay_op = (Replay(metrics, local_buffer=replay_buffer)
                 .for_each(TrainOneStep(workers, metrics))
                 .for_each(UpdateTargetNetwork(workers, metrics,
                                               config["target_network_update_freq"])))
    train_op = Concurrently([store_op, replay_op], mode="round_robin", output_indexes=[1],
                            round_robin_weights=[config["burst_every"], config["burst_size"]])
    return StandardMetricsReporting(
        train_op, workers, config, metrics,
        extra_stats=lambda: {"replay": replay_buffer.stats()}).saving(
        replay=ReplayCheckpoint([replay_buffer], enabled=config["checkpoint_replay_buffer"]))


def validate(config: dict) -> None:
    validate_dqn_config(config)
    for key in ("burst_every", "burst_size"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]!r} must be >= 1")


DQNBurstReplay = build_agent("DQNBurstReplay", CONFIG, DQNTorchPolicy, execution_plan,
                             validate_config=validate)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop-reward", type=float, default=150.0)
    parser.add_argument("--max-iterations", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    agent = DQNBurstReplay(env="CartPole-v1", config={"seed": args.seed})
    try:
        for _ in range(args.max_iterations):
            result = agent.train()
            print(f"iter {result['training_iteration']}  ts {result['timesteps_total']}  "
                  f"reward {result['episode_reward_mean']:.1f}", flush=True)
            if result["episode_reward_mean"] >= args.stop_reward:
                break
        return result
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
