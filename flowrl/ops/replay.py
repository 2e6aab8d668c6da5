"""Replay operators: store experience, replay it, send priorities back to its shard.

Provenance is typed: ``Replay`` yields ``SourcedItem(shard, batch)``,
``TrainOneStep`` turns that into ``TrainedBatch(batch, info, source=shard)``, and
``UpdatePriorities`` sends the TD errors to exactly that shard. A shard is either a
local replay object (a ``ReplayActor`` used in-process) or a Ray actor handle of one.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np

from flowrl.data.items import AnyBatch, TrainedBatch, batch_of, expect_item
from flowrl.flow import LocalIterator, Metrics, NotReady, SourcedItem, from_actors
from flowrl.data.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch
from flowrl.ops.counters import NUM_PRIORITY_UPDATES, NUM_STEPS_REPLAYED



def _is_actor(obj: Any) -> bool:
    import ray
    return isinstance(obj, ray.actor.ActorHandle)


class StoreToReplay:
    """Adds each batch to a local replay buffer or to a random replay shard actor.

        rollouts.for_each(StoreToReplay(local_buffer=buffer))
        rollouts.for_each(StoreToReplay(actors=replay_actors))   # random shard per batch

    Accepts a batch or a ``SourcedItem(worker, batch)`` and passes the item through.
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

    def __call__(self, item: AnyBatch | SourcedItem) -> AnyBatch | SourcedItem:
        batch = batch_of("StoreToReplay", item)
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
    """Replayed batches as ``SourcedItem(shard, batch)``; NotReady until ``learning_starts``.

        Replay(metrics, local_buffer=buffer).for_each(TrainOneStep(workers, metrics))
        Replay(metrics, actors=replay_actors, num_async=4).for_each(Enqueue(learner.inqueue))

    The local buffer is the ``shard`` of its items. ``on_actor_failure(shard, error)``
    returns a replacement for a dead shard (e.g.
    :meth:`flowrl.replay.actor.ReplayShards.handle_failure`); without it a dead
    shard's error is raised.
    Counters: num_steps_replayed.
    """
    if (local_buffer is None) == (not actors):
        raise ValueError("Replay needs exactly one of local_buffer= or actors=")

    def count(item: SourcedItem) -> SourcedItem:
        metrics.inc(NUM_STEPS_REPLAYED, batch_of("CountReplayed", item).count)
        return item

    if local_buffer is not None:
        def replays(_non_blocking: bool):
            while True:
                batch = local_buffer.replay()
                yield NotReady if batch is None else SourcedItem(local_buffer, batch)
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

    Input ``TrainedBatch`` whose ``source`` is the shard and whose
    ``info[policy_id]["td_error"]`` holds one value per row; passes it through.
    Shards without prioritized replay ignore the update; a batch without a source
    (not replayed) is an error.
    Counters: num_priority_updates.
    """

    def __init__(self, metrics: Metrics, policy_id: str = DEFAULT_POLICY_ID):
        self.metrics = metrics
        self.policy_id = policy_id

    def __call__(self, item: TrainedBatch) -> TrainedBatch:
        trained = expect_item("UpdatePriorities", item, TrainedBatch)
        if trained.source is None:
            raise ValueError("UpdatePriorities got a TrainedBatch without a source shard: "
                             "its batch did not come from Replay")
        shard, batch, info = trained.source, trained.batch, trained.info
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
