"""Concurrency operators: branches run together, and a learner thread off the driver loop.

    learner = LearnerThread(workers.local_worker(), metrics)
    learner.start()
    replay_op = Replay(metrics, actors=shards).for_each(Enqueue(learner.inqueue))
    update_op = Dequeue(learner.outqueue, learner.check_alive, metrics)   # TrainedBatch
    merged = Concurrently([replay_op, update_op], mode="async", output_indexes=[1])

Into the learner go batches or ``SourcedItem(shard, batch)``; out come
``TrainedBatch(batch, info, source)`` items (:mod:`flowrl.data.items`).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any, Callable

from flowrl.data.items import TrainedBatch, batch_of, expect_item, source_and_batch
from flowrl.flow import LocalIterator, Metrics, NotReady, SourcedItem, concurrently
from flowrl.ops.counters import (LEARN_TIMER, LEARNER_INFO, LEARNER_QUEUE_SIZE,
                                 NUM_STEPS_SAMPLED, NUM_STEPS_TRAINED, NUM_WEIGHT_SYNCS)
from flowrl.workers.rollout_worker import RolloutWorker
from flowrl.workers.worker_set import WorkerSet

logger = logging.getLogger(__name__)



def Concurrently(ops: list[LocalIterator], mode: str = "round_robin",
                 output_indexes: list[int] | None = None,
                 round_robin_weights: list | None = None) -> LocalIterator:
    """Runs several branches together; only ``output_indexes`` branches' items come out.

        Concurrently([store_op, replay_op], mode="round_robin", output_indexes=[1],
                     round_robin_weights=[1, 2])

    ``mode="async"`` polls every branch without blocking. No counters.
    """
    return concurrently(ops, mode=mode, output_indexes=output_indexes,
                        round_robin_weights=round_robin_weights)


class Enqueue:
    """Hands items to a bounded queue without blocking the driver loop.

        Replay(...).for_each(Enqueue(learner.inqueue))

    Any item goes (a LearnerThread's inqueue takes batches or
    ``SourcedItem(shard, batch)``) and passes through. When the queue is full it
    returns NotReady, so the same item is offered again on a later pull (the
    for_each retry rule). No counters.
    """

    def __init__(self, output_queue: queue.Queue):
        self.queue = output_queue

    def __call__(self, item: Any) -> Any:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            return NotReady
        return item

    def __repr__(self) -> str:
        return "Enqueue"


def Dequeue(input_queue: queue.Queue, check: Callable[[], None] = lambda: None,
            metrics: Metrics | None = None) -> LocalIterator:
    """Items from a queue filled by another thread; NotReady while it is empty.

        Dequeue(learner.outqueue, check=learner.check_alive, metrics=metrics)

    Yields the queue's items as they are (a LearnerThread's outqueue holds
    ``TrainedBatch`` items). ``check()`` runs before every poll: a dead learner
    thread raises its own error here. No counters.
    """

    def items(_non_blocking: bool):
        while True:
            check()
            try:
                yield input_queue.get_nowait()
            except queue.Empty:
                yield NotReady

    return LocalIterator(items, metrics, name="Dequeue")


class LearnerThread(threading.Thread):
    """Trains the local worker on batches or ``SourcedItem(shard, batch)`` items from
    ``inqueue``.

    Results go to ``outqueue`` as ``TrainedBatch(batch, info, source)`` (``source``:
    the shard, or None for a bare batch); anything else in ``inqueue`` is a TypeError.
    ``weights_version`` increases with every update (read by UpdateWorkerWeights). An
    exception stops the thread and is re-raised on the driver by ``check_alive()`` with
    its own traceback.
    A learner that has work queued but finishes no update for ``stall_warning_s`` is
    reported by ``check_alive()`` as a warning with the queue sizes (once per period).
    Timers: learn. Info: learner. Counters: learner_queue_size (latest queue length).
    """

    def __init__(self, local_worker: RolloutWorker, metrics: Metrics,
                 queue_size: int = 16, stall_warning_s: float = 60.0):
        super().__init__(name="flowrl-learner", daemon=True)
        self.local_worker = local_worker
        self.metrics = metrics
        self.inqueue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.outqueue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.weights_version = 0
        self.error: BaseException | None = None
        self.stall_warning_s = stall_warning_s
        self.last_progress = time.monotonic()
        self._last_stall_warning = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    item = self.inqueue.get(timeout=0.1)
                except queue.Empty:
                    continue
                # Replayed items carry their shard; on-policy batches (IMPALA) don't.
                shard, batch = source_and_batch("LearnerThread", item)
                timer = self.metrics.timer(LEARN_TIMER)
                with timer:
                    info = self.local_worker.learn_on_batch(batch)
                timer.push_units_processed(batch.count)
                self.weights_version += 1
                self.last_progress = time.monotonic()
                self.metrics.update_info(LEARNER_INFO, info)
                self.metrics.set(LEARNER_QUEUE_SIZE, self.inqueue.qsize())
                while not self._stop_event.is_set():
                    try:
                        self.outqueue.put(TrainedBatch(batch, info, shard), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the driver by check_alive()
            error.add_note("flowrl: raised in the LearnerThread (learn_on_batch)")
            self.error = error

    def check_alive(self) -> None:
        """Raises the thread's exception (original traceback) if it died."""
        if self.error is not None:
            raise self.error
        if not self.is_alive() and not self._stop_event.is_set():
            raise RuntimeError("The learner thread is not running (was it started?)")
        now = time.monotonic()
        idle = now - self.last_progress
        if idle > self.stall_warning_s and not self.inqueue.empty() and \
                now - self._last_stall_warning > self.stall_warning_s:
            self._last_stall_warning = now
            logger.warning(
                "The learner thread finished no update for %.0f s although work is "
                "queued (inqueue %d/%d, outqueue %d/%d, %d updates so far): "
                "learn_on_batch may be stuck or very slow.", idle, self.inqueue.qsize(),
                self.inqueue.maxsize, self.outqueue.qsize(), self.outqueue.maxsize,
                self.weights_version)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Asks the thread to finish and waits for it (its current update completes)."""
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)
            if self.is_alive():
                logger.warning("The learner thread did not finish within %.0f s of stop()",
                               timeout_s)


class CountTrainedSteps:
    """``dequeue.for_each(CountTrainedSteps(metrics))`` on ``TrainedBatch`` items;
    passes them through.

    Counters: num_steps_trained.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def __call__(self, item: TrainedBatch) -> TrainedBatch:
        trained = expect_item("CountTrainedSteps", item, TrainedBatch)
        self.metrics.inc(NUM_STEPS_TRAINED, trained.batch.count)
        return item

    def __repr__(self) -> str:
        return "CountTrainedSteps"


