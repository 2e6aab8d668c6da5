"""Vanilla policy gradient (REINFORCE with discounted returns).

    rollouts(bulk_sync) -> ConcatBatches(train_batch_size) -> StandardizeFields(advantages)
        -> TrainOneStep -> BroadcastWeights -> StandardMetricsReporting

The returns are standardized per train batch (``standardize_returns``): the batch mean
acts as a baseline, so an env whose every return is negative (LunarLander's crashes,
Pendulum) still pushes up the better episodes instead of all of them down.
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import with_common_config
from flowrl.flow import Metrics, Plan
from flowrl.ops import (BroadcastWeights, ConcatBatches, ParallelRollouts,
                        StandardMetricsReporting, StandardizeFields, TrainOneStep)
from flowrl.policies.pg import PGTorchPolicy
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = with_common_config({
    "num_workers": 0,
    "num_envs_per_worker": 8,
    "batch_mode": "complete_episodes",  # returns over whole episodes, no bootstrapping
    "rollout_fragment_length": 50,
    "train_batch_size": 2000,
    "lr": 4e-3,
    "gamma": 0.99,
    # Divide rewards by the running std of the discounted return (per sampling worker);
    # for tasks whose rewards are far from unit scale. Metrics report raw rewards.
    "normalize_rewards": False,
    "standardize_returns": True,  # per train batch: zero mean, unit std
})


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
    train_op = rollouts.combine(ConcatBatches(config["train_batch_size"], metrics))
    if config["standardize_returns"]:
        train_op = train_op.for_each(StandardizeFields(["advantages"]))
    train_op = (train_op
                .for_each(TrainOneStep(workers, metrics))
                .for_each(BroadcastWeights(workers, metrics)))
    return StandardMetricsReporting(train_op, workers, config, metrics)


class PGAgent(Agent):
    """Policy gradient; see the module docstring for the plan."""

    _name = "PG"
    _default_config = DEFAULT_CONFIG
    _policy_class = PGTorchPolicy
    execution_plan = staticmethod(execution_plan)
