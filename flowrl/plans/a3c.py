"""A3C: asynchronous advantage actor-critic (Mnih et al. 2016).

    AsyncGradients (workers sample and compute gradients remotely)
        -> ApplyGradients(update_all=False) (new weights go only to the sender)
        -> StandardMetricsReporting
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import merge_config, require
from flowrl.flow import Metrics, Plan
from flowrl.ops import ApplyGradients, AsyncGradients, StandardMetricsReporting
from flowrl.plans.a2c import DEFAULT_CONFIG as A2C_CONFIG
from flowrl.policies.a2c import A2CTorchPolicy
from flowrl.workers.worker_set import WorkerSet

DEFAULT_CONFIG: dict = merge_config(A2C_CONFIG, {
    "num_workers": 2,
    "num_envs_per_worker": 1,
    "rollout_fragment_length": 20,
    "microbatch_size": None,
    "lr": 1e-3,
    "entropy_coeff": 0.01,
    "grad_clip": 40.0,
    "min_iter_time_s": 1,
})


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    train_op = AsyncGradients(workers, metrics).for_each(
        ApplyGradients(workers, metrics, update_all=False))
    return StandardMetricsReporting(train_op, workers, config, metrics)


class A3CAgent(Agent):
    """A3C; see the module docstring for the plan."""

    _name = "A3C"
    _default_config = DEFAULT_CONFIG
    _policy_class = A2CTorchPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        require(config["num_workers"] >= 1,
                f"num_workers={config['num_workers']!r}: A3C needs remote workers (>= 1).")
