"""Training operators: learn on the local worker, move gradients and weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flowrl.data.items import (AnyBatch, Gradients, TrainedBatch, expect_item,
                               source_and_batch)
from flowrl.flow import Metrics, SourcedItem, from_actors
from flowrl.ops.counters import (APPLY_GRADS_TIMER, GRAD_TIMER, LAST_TARGET_UPDATE_TS,
                                 LEARN_TIMER, LEARNER_INFO, NUM_STEPS_SAMPLED,
                                 NUM_STEPS_TRAINED, NUM_TARGET_UPDATES, NUM_WEIGHT_BROADCASTS,
                                 WEIGHT_SYNC_TIMER)
from flowrl.policies.filters import RunningStat
from flowrl.workers.worker_set import WorkerSet


class TrainOneStep:
    """Trains the local worker's policies on a batch.

        rollouts.combine(ConcatBatches(4000)).for_each(TrainOneStep(workers, metrics,
                                                                    num_sgd_iter=10,
                                                                    sgd_minibatch_size=128))

    Input: a batch, or a ``SourcedItem(shard, batch)`` from Replay. Emits
    ``TrainedBatch(batch, info, source)`` with the learner stats per policy and the
    shard (None for a bare batch), so UpdatePriorities can answer that shard.
    ``num_sgd_iter`` epochs of shuffled minibatches of ``sgd_minibatch_size``
    (0 = one step on the whole batch). Before learning, the local worker's policies
    get ``{"timestep": num_steps_sampled}``, so lr / entropy schedules are at the
    steps sampled so far.
    Counters: num_steps_trained. Timers: learn. Info: learner (stats per policy).
    """

    def __init__(self, workers: WorkerSet, metrics: Metrics, num_sgd_iter: int = 1,
                 sgd_minibatch_size: int = 0):
        self.workers = workers
        self.metrics = metrics
        self.num_sgd_iter = num_sgd_iter
        self.sgd_minibatch_size = sgd_minibatch_size

    def __call__(self, item: AnyBatch | SourcedItem) -> TrainedBatch:
        source, batch = source_and_batch("TrainOneStep", item)
        timer = self.metrics.timer(LEARN_TIMER)
        local = self.workers.local_worker()
        local.set_global_vars({"timestep": self.metrics.get(NUM_STEPS_SAMPLED)})
        with timer:
            info = local.learn_on_batch(batch, self.num_sgd_iter, self.sgd_minibatch_size)
        timer.push_units_processed(batch.count)
        self.metrics.inc(NUM_STEPS_TRAINED, batch.count)
        self.metrics.update_info(LEARNER_INFO, info)
        return TrainedBatch(batch, info, source)

    def __repr__(self) -> str:
        if self.num_sgd_iter == 1 and not self.sgd_minibatch_size:
            return "TrainOneStep"
        return f"TrainOneStep({self.num_sgd_iter}x{self.sgd_minibatch_size})"


class BroadcastWeights:
    """Sends the local worker's weights (one ``ray.put``) and global vars to all workers.

        ... .for_each(TrainOneStep(workers, metrics)).for_each(BroadcastWeights(workers, metrics))

    Passes its input through. Global vars: ``{"timestep": num_steps_sampled}``.
    Counters: num_weight_broadcasts. Timers: synch_weights.
    """

    def __init__(self, workers: WorkerSet, metrics: Metrics):
        self.workers = workers
        self.metrics = metrics

    def __call__(self, item: Any) -> Any:
        with self.metrics.timer(WEIGHT_SYNC_TIMER):
            self.workers.sync_weights({"timestep": self.metrics.get(NUM_STEPS_SAMPLED)})
        self.metrics.inc(NUM_WEIGHT_BROADCASTS)
        return item

    def __repr__(self) -> str:
        return "BroadcastWeights"


class ComputeGradients:
    """Computes gradients of a batch on the local worker (A2C microbatching).

        rollouts.combine(ConcatBatches(mb)).for_each(ComputeGradients(workers, metrics))

    Input: a batch. Emits ``Gradients(grads, count, info, obs_stats)``. Timers: grad.
    Info: learner.
    """

    def __init__(self, workers: WorkerSet, metrics: Metrics):
        self.workers = workers
        self.metrics = metrics

    def __call__(self, batch: AnyBatch) -> Gradients:
        expect_item("ComputeGradients", batch, AnyBatch)
        with self.metrics.timer(GRAD_TIMER):
            item = _compute_gradients(self.workers.local_worker(), batch)
        self.metrics.update_info(LEARNER_INFO, item.info)
        return item

    def __repr__(self) -> str:
        return "ComputeGradients"


class AverageGradients:
    """Averages a list of ``Gradients`` into one ``Gradients(grads, total_count)``.

        ... .for_each(ComputeGradients(...)).batch(k).for_each(AverageGradients())

    The plain mean per parameter (not weighted by count); ``info`` is left empty;
    the observation statistics of all items are merged. No counters.
    """

    def __call__(self, items: list[Gradients]) -> Gradients:
        if not isinstance(items, list) or not items:
            raise TypeError("AverageGradients expects a non-empty list of Gradients "
                            f"(e.g. after .batch(k)), got {type(items).__name__}")
        for item in items:
            expect_item("AverageGradients", item, Gradients)
        total = sum(item.count for item in items)
        averaged = {}
        for pid in items[0].grads:
            per_item = [item.grads[pid] for item in items]
            averaged[pid] = [np.mean(np.stack(parts), axis=0) for parts in zip(*per_item)]
        return Gradients(averaged, total, obs_stats=_merged_obs_stats(items))

    def __repr__(self) -> str:
        return "AverageGradients"


class ApplyGradients:
    """Applies gradients to the local worker and sends back new weights.

        A2C: ... .for_each(AverageGradients()).for_each(ApplyGradients(workers, metrics))
        A3C: AsyncGradients(workers, metrics).for_each(
                 ApplyGradients(workers, metrics, update_all=False))

    Input ``Gradients``; passes it through. Its ``obs_stats`` join the local policies'
    observation filters after the step, so the weights sent back carry them. With
    ``update_all`` every worker gets the new weights; otherwise only
    ``Gradients.source``, the worker that computed them (AsyncGradients sets it;
    without a source every worker is updated).
    Counters: num_steps_trained. Timers: apply_grad.
    """

    def __init__(self, workers: WorkerSet, metrics: Metrics, update_all: bool = True):
        self.workers = workers
        self.metrics = metrics
        self.update_all = update_all

    def __call__(self, item: Gradients) -> Gradients:
        expect_item("ApplyGradients", item, Gradients)
        local = self.workers.local_worker()
        with self.metrics.timer(APPLY_GRADS_TIMER):
            local.apply_gradients(item.grads, item.obs_stats)
        self.metrics.inc(NUM_STEPS_TRAINED, item.count)
        global_vars = {"timestep": self.metrics.get(NUM_STEPS_SAMPLED)}
        if self.update_all or item.source is None:
            self.workers.sync_weights(global_vars)
        else:
            local.set_global_vars(global_vars)
            item.source.set_weights.remote(local.get_weights(), global_vars)
        return item

    def __repr__(self) -> str:
        return f"ApplyGradients(update_all={self.update_all})"


class UpdateTargetNetwork:
    """Copies online -> target networks every ``target_update_freq`` steps.

        replay.for_each(TrainOneStep(...)).for_each(
            UpdateTargetNetwork(workers, metrics, 500))                  # sampled steps
        dequeue.for_each(UpdateTargetNetwork(workers, metrics, 50_000,
                                             by_steps_trained=True))     # Ape-X

    Passes its input through. Counters: num_target_updates, last_target_update_ts
    (reads num_steps_sampled or num_steps_trained).
    """

    def __init__(self, workers: WorkerSet, metrics: Metrics, target_update_freq: int,
                 by_steps_trained: bool = False):
        self.workers = workers
        self.metrics = metrics
        self.target_update_freq = target_update_freq
        self.counter = NUM_STEPS_TRAINED if by_steps_trained else NUM_STEPS_SAMPLED

    def __call__(self, item: Any) -> Any:
        now = self.metrics.get(self.counter)
        if now - self.metrics.get(LAST_TARGET_UPDATE_TS) >= self.target_update_freq:
            # Only policies with a target network (DQN, DDPG) have one to update; in a
            # multi-agent plan the others (e.g. PPO) are skipped.
            self.workers.local_worker().foreach_policy(
                lambda policy, _pid: getattr(policy, "update_target", lambda: None)())
            self.metrics.inc(NUM_TARGET_UPDATES)
            self.metrics.set(LAST_TARGET_UPDATE_TS, now)
        return item

    def __repr__(self) -> str:
        unit = "trained" if self.counter == NUM_STEPS_TRAINED else "sampled"
        return f"UpdateTargetNetwork({self.target_update_freq} {unit})"


def _merged_obs_stats(items: list[Gradients]) -> dict[str, RunningStat]:
    """Per policy id, the merge of the items' observation statistics (new objects)."""
    merged: dict[str, RunningStat] = {}
    for item in items:
        for pid, stats in item.obs_stats.items():
            if pid not in merged:
                merged[pid] = RunningStat(stats.shape)
            merged[pid].merge(stats)
    return merged


