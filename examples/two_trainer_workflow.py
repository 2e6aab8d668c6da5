"""Two trainers, one rollout stream: PPO and DQN policies learn at once in one env.

    python examples/two_trainer_workflow.py

Two CartPoles, one per agent (``MultiCartPole`` with respawning poles): ``agent_0`` is driven by a PPO
policy, ``agent_1`` by a DQN policy. One stream of multi-agent rollouts is duplicated:

    rollouts -> duplicate -+-> SelectExperiences(ppo) -> ConcatBatches -> TrainOneStep (PPO)
                           +-> SelectExperiences(dqn) -> StoreToReplay -> BroadcastWeights
    Replay ({dqn_policy: rows}) -> TrainOneStep -> UpdatePriorities -> UpdateTargetNetwork
    Concurrently([ppo, store, replay], round_robin, weights [1, k, k * dqn_replays_per_store])
    (k = fragments per PPO batch, so every fragment is stored once)

Each policy's own config (lr, batch sizes, model) comes from its entry in
``multiagent.policies``; the results report both under ``policy_reward_mean``.
"""

from __future__ import annotations

import argparse

from flowrl import build_agent, register_env
from flowrl.envs.multi_agent import MultiCartPole
from flowrl.flow import Metrics, Plan
from flowrl.ops import (BroadcastWeights, ConcatBatches, Concurrently, ParallelRollouts,
                        Replay, SelectExperiences, StandardizeFields, StandardMetricsReporting,
                        StoreToReplay, TrainOneStep, UpdatePriorities, UpdateTargetNetwork)
from flowrl.plans import dqn, ppo
from flowrl.policies.dqn import DQNTorchPolicy
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.replay.actor import ReplayActor
from flowrl.replay.checkpoint import ReplayCheckpoint
from flowrl.workers.worker_set import WorkerSet

PPO_ID, DQN_ID = "ppo_policy", "dqn_policy"

# Poles respawn after falling, so both policies act in every step (neither one's
# success starves the other of data); policy rewards are per agent-episode.
register_env("two_cartpoles", lambda ctx: MultiCartPole(
    {"num_agents": 2, "respawn": True, "horizon": 1000, **ctx}))

# Settings of the DQN policy that differ from the PPO ones they share keys with.
DQN_POLICY_CONFIG = {"lr": 1e-3, "train_batch_size": 32, "grad_clip": 40.0,
                     "model": {"fcnet_hiddens": [64], "fcnet_activation": "relu"},
                     "learning_starts": 1000, "target_network_update_freq": 500,
                     "buffer_size": 50000}

DEFAULT_CONFIG = {
    **{k: v for k, v in dqn.DEFAULT_CONFIG.items() if k not in ppo.DEFAULT_CONFIG},
    **ppo.DEFAULT_CONFIG,
    # Both policies' model: DQN's small relu net (the PPO policy learns fine with it).
    "model": dqn.DEFAULT_CONFIG["model"],
    "env": "two_cartpoles",
    "num_envs_per_worker": 1,
    "rollout_fragment_length": 16,
    "train_batch_size": 1024,
    "sgd_minibatch_size": 128,
    "num_sgd_iter": 10,
    "dqn_replays_per_store": 2,   # replayed batches of 32 per 16-step fragment
    "timesteps_per_iteration": 1024,
    "multiagent": {
        "policies": {PPO_ID: {"policy_class": PPOTorchPolicy},
                     DQN_ID: {"policy_class": DQNTorchPolicy, "config": DQN_POLICY_CONFIG}},
        "policy_mapping_fn": {"agent_0": PPO_ID, "agent_1": DQN_ID},
        "policies_to_train": None,
    },
}


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    dqn_config = {**config, **config["multiagent"]["policies"][DQN_ID]["config"]}
    replay_buffer = ReplayActor(dqn_config, shard_index=0, num_shards=1)
    rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
    ppo_rollouts, dqn_rollouts = rollouts.duplicate(n=2)
    ppo_op = (ppo_rollouts
              .for_each(SelectExperiences([PPO_ID]))
              # PPO learns on train_batch_size rows of its own agents
              .combine(ConcatBatches(config["train_batch_size"], metrics,
                                     count_steps_by="agent_steps"))
              .for_each(StandardizeFields(["advantages"]))
              .for_each(TrainOneStep(workers, metrics, num_sgd_iter=config["num_sgd_iter"],
                                     sgd_minibatch_size=config["sgd_minibatch_size"]))
              .for_each(ppo.UpdateKL(workers)))
    store_op = (dqn_rollouts
                .for_each(SelectExperiences([DQN_ID]))
                .for_each(StoreToReplay(local_buffer=replay_buffer))
                .for_each(BroadcastWeights(workers, metrics)))  # epsilon follows timesteps
    # The buffer holds dqn_policy's rows only and replays them as {dqn_policy: rows}.
    replay_op = (Replay(metrics, local_buffer=replay_buffer)
                 .for_each(TrainOneStep(workers, metrics))
                 .for_each(UpdatePriorities(metrics, policy_id=DQN_ID))
                 .for_each(UpdateTargetNetwork(workers, metrics,
                                               dqn_config["target_network_update_freq"])))
    # One PPO batch takes several fragments: store (and replay for) as many per round.
    fragment = config["rollout_fragment_length"] * config["num_envs_per_worker"] * max(
        1, config["num_workers"])
    fragments_per_ppo_batch = -(-config["train_batch_size"] // fragment)
    train_op = Concurrently(
        [ppo_op, store_op, replay_op], mode="round_robin", output_indexes=[0, 2],
        round_robin_weights=[1, fragments_per_ppo_batch,
                             fragments_per_ppo_batch * config["dqn_replays_per_store"]])
    return StandardMetricsReporting(
        train_op, workers, config, metrics,
        extra_stats=lambda: {"replay": replay_buffer.stats()}).saving(
        replay=ReplayCheckpoint([replay_buffer], enabled=config["checkpoint_replay_buffer"]))


TwoTrainerWorkflow = build_agent("TwoTrainerWorkflow", DEFAULT_CONFIG, PPOTorchPolicy,
                                 execution_plan)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop-reward", type=float, default=150.0,
                        help="stop when both policies' mean reward reach this")
    parser.add_argument("--max-timesteps", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    agent = TwoTrainerWorkflow(config={"seed": args.seed})
    try:
        while True:
            result = agent.train()
            rewards = result.get("policy_reward_mean", {})
            print(f"iter {result['training_iteration']}  ts {result['timesteps_total']}  "
                  + "  ".join(f"{pid} {r:.1f}" for pid, r in sorted(rewards.items())),
                  flush=True)
            if (len(rewards) == 2 and min(rewards.values()) >= args.stop_reward) or \
                    result["timesteps_total"] >= args.max_timesteps:
                return result
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
