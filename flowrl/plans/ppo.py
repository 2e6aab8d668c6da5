"""Proximal policy optimization (clipped surrogate + adaptive KL penalty).

    rollouts(bulk_sync) -> SelectExperiences -> ConcatBatches(train_batch_size)
        -> StandardizeFields(advantages) -> TrainOneStep(num_sgd_iter, sgd_minibatch_size)
        -> UpdateKL -> BroadcastWeights -> StandardMetricsReporting
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.data.items import TrainedBatch, expect_item
from flowrl.flow import Metrics, Plan
from flowrl.ops import (BroadcastWeights, ConcatBatches, ParallelRollouts, SelectExperiences,
                        StandardMetricsReporting, StandardizeFields, TrainOneStep)
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = with_common_config({
    "num_workers": 0,
    "num_envs_per_worker": 8,
    "rollout_fragment_length": 256,
    "train_batch_size": 2048,
    "sgd_minibatch_size": 64,
    "num_sgd_iter": 10,
    "lr": 3e-4,
    "gamma": 0.99,
    "lambda": 0.95,
    "use_gae": True,
    # Divide rewards by the running std of the discounted return (per sampling worker),
    # so that advantages and value targets are near unit scale whatever the env pays.
    # Metrics report raw rewards. Measured: Pendulum -1045 -> -200 and LunarLander
    # 7 -> 107 at their budgets (docs/LEARNING.md); CartPole unchanged.
    # "auto": on where the worker's own sampler steps the envs (not for multi-agent or
    # served envs, where True is an error).
    "normalize_rewards": "auto",
    # "auto": a running mean/std normalization of flat float observations (none for
    # images or discrete observations). HalfCheetah-v5 at 200k steps: 7 -> 867.
    "observation_filter": "auto",
    "use_critic": True,
    "clip_param": 0.2,
    # Off: an absolute clip on the value change (RLlib's old default was 10) stops the
    # critic from learning on any task whose returns run into the hundreds. A number
    # clips each update's change of V(s) to +-vf_clip_param, in the reward's own units.
    "vf_clip_param": None,
    "vf_loss_coeff": 0.5,
    "entropy_coeff": 0.0,
    "kl_coeff": 0.2,
    "kl_target": 0.01,
    "grad_clip": 0.5,
})


class UpdateKL:
    """Adapts each policy's KL penalty coefficient toward ``kl_target``.

        ... .for_each(TrainOneStep(...)).for_each(UpdateKL(workers))

    Reads the ``kl`` learner stat of TrainOneStep's ``TrainedBatch``; passes it through.
    No counters.
    """

    def __init__(self, workers: WorkerSet):
        self.workers = workers

    def __call__(self, item: TrainedBatch) -> TrainedBatch:
        info = expect_item("UpdateKL", item, TrainedBatch).info
        for pid, stats in info.items():
            if "kl" in stats:
                self.workers.local_worker().get_policy(pid).update_kl(stats["kl"])
        return item

    def __repr__(self) -> str:
        return "UpdateKL"


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
    train_op = (rollouts
                .for_each(SelectExperiences(workers.policies_to_train()))
                .combine(ConcatBatches(config["train_batch_size"], metrics))
                .for_each(StandardizeFields(["advantages"]))
                .for_each(TrainOneStep(workers, metrics,
                                       num_sgd_iter=config["num_sgd_iter"],
                                       sgd_minibatch_size=config["sgd_minibatch_size"]))
                .for_each(UpdateKL(workers))
                .for_each(BroadcastWeights(workers, metrics)))
    return StandardMetricsReporting(train_op, workers, config, metrics)


class PPOAgent(Agent):
    """PPO; see the module docstring for the plan."""

    _name = "PPO"
    _default_config = DEFAULT_CONFIG
    _policy_class = PPOTorchPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        require(config["sgd_minibatch_size"] <= config["train_batch_size"],
                f"sgd_minibatch_size={config['sgd_minibatch_size']} must be <= "
                f"train_batch_size={config['train_batch_size']}.")
        require(config["num_sgd_iter"] >= 1,
                f"num_sgd_iter={config['num_sgd_iter']!r} must be >= 1.")
        require(config["clip_param"] > 0, f"clip_param={config['clip_param']!r} must be > 0.")
        vf_clip = config["vf_clip_param"]
        require(vf_clip is None or vf_clip > 0,
                f"vf_clip_param={vf_clip!r} must be None (off) or > 0.")
