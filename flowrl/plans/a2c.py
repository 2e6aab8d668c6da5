"""Advantage actor-critic (synchronous A3C).

    rollouts(bulk_sync) -> ConcatBatches(train_batch_size) -> TrainOneStep
        -> BroadcastWeights -> StandardMetricsReporting
  with ``microbatch_size``, gradients are accumulated over microbatches instead:
    rollouts(bulk_sync) -> ConcatBatches(microbatch_size) -> ComputeGradients
        -> batch(train_batch_size // microbatch_size) -> AverageGradients
        -> ApplyGradients(update_all) -> StandardMetricsReporting
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.flow import Metrics, Plan
from flowrl.ops import (ApplyGradients, AverageGradients, BroadcastWeights, ComputeGradients,
                        ConcatBatches, ParallelRollouts, StandardMetricsReporting,
                        TrainOneStep)
from flowrl.policies.a2c import A2CTorchPolicy
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = with_common_config({
    "num_workers": 0,
    "num_envs_per_worker": 8,
    "rollout_fragment_length": 20,
    "train_batch_size": 160,
    "microbatch_size": None,  # accumulate gradients over microbatches of this many steps
    "lr": 1e-3,
    "gamma": 0.99,
    "use_gae": True,
    # Divide rewards by the running std of the discounted return (per sampling worker),
    # so that value targets are near unit scale whatever the env pays (grad_clip is
    # a norm over policy and value gradients together). Metrics report raw rewards.
    # "auto": on where the worker's own sampler steps the envs (not for multi-agent or
    # served envs, where True is an error).
    "normalize_rewards": "auto",
    "lambda": 1.0,
    "use_critic": True,
    "vf_loss_coeff": 0.5,
    "entropy_coeff": 0.01,
    "grad_clip": 0.5,
})


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
    if config["microbatch_size"]:
        num_microbatches = max(1, config["train_batch_size"] // config["microbatch_size"])
        train_op = (rollouts
                    .combine(ConcatBatches(config["microbatch_size"], metrics))
                    .for_each(ComputeGradients(workers, metrics))
                    .batch(num_microbatches)
                    .for_each(AverageGradients())
                    .for_each(ApplyGradients(workers, metrics)))
    else:
        train_op = (rollouts
                    .combine(ConcatBatches(config["train_batch_size"], metrics))
                    .for_each(TrainOneStep(workers, metrics))
                    .for_each(BroadcastWeights(workers, metrics)))
    return StandardMetricsReporting(train_op, workers, config, metrics)


class A2CAgent(Agent):
    """Synchronous advantage actor-critic; see the module docstring for the plan."""

    _name = "A2C"
    _default_config = DEFAULT_CONFIG
    _policy_class = A2CTorchPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        mb = config["microbatch_size"]
        require(mb is None or (isinstance(mb, int) and 1 <= mb <= config["train_batch_size"]),
                f"microbatch_size={mb!r} must be None or an int in [1, train_batch_size="
                f"{config['train_batch_size']}].")
