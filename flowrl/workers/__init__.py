"""Rollout workers: sampling from envs with a policy, locally or as Ray actors."""

from flowrl.workers.rollout_worker import RolloutWorker, worker_seed
from flowrl.workers.worker_set import WorkerSet

__all__ = ["RolloutWorker", "WorkerSet", "worker_seed"]