class UpdateWorkerWeights:
    """Sends new learner weights to the worker a batch came from, at most every
    ``max_weight_sync_delay`` of its sampled steps and only once the learner made
    ``min_learner_updates`` updates since that worker's last weights.

        Ape-X:  rollouts(async, with_source).for_each(StoreToReplay(actors=shards))
                    .for_each(UpdateWorkerWeights(learner, workers, metrics, 400))
        IMPALA: rollouts(async, with_source).for_each(UpdateWorkerWeights(
                    learner, workers, metrics, 0, min_learner_updates=broadcast_interval))

    Input ``SourcedItem(worker, batch)``, passed through; one ``ray.put`` per weights
    version.
    Counters: num_weight_syncs (reads num_steps_sampled for the global timestep).
    """

    def __init__(self, learner: LearnerThread, workers: WorkerSet, metrics: Metrics,
                 max_weight_sync_delay: int, min_learner_updates: int = 1):
        self.learner = learner
        self.workers = workers
        self.metrics = metrics
        self.max_weight_sync_delay = max_weight_sync_delay
        self.min_learner_updates = max(1, min_learner_updates)
        self.steps_since_sync: dict = {}
        self.version_sent: dict = {}
        self._ref = None
        self._ref_version = -1

    def __call__(self, item: SourcedItem) -> SourcedItem:
        worker = expect_item("UpdateWorkerWeights", item, SourcedItem).actor
        batch = batch_of("UpdateWorkerWeights", item)
        steps = self.steps_since_sync.get(worker, 0) + batch.count
        version = self.learner.weights_version
        # Version 0 is the initial weights, which every worker got when it started.
        updates_since = version - self.version_sent.get(worker, 0)
        if steps >= self.max_weight_sync_delay and updates_since >= self.min_learner_updates:
            import ray
            if self._ref_version != version:
                self._ref = ray.put(self.workers.local_worker().get_weights())
                self._ref_version = version
            worker.set_weights.remote(self._ref,
                                      {"timestep": self.metrics.get(NUM_STEPS_SAMPLED)})
            self.version_sent[worker] = version
            self.metrics.inc(NUM_WEIGHT_SYNCS)
            steps = 0
        self.steps_since_sync[worker] = steps
        return item

    def __repr__(self) -> str:
        return (f"UpdateWorkerWeights({self.max_weight_sync_delay} steps, "
                f"{self.min_learner_updates} updates)")


class MixInReplay:
    """Emits each batch plus, on average, ``replay_proportion`` batches replayed from a
    ring of the last ``num_slots`` batches (IMPALA's experience replay).

        rollouts.combine(MixInReplay(num_slots=100, replay_proportion=0.5))

    ``num_slots=0`` passes batches through. No counters.
    """

    def __init__(self, num_slots: int, replay_proportion: float, seed: int | None = None):
        if num_slots < 0 or replay_proportion < 0:
            raise ValueError(f"MixInReplay(num_slots={num_slots!r}, replay_proportion="
                             f"{replay_proportion!r}): both must be >= 0")
        self.num_slots = num_slots
        self.replay_proportion = replay_proportion
        self.slots: list = []
        self.next_slot = 0
        self.rng = random.Random(seed)

    def __call__(self, batch: Any) -> list:
        out = [batch]
        if self.num_slots == 0:
            return out
        # Whole part always, fractional part with that probability.
        whole = int(self.replay_proportion)
        count = whole + (self.rng.random() < self.replay_proportion - whole)
        if self.slots:
            out += [self.rng.choice(self.slots) for _ in range(count)]
        if len(self.slots) < self.num_slots:
            self.slots.append(batch)
        else:
            self.slots[self.next_slot] = batch
            self.next_slot = (self.next_slot + 1) % self.num_slots
        return out

    def __repr__(self) -> str:
        return f"MixInReplay({self.num_slots}, {self.replay_proportion})"
