"""Replay operators: store experience, replay it, send priorities back to its shard.

Items that carry provenance are explicit tuples: ``Replay`` yields ``(shard, batch)``,
``TrainOneStep`` turns that into ``(shard, batch, info)``, and ``UpdatePriorities``
sends the TD errors to exactly that shard. A shard is either a local replay object
(a ``ReplayActor`` used in-process) or a Ray actor handle of one.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np

from flowrl.flow import LocalIterator, Metrics, NotReady, from_actors
from flowrl.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch

NUM_STEPS_REPLAYED = "num_steps_replayed"
NUM_PRIORITY_UPDATES = "num_priority_updates"


def _is_actor(obj: Any) -> bool:
    import ray
    return isinstance(obj, ray.actor.ActorHandle)


def batch_of(item: Any) -> SampleBatch | MultiAgentBatch:
    """The batch inside an item that may carry provenance: ``batch`` or ``(source, batch)``."""
    return item[1] if isinstance(item, tuple) else item


class StoreToReplay:
    """Adds each batch to a local replay buffer or to a random replay shard actor.

        rollouts.for_each(StoreToReplay(local_buffer=buffer))
        rollouts.for_each(StoreToReplay(actors=replay_actors))   # random shard per batch

    Accepts ``batch`` or ``(source_worker, batch)`` and passes the item through.
    No counters (the shards keep their own add stats).
    """

    def __init__(self, local_buffer: Any = None, actors: list | None = None,
                 seed: int | None = None):
        if (local_buffer is None) == (not actors):
            raise ValueError("StoreToReplay needs exactly one of local_buffer= or actors=")
        self.local_buffer = local_buffer
        # The caller's list itself, not a copy: ReplayShards swaps dead shards in place.
        self.actors = actors if actors is not None else []
        self.rng = random.Random(seed)

    def __call__(self, item: Any) -> Any:
        batch = batch_of(item)
        if self.local_buffer is not None:
            self.local_buffer.add_batch(batch)
        else:
            self.rng.choice(self.actors).add_batch.remote(batch)
        return item

    def __repr__(self) -> str:
        return "StoreToReplay" + (f"({len(self.actors)} shards)" if self.actors else "")


def Replay(metrics: Metrics, local_buffer: Any = None, actors: list | None = None,
           num_async: int = 4,
           on_actor_failure: Callable[[Any, Exception], Any] | None = None) -> LocalIterator:
    """Replayed batches as ``(shard, batch)``; NotReady until ``learning_starts``.

        Replay(metrics, local_buffer=buffer).for_each(TrainOneStep(workers, metrics))
        Replay(metrics, actors=replay_actors, num_async=4).for_each(Enqueue(learner.inqueue))

    ``on_actor_failure(shard, error)`` returns a replacement for a dead shard
    (e.g. :meth:`flowrl.replay.actor.ReplayShards.handle_failure`); without it a
    dead shard's error is raised.
    Counters: num_steps_replayed.
    """
    if (local_buffer is None) == (not actors):
        raise ValueError("Replay needs exactly one of local_buffer= or actors=")

    def count(item):
        metrics.inc(NUM_STEPS_REPLAYED, item[1].count)
        return item

    if local_buffer is not None:
        def replays(_non_blocking: bool):
            while True:
                batch = local_buffer.replay()
                yield NotReady if batch is None else (local_buffer, batch)
        return LocalIterator(replays, metrics, name="Replay(local)").for_each(
            count, name="CountReplayed")
    return (from_actors(actors, name="Replay", metrics=metrics,
                        on_actor_failure=on_actor_failure)
            .gather_async(num_async=num_async, with_source=True,
                          name=f"Replay({len(actors)} shards, num_async={num_async})")
            .for_each(count, name="CountReplayed"))


class UpdatePriorities:
    """Sends the learner's TD errors back to the shard each batch came from.

        replay.for_each(TrainOneStep(...)).for_each(UpdatePriorities(metrics))

    Input ``(shard, batch, info)`` where ``info[policy_id]["td_error"]`` holds one
    value per row; shards without prioritized replay ignore the update.
    Counters: num_priority_updates.
    """

    def __init__(self, metrics: Metrics, policy_id: str = DEFAULT_POLICY_ID):
        self.metrics = metrics
        self.policy_id = policy_id

    def __call__(self, item: tuple) -> tuple:
        shard, batch, info = item
        # Replayed rows of one policy may arrive wrapped as {policy_id: rows}.
        if isinstance(batch, MultiAgentBatch):
            if len(batch.policy_batches) != 1:
                return item
            policy_id, batch = next(iter(batch.policy_batches.items()))
        else:
            policy_id = self.policy_id
        td_error = info.get(policy_id, {}).get("td_error")
        if td_error is not None and SampleBatch.BATCH_INDEXES in batch:
            indexes = batch[SampleBatch.BATCH_INDEXES]
            td_error = np.asarray(td_error)
            if _is_actor(shard):
                shard.update_priorities.remote(indexes, td_error)
            else:
                shard.update_priorities(indexes, td_error)
            self.metrics.inc(NUM_PRIORITY_UPDATES)
        return item

    def __repr__(self) -> str:
        return "UpdatePriorities"
