"""Ape-X DQN (Horgan et al. 2018): many exploring actors, sharded prioritized replay,
one learner thread.

    (1) rollouts(async, num_async=2) -> StoreToReplay(shards) -> UpdateWorkerWeights
    (2) Replay(shards, num_async=4) -> Enqueue(learner.inqueue)
    (3) Dequeue(learner.outqueue) -> UpdatePriorities -> CountTrainedSteps
            -> UpdateTargetNetwork(by_steps_trained)
    Concurrently([1, 2, 3], async, output_indexes=[2] (0-based: results of 3)) -> report
        (episode stats from the lowest-epsilon third of the workers)
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import merge_config, require
from flowrl.flow import Metrics, Plan
from flowrl.ops import (Concurrently, CountTrainedSteps, Dequeue, Enqueue, LearnerThread,
                        ParallelRollouts, Replay, StandardMetricsReporting, StoreToReplay,
                        UpdatePriorities, UpdateTargetNetwork, UpdateWorkerWeights)
from flowrl.plans.dqn import DEFAULT_CONFIG as DQN_CONFIG
from flowrl.plans.dqn import validate_dqn_config
from flowrl.policies.dqn import DQNTorchPolicy
from flowrl.replay.actor import ReplayShards
from flowrl.replay.checkpoint import ReplayCheckpoint
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = merge_config(DQN_CONFIG, {
    "num_workers": "auto",          # one per spare CPU (at least 2)
    "num_cpus_per_worker": "auto",  # spare CPUs shared among workers, at most 1 each
    "num_gpus": "auto",             # the learner takes a GPU when there is one
    "num_replay_buffer_shards": "auto",
    "num_envs_per_worker": 1,
    "rollout_fragment_length": 50,
    "train_batch_size": 512,
    "n_step": 3,
    "lr": 1e-4,
    "adam_epsilon": 1.5e-4,
    "grad_clip": 40.0,
    "model": {"fcnet_hiddens": [256], "fcnet_activation": "relu"},
    "hiddens": [256],
    "buffer_size": 1_000_000,       # total over the shards; ~7 GB of Atari frames
    "learning_starts": 20000,
    "prioritized_replay_beta_annealing_timesteps": 2_000_000,
    "target_network_update_freq": 50000,  # trained steps
    "per_worker_exploration": True,
    "worker_side_prioritization": True,
    "max_weight_sync_delay": 400,
    "learner_queue_size": 16,
    "learner_stall_warning_s": 60.0,  # warn when queued work sees no update this long
    "timesteps_per_iteration": 25000,
    "min_iter_time_s": 10,
})


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    shards = ReplayShards(config, config["num_replay_buffer_shards"])  # dead ones replaced
    learner = LearnerThread(workers.local_worker(), metrics, config["learner_queue_size"],
                            config["learner_stall_warning_s"])
    learner.start()
    # (1) sample, store, and refresh each worker's weights now and then
    store_op = (ParallelRollouts(workers, metrics, mode="async", num_async=2,
                                 with_source=True)
                .for_each(StoreToReplay(actors=shards.actors))
                .for_each(UpdateWorkerWeights(learner, workers, metrics,
                                              config["max_weight_sync_delay"])))
    # (2) replay into the learner thread, remembering each batch's shard
    replay_op = Replay(metrics, actors=shards.actors, num_async=4,
                       on_actor_failure=shards.handle_failure).for_each(
        Enqueue(learner.inqueue))
    # (3) learner results: priorities back to their shard, count, target updates
    update_op = (Dequeue(learner.outqueue, learner.check_alive, metrics)
                 .for_each(UpdatePriorities(metrics))
                 .for_each(CountTrainedSteps(metrics))
                 .for_each(UpdateTargetNetwork(workers, metrics,
                                               config["target_network_update_freq"],
                                               by_steps_trained=True)))
    merged = Concurrently([store_op, replay_op, update_op], mode="async",
                          output_indexes=[2])
    # Report the returns of the least-exploring third of the workers (asked each
    # iteration: a dead worker's replacement takes its place).
    def least_exploring() -> list:
        remote = workers.remote_workers()
        return remote[-max(1, len(remote) // 3):]

    plan = StandardMetricsReporting(merged, workers, config, metrics,
                                    selected_workers=least_exploring,
                                    extra_stats=lambda: {"replay": shards.stats()})
    return plan.owning(shards, learner).saving(  # stopped in reverse: learner first
        replay=ReplayCheckpoint(shards.actors, enabled=config["checkpoint_replay_buffer"]))


class ApexAgent(Agent):
    """Ape-X DQN; see the module docstring for the plan."""

    _name = "APEX"
    _default_config = DEFAULT_CONFIG
    _policy_class = DQNTorchPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        validate_dqn_config(config)
        require(config["num_workers"] >= 1,
                f"num_workers={config['num_workers']!r}: Ape-X needs remote workers (>= 1).")
        require(config["num_replay_buffer_shards"] >= 1,
                f"num_replay_buffer_shards={config['num_replay_buffer_shards']!r} must be "
                ">= 1.")
