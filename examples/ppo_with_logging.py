"""A custom plan: PPO with two operators of our own, built with ``build_agent``.

    python examples/ppo_with_logging.py
    python scripts/train.py --run examples/ppo_with_logging.py:PPOWithLogging \\
        --env CartPole-v1 --stop '{"episode_reward_mean": 150}'

``DropZeroLengthBatches`` is a filter (a batch with no rows never reaches the learner)
and ``LogBatchStats`` watches every train batch: it counts the batches and the episodes
that ended in them (counters show up under ``result["info"]``) and logs the batch's
mean reward every ``log_every`` batches. Everything else is the stock PPO plan.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from flowrl import build_agent
from flowrl.flow import Metrics, Plan
from flowrl.ops import (BroadcastWeights, ConcatBatches, ParallelRollouts,
                        StandardizeFields, StandardMetricsReporting, TrainOneStep)
from flowrl.plans.ppo import DEFAULT_CONFIG, UpdateKL
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.data import SampleBatch
from flowrl.workers.worker_set import WorkerSet

logger = logging.getLogger("ppo_with_logging")


def DropZeroLengthBatches(batch: SampleBatch) -> bool:
    """Filter: ``rollouts.filter(DropZeroLengthBatches)`` keeps batches with rows."""
    return batch.count > 0


class LogBatchStats:
    """Counts train batches and finished episodes; logs the mean reward now and then.

        train_batches.for_each(LogBatchStats(metrics, log_every=10))

    Counters: num_batches_logged, num_episodes_in_batches.
    """

    def __init__(self, metrics: Metrics, log_every: int = 10):
        self.metrics = metrics
        self.log_every = log_every

    def __call__(self, batch: SampleBatch) -> SampleBatch:
        self.metrics.inc("num_batches_logged")
        ended = np.count_nonzero(batch[SampleBatch.TERMINATEDS] | batch[SampleBatch.TRUNCATEDS])
        self.metrics.inc("num_episodes_in_batches", int(ended))
        if self.metrics.get("num_batches_logged") % self.log_every == 0:
            logger.info("batch %d: %d rows, mean reward %.3f",
                        self.metrics.get("num_batches_logged"), batch.count,
                        float(np.mean(batch[SampleBatch.REWARDS])))
        return batch

    def __repr__(self) -> str:
        return f"LogBatchStats(every {self.log_every})"


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
    train_op = (rollouts
                .filter(DropZeroLengthBatches)
                .combine(ConcatBatches(config["train_batch_size"], metrics))
                .for_each(LogBatchStats(metrics, config["log_every"]))
                .for_each(StandardizeFields(["advantages"]))
                .for_each(TrainOneStep(workers, metrics, num_sgd_iter=config["num_sgd_iter"],
                                       sgd_minibatch_size=config["sgd_minibatch_size"]))
                .for_each(UpdateKL(workers))
                .for_each(BroadcastWeights(workers, metrics)))
    return StandardMetricsReporting(train_op, workers, config, metrics)


PPOWithLogging = build_agent("PPOWithLogging", {**DEFAULT_CONFIG, "log_every": 10},
                             PPOTorchPolicy, execution_plan)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop-reward", type=float, default=150.0)
    parser.add_argument("--max-iterations", type=int, default=40)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    agent = PPOWithLogging(env="CartPole-v1", config={"seed": 0, "log_every": 5})
    try:
        for _ in range(args.max_iterations):
            result = agent.train()
            print(f"iter {result['training_iteration']}  reward "
                  f"{result['episode_reward_mean']:.1f}  batches "
                  f"{result['info']['num_batches_logged']}", flush=True)
            if result["episode_reward_mean"] >= args.stop_reward:
                break
        return result
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
