"""DQN: double-Q, dueling, n-step, prioritized replay (Mnih et al.; Hessel et al.).

    (1) store:  rollouts(bulk_sync) -> StoreToReplay -> BroadcastWeights
    (2) replay: Replay -> TrainOneStep -> UpdatePriorities -> UpdateTargetNetwork
    Concurrently([1, 2], round_robin, output_indexes=[1] (0-based: results of 2),
                 weights from training_intensity) -> report
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.flow import Metrics, Plan
from flowrl.ops import (BroadcastWeights, Concurrently, ParallelRollouts, Replay,
                        StandardMetricsReporting, StoreToReplay, TrainOneStep,
                        UpdatePriorities, UpdateTargetNetwork)
from flowrl.policies.dqn import DQNTorchPolicy
from flowrl.replay.actor import ReplayActor
from flowrl.replay.checkpoint import ReplayCheckpoint
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = with_common_config({
    "num_workers": 0,
    "num_envs_per_worker": 1,
    "rollout_fragment_length": 4,
    "train_batch_size": 32,
    "training_intensity": None,  # replayed steps per sampled step; None = 1 batch per round
    "lr": 1e-3,
    "adam_epsilon": 1e-8,
    "gamma": 0.99,
    "grad_clip": 40.0,
    "model": {"fcnet_hiddens": [64], "fcnet_activation": "relu"},
    "hiddens": [64],             # Q head hidden layers (after the model trunk)
    "dueling": True,
    "double_q": True,
    "n_step": 3,
    "target_network_update_freq": 500,  # sampled steps
    "exploration_config": {"initial_epsilon": 1.0, "final_epsilon": 0.02,
                           "epsilon_timesteps": 10000},
    "per_worker_exploration": False,
    "worker_side_prioritization": False,
    # replay
    "buffer_size": 50000,
    "learning_starts": 1000,
    "prioritized_replay": True,
    "prioritized_replay_alpha": 0.6,
    "prioritized_replay_beta": 0.4,
    "final_prioritized_replay_beta": 1.0,
    "prioritized_replay_beta_annealing_timesteps": 20000,
    "prioritized_replay_eps": 1e-6,
    "timesteps_per_iteration": 1000,
})


def round_robin_weights(config: dict) -> list[float]:
    """Store/replay pulls per round so that replayed/sampled steps = training_intensity."""
    intensity = config["training_intensity"]
    if intensity is None:
        return [1, 1]
    sampled_per_round = (config["rollout_fragment_length"] * config["num_envs_per_worker"]
                         * max(1, config["num_workers"]))
    replays_per_round = intensity * sampled_per_round / config["train_batch_size"]
    return [1, replays_per_round] if replays_per_round >= 1 else [1 / replays_per_round, 1]


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    replay_buffer = ReplayActor(config, shard_index=0, num_shards=1)
    # (1) sample and store; workers get new weights and the timestep (epsilon) each round
    store_op = (ParallelRollouts(workers, metrics, mode="bulk_sync")
                .for_each(StoreToReplay(local_buffer=replay_buffer))
                .for_each(BroadcastWeights(workers, metrics)))
    # (2) replay and learn
    replay_op = (Replay(metrics, local_buffer=replay_buffer)
                 .for_each(TrainOneStep(workers, metrics))
                 .for_each(UpdatePriorities(metrics))
                 .for_each(UpdateTargetNetwork(workers, metrics,
                                               config["target_network_update_freq"])))
    train_op = Concurrently([store_op, replay_op], mode="round_robin", output_indexes=[1],
                            round_robin_weights=round_robin_weights(config))
    return StandardMetricsReporting(
        train_op, workers, config, metrics,
        extra_stats=lambda: {"replay": replay_buffer.stats()}).saving(
        replay=ReplayCheckpoint([replay_buffer], enabled=config["checkpoint_replay_buffer"]))


def validate_dqn_config(config: dict) -> None:
    policies = config["multiagent"]["policies"] or []
    require(len(policies) <= 1,
            f"multiagent.policies has {len(policies)} policies, but a replay-based plan "
            "(DQN, APEX, DDPG, APEX_DDPG) learns one: map all agents to one policy, or "
            "give each policy its own replay as in examples/two_trainer_workflow.py.")
    require(config["n_step"] >= 1, f"n_step={config['n_step']!r} must be >= 1.")
    require(config["buffer_size"] >= config["train_batch_size"],
            f"buffer_size={config['buffer_size']} must be >= train_batch_size="
            f"{config['train_batch_size']}.")
    intensity = config["training_intensity"]
    require(intensity is None or intensity > 0,
            f"training_intensity={intensity!r} must be None or > 0.")
    require(0 <= config["prioritized_replay_alpha"],
            f"prioritized_replay_alpha={config['prioritized_replay_alpha']!r} must be >= 0.")


class DQNAgent(Agent):
    """DQN; see the module docstring for the plan."""

    _name = "DQN"
    _default_config = DEFAULT_CONFIG
    _policy_class = DQNTorchPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        validate_dqn_config(config)
