"""Rollout operators: where experience enters a plan, and how batches are shaped."""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np

from flowrl.data.items import AnyBatch, batch_of, expect_item
from flowrl.flow import LocalIterator, Metrics, ParallelIterator, SourcedItem, from_actors
from flowrl.ops.counters import NUM_STEPS_SAMPLED, SAMPLE_TIMER
from flowrl.data.sample_batch import MultiAgentBatch, SampleBatch
from flowrl.workers.worker_set import WorkerSet


class CountSampledSteps:
    """``rollouts.for_each(CountSampledSteps(metrics))`` on batches or
    ``SourcedItem(worker, batch)`` items; passes them through.
    Counters: num_steps_sampled."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def __call__(self, item: AnyBatch | SourcedItem) -> AnyBatch | SourcedItem:
        self.metrics.inc(NUM_STEPS_SAMPLED, batch_of("CountSampledSteps", item).count)
        return item

    def __repr__(self) -> str:
        return "CountSampledSteps"


def _concat(batches: list) -> SampleBatch | MultiAgentBatch:
    return SampleBatch.concat_samples(batches)


def ParallelRollouts(workers: WorkerSet, metrics: Metrics, mode: str = "bulk_sync",
                     num_async: int = 1, with_source: bool = False
                     ) -> LocalIterator | ParallelIterator:
    """Experience from the workers' ``sample()`` calls.

        rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
        train_op = rollouts.combine(ConcatBatches(4000)).for_each(TrainOneStep(...))

    Modes: ``bulk_sync`` yields one concatenated batch per round with one fragment from
    every worker (a barrier); ``async`` yields fragments as they finish, with
    ``num_async`` requests in flight per worker (as ``SourcedItem(worker, batch)``
    with ``with_source``); ``raw`` returns the ParallelIterator.
    With no remote workers, the local worker samples in this process.
    Current weights are sent to the workers first.
    Counters: num_steps_sampled (not in ``raw`` mode).
    """
    if mode not in ("bulk_sync", "async", "raw"):
        raise ValueError(f"ParallelRollouts mode={mode!r}; expected 'bulk_sync', 'async' "
                         "or 'raw'")
    if not workers.remote_workers():
        if mode == "raw":
            raise ValueError("ParallelRollouts(mode='raw') needs remote workers "
                             "(num_workers >= 1)")
        local = workers.local_worker()
        return LocalIterator(lambda _non_blocking: iter(local.sample, None), metrics,
                             name=f"ParallelRollouts({mode}, local)"
                             ).for_each(CountSampledSteps(metrics))
    workers.sync_weights()
    rollouts = from_actors(workers.remote_workers(), name="ParallelRollouts", metrics=metrics,
                           on_actor_failure=workers.handle_actor_failure)
    if mode == "raw":
        return rollouts
    if mode == "bulk_sync":
        return (rollouts.gather_sync(name="ParallelRollouts(bulk_sync)")
                .batch(workers.num_healthy_workers())
                .for_each(_concat, name="ConcatRound")
                .for_each(CountSampledSteps(metrics)))
    return (rollouts.gather_async(num_async=num_async, with_source=with_source,
                                  name=f"ParallelRollouts(async, num_async={num_async})")
            .for_each(CountSampledSteps(metrics)))


class ConcatBatches:
    """Buffers batches until at least ``min_batch_size`` steps, then emits one batch.

        rollouts.combine(ConcatBatches(4000, metrics)) -> batches of >= 4000 steps
        ma_rollouts.combine(ConcatBatches(4000, metrics, count_steps_by="agent_steps"))

    ``count_steps_by``: ``"env_steps"`` (default) or ``"agent_steps"`` (rows of the
    policies in a MultiAgentBatch: after SelectExperiences, the selected policies' rows).
    Timers: sample (time between emitted batches, throughput in steps/s).
    """

    def __init__(self, min_batch_size: int, metrics: Metrics | None = None,
                 count_steps_by: str = "env_steps"):
        if min_batch_size < 1:
            raise ValueError(f"ConcatBatches(min_batch_size={min_batch_size!r}): must be >= 1")
        if count_steps_by not in ("env_steps", "agent_steps"):
            raise ValueError(f"ConcatBatches(count_steps_by={count_steps_by!r}): expected "
                             "'env_steps' or 'agent_steps'")
        self.min_batch_size = min_batch_size
        self.metrics = metrics
        self.count_steps_by = count_steps_by
        self.buffer: list = []
        self.count = 0
        self.last_emit = time.perf_counter()

    def __call__(self, batch: AnyBatch) -> list[AnyBatch]:
        expect_item("ConcatBatches", batch, AnyBatch)
        self.buffer.append(batch)
        if self.count_steps_by == "agent_steps" and isinstance(batch, MultiAgentBatch):
            self.count += batch.agent_steps()
        else:
            self.count += batch.count
        if self.count < self.min_batch_size:
            return []
        out = _concat(self.buffer)
        if self.metrics is not None:
            now = time.perf_counter()
            timer = self.metrics.timer(SAMPLE_TIMER)
            timer.push(now - self.last_emit)
            timer.push_units_processed(out.count)
            self.last_emit = now
        self.buffer, self.count = [], 0
        return [out]

    def __repr__(self) -> str:
        return f"ConcatBatches({self.min_batch_size})"


class SelectExperiences:
    """Keeps only the named policies' batches of a MultiAgentBatch.

        rollouts.for_each(SelectExperiences(["ppo_policy"]))

    A plain SampleBatch (single policy) passes through unchanged. No counters.
    """

    def __init__(self, policy_ids: Iterable[str]):
        self.policy_ids = list(policy_ids)

    def __call__(self, batch: AnyBatch) -> AnyBatch:
        if not isinstance(expect_item("SelectExperiences", batch, AnyBatch), MultiAgentBatch):
            return batch
        return MultiAgentBatch({pid: b for pid, b in batch.policy_batches.items()
                                if pid in self.policy_ids}, batch.env_steps)

    def __repr__(self) -> str:
        return f"SelectExperiences({self.policy_ids})"


def _standardize(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / max(1e-4, float(x.std()))).astype(np.float32)


class StandardizeFields:
    """Zero mean, unit std for the given columns (per batch, per policy).

        rollouts.combine(ConcatBatches(4000)).for_each(StandardizeFields(["advantages"]))

    No counters.
    """

    def __init__(self, fields: Iterable[str]):
        self.fields = list(fields)

    def _apply(self, batch: SampleBatch) -> SampleBatch:
        for field in self.fields:
            batch[field] = _standardize(batch[field])
        return batch

    def __call__(self, batch: AnyBatch) -> AnyBatch:
        if isinstance(expect_item("StandardizeFields", batch, AnyBatch), MultiAgentBatch):
            for b in batch.policy_batches.values():
                self._apply(b)
            return batch
        return self._apply(batch)

    def __repr__(self) -> str:
        return f"StandardizeFields({self.fields})"