def _compute_gradients(worker: Any, batch: AnyBatch) -> Gradients:
    """Gradients of ``batch`` on ``worker``, with the statistics of its raw
    observations for the learner's observation filter (computed where the batch is,
    so no observations travel)."""
    grads, info = worker.compute_gradients(batch)
    return Gradients(grads, batch.count, info, obs_stats=worker.observation_stats(batch))


def AsyncGradients(workers: WorkerSet, metrics: Metrics, num_async: int = 1):
    """Workers sample and compute gradients remotely; yields ``Gradients`` whose
    ``source`` is the worker that computed them.

        AsyncGradients(workers, metrics).for_each(
            ApplyGradients(workers, metrics, update_all=False))        # A3C

    Gradients arrive as they finish.
    Counters: num_steps_sampled. Info: learner (the sending worker's stats).
    """
    if not workers.remote_workers():
        raise ValueError("AsyncGradients needs remote workers (num_workers >= 1)")
    workers.sync_weights()

    def record(item: SourcedItem[Gradients]) -> Gradients:
        sourced = expect_item("AsyncGradients", item, SourcedItem)
        grads = expect_item("AsyncGradients", sourced.item, Gradients)
        metrics.inc(NUM_STEPS_SAMPLED, grads.count)
        metrics.update_info(LEARNER_INFO, grads.info)
        return dataclasses.replace(grads, source=sourced.actor)

    return (from_actors(workers.remote_workers(), name="AsyncGradients", metrics=metrics,
                        on_actor_failure=workers.handle_actor_failure)
            # Runs inside each rollout worker, on its own freshly sampled batch.
            .for_each_with_worker(_compute_gradients, name="ComputeGradients")
            .gather_async(num_async=num_async, with_source=True,
                          name=f"AsyncGradients(num_async={num_async})")
            .for_each(record, name="CountSampledSteps"))
