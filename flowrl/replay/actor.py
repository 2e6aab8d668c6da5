"""ReplayActor: one shard of a distributed replay buffer (Ape-X).

A plain class (usable locally, no Ray needed) that callers turn into actors.
It is a :class:`~flowrl.flow.ParallelIteratorWorker` whose item stream
replays batches forever, so shards plug straight into a gather::

    ReplayActorCls = ray.remote(num_cpus=0)(ReplayActor)
    shards = [ReplayActorCls.remote(config, i, n) for i in range(n)]

    # (1) store: rollouts -> a random shard
    shard = random.choice(shards); shard.add_batch.remote(batch)
    # (2) replay: batches (with batch_indexes) from all shards, 4 in flight each
    for actor, batch in from_actors(shards, "Replay").gather_async(
            num_async=4, with_source=True):
        if batch is NotReady: continue           # a shard before learning_starts
        td = learner.learn(batch)
        actor.update_priorities.remote(batch["batch_indexes"], td)   # same shard

:class:`ReplayShards` builds the shards from a config and replaces dead ones.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator

import numpy as np

from flowrl.flow import NotReady, ParallelIteratorWorker
from flowrl.flow.restart import ActorRestarter
from flowrl.replay.buffers import PrioritizedReplayBuffer, ReplayBuffer, linear_schedule
from flowrl.data.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch

__all__ = ["ReplayActor", "ReplayShards"]

logger = logging.getLogger(__name__)

#: Column with worker-computed initial priorities (``flowrl.policies.dqn.TD_ERROR``).
_TD_ERROR = "td_error"
# A shard not yet past learning_starts waits this long before answering NotReady,
# so a gather polling it does not spin the actor and the driver at full speed.
_NOT_READY_SLEEP_S = 0.002


class ReplayActor(ParallelIteratorWorker):
    """One replay shard: a (prioritized) buffer of ``buffer_size / num_shards`` rows.

    Config keys (defaults in brackets): ``buffer_size`` [50000] (total over
    all shards), ``prioritized_replay`` [True], ``prioritized_replay_alpha``
    [0.6], ``prioritized_replay_beta`` [0.4], ``final_prioritized_replay_beta``
    [= initial beta], ``prioritized_replay_beta_annealing_timesteps`` [1],
    ``prioritized_replay_eps`` [1e-6], ``learning_starts`` [1000] (total; each
    shard waits for ``learning_starts / num_shards`` rows), ``train_batch_size``
    [32] (rows per replayed batch), ``seed`` [None] (shard ``i`` uses
    ``seed + i``), ``worker_side_prioritization`` [False] (then a ``td_error``
    column in added batches gives the rows' initial priorities and is not
    stored), ``frame_stack_storage`` ["auto"].

    Beta is annealed linearly on ``rows added to this shard * num_shards``
    (an estimate of the global timestep, since rows are spread uniformly).
    Keep the actor's default ``max_concurrency=1``: the buffer is not thread-safe.
    """

    def __init__(self, config: dict[str, Any], shard_index: int, num_shards: int) -> None:
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(f"bad shard {shard_index} of {num_shards}")
        self.config = dict(config)
        self.shard_index = int(shard_index)
        #: Same as ``shard_index``; flow error notes name the worker by it.
        self.worker_index = self.shard_index
        self.num_shards = int(num_shards)
        buffer_size = int(_get(config, "buffer_size", 50_000))
        if buffer_size < num_shards:
            raise ValueError(f"buffer_size {buffer_size} is smaller than the number of "
                             f"replay shards {num_shards}")
        capacity = buffer_size // num_shards
        seed = config.get("seed")
        shard_seed = None if seed is None else int(seed) + self.shard_index
        frame_mode = _get(config, "frame_stack_storage", "auto")
        self.prioritized = bool(_get(config, "prioritized_replay", True))
        self.eps = float(_get(config, "prioritized_replay_eps", 1e-6))
        self.buffer: ReplayBuffer
        if self.prioritized:
            self.beta_initial = float(_get(config, "prioritized_replay_beta", 0.4))
            self.beta_final = float(_get(config, "final_prioritized_replay_beta",
                                            self.beta_initial))
            self.beta_timesteps = float(_get(
                config, "prioritized_replay_beta_annealing_timesteps", 1))
            self.buffer = PrioritizedReplayBuffer(
                capacity, alpha=float(_get(config, "prioritized_replay_alpha", 0.6)),
                beta=self.beta_initial, eps=self.eps, seed=shard_seed,
                frame_stack_storage=frame_mode)
        else:
            self.buffer = ReplayBuffer(capacity, seed=shard_seed, frame_stack_storage=frame_mode)
        self.learning_starts = float(_get(config, "learning_starts", 1000)) / num_shards
        self.train_batch_size = int(_get(config, "train_batch_size", 32))
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {self.train_batch_size}")
        self.worker_side_prioritization = bool(_get(config, "worker_side_prioritization", False))
        self._num_replayed = 0
        self._policy_id: str | None = None  # set when rows come from a named policy
        ParallelIteratorWorker.__init__(self, self._replay_items, repeat=True)

    def __repr__(self) -> str:
        return f"ReplayActor(shard {self.shard_index}/{self.num_shards}, {self.buffer!r})"

    # ---------------------------------------------------------------- data
    def add_batch(self, batch: SampleBatch, priorities: np.ndarray | None = None) -> None:
        """Store a batch's rows in this shard (``shard.add_batch.remote(batch)``).

        ``priorities`` (prioritized shards only) sets the rows' initial
        priorities; with ``worker_side_prioritization`` they come from the
        batch's ``td_error`` column as ``|td_error| + eps``.
        """
        if isinstance(batch, MultiAgentBatch) and not batch.policy_batches:
            return  # e.g. a fragment in which the selected policy's agents did not act
        if isinstance(batch, MultiAgentBatch) and len(batch.policy_batches) == 1:
            # One policy's rows (a multiagent config with one policy): replayed batches
            # are wrapped back under its id so that the learner trains that policy.
            policy_id, batch = next(iter(batch.policy_batches.items()))
            self._policy_id = None if policy_id == DEFAULT_POLICY_ID else policy_id
        elif isinstance(batch, MultiAgentBatch):
            raise ValueError(f"a replay shard stores one policy's rows, got policies "
                             f"{sorted(batch.policy_batches)}: select one policy first "
                             "(SelectExperiences), one buffer per policy")
        if self.worker_side_prioritization and isinstance(batch, SampleBatch) \
                and _TD_ERROR in batch:
            td = batch[_TD_ERROR]
            batch = SampleBatch({k: v for k, v in batch.items() if k != _TD_ERROR})
            if priorities is None:
                priorities = np.abs(np.asarray(td, dtype=np.float64)) + self.eps
        if isinstance(self.buffer, PrioritizedReplayBuffer):
            self.buffer.add(batch, priorities)
        else:
            self.buffer.add(batch)

    def current_beta(self) -> float:
        """PER beta for the next replayed batch (annealed on rows added x num_shards)."""
        if not self.prioritized:
            return 0.0
        return linear_schedule(self.buffer.num_added * self.num_shards,
                               self.beta_timesteps, self.beta_initial, self.beta_final)

    def replay(self) -> SampleBatch | None:
        """A batch of ``train_batch_size`` rows, or None before ``learning_starts``."""
        if len(self.buffer) == 0 or self.buffer.num_added < self.learning_starts:
            return None
        if isinstance(self.buffer, PrioritizedReplayBuffer):
            batch = self.buffer.sample(self.train_batch_size, beta=self.current_beta())
        else:
            batch = self.buffer.sample(self.train_batch_size)
        self._num_replayed += 1
        if self._policy_id is not None:
            return MultiAgentBatch({self._policy_id: batch}, batch.count)
        return batch

    def _replay_items(self) -> Iterator[Any]:
        # The item stream never hands out None: NotReady passes through gathers.
        while True:
            batch = self.replay()
            if batch is None:
                time.sleep(_NOT_READY_SLEEP_S)
                yield NotReady
            else:
                yield batch

    def update_priorities(self, indexes: np.ndarray, td_errors: np.ndarray) -> None:
        """Set priorities ``|td_errors| + prioritized_replay_eps`` for replayed rows.

        ``indexes`` are a replayed batch's ``batch_indexes`` from this shard;
        rows evicted since are skipped. A no-op for uniform shards.
        """
        if isinstance(self.buffer, PrioritizedReplayBuffer):
            self.buffer.update_td_errors(indexes, td_errors)

    # ---------------------------------------------------------- stats/state
    def get_pid(self) -> int:
        """The process id of this shard (for operators and tests that watch processes)."""
        import os
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        """The buffer's stats plus ``shard_index``, ``num_replayed_batches``, ``beta``."""
        out = self.buffer.stats()
        out.update(shard_index=self.shard_index, num_shards=self.num_shards,
                   learning_starts=self.learning_starts,
                   num_replayed_batches=self._num_replayed, beta=self.current_beta())
        return out

    def get_state(self) -> dict[str, Any]:
        """Buffer contents and counters (numpy arrays and plain containers)."""
        return {"shard_index": self.shard_index, "num_shards": self.num_shards,
                "num_replayed_batches": self._num_replayed, "buffer": self.buffer.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` output (same shard layout and buffer size)."""
        if int(state["num_shards"]) != self.num_shards:
            raise ValueError(f"replay state is from {state['num_shards']} shards, this actor "
                             f"is one of {self.num_shards}")
        self._num_replayed = int(state.get("num_replayed_batches", 0))
        self.buffer.set_state(state["buffer"])


def _get(config: dict[str, Any], key: str, default: Any) -> Any:
    """``config[key]``, or ``default`` when the key is missing or None."""
    value = config.get(key)
    return default if value is None else value


class ReplayShards:
    """The replay shard actors of a plan; a shard that dies is replaced by an empty one.

        shards = ReplayShards(config, num_shards=4)
        store_op = rollouts.for_each(StoreToReplay(actors=shards.actors))
        replay_op = Replay(metrics, actors=shards.actors,
                           on_actor_failure=shards.handle_failure)

    ``actors`` is one list object updated in place, so every operator holding it sees
    a replacement. A replaced shard's contents are lost (the other shards keep
    theirs); it refills from new rollouts before it replays (``learning_starts``).
    With ``recreate_failed_workers`` off, or after ``max_worker_restarts``
    replacements, the failure is raised instead, naming the shard (see
    :class:`~flowrl.flow.restart.ActorRestarter`).
    Counters: ``num_replay_shard_restarts``, reported in :meth:`stats` (also under its
    earlier name ``num_shard_restarts``).
    """

    def __init__(self, config: dict[str, Any], num_shards: int, **ray_options: Any):
        import ray

        ray_options.setdefault("num_cpus", 0)
        self.config = config
        self.num_shards = num_shards
        self._cls = ray.remote(ReplayActor).options(**ray_options)
        self.restarter = ActorRestarter.from_config("replay_shard", "Replay shard",
                                                    self._start, config)
        self.actors: list = [self.restarter.start(i) for i in range(num_shards)]
        self._lock = threading.Lock()

    def _start(self, index: int) -> Any:
        return self._cls.remote(self.config, index, self.num_shards)

    @property
    def num_restarts(self) -> int:
        """Shards replaced so far."""
        return self.restarter.num_restarts

    def handle_failure(self, actor: Any, error: Exception) -> Any:
        """Replaces the dead ``actor`` by an empty shard (called by the Replay gather)."""
        with self._lock:
            if actor not in self.actors:
                return None
            index = self.actors.index(actor)
            new_actor = self.restarter.replace(actor, error)
            if new_actor is not None:
                self.actors[index] = new_actor
            return new_actor

    def stats(self) -> dict:
        """Replay stats summed over the live shards (sizes and rates)."""
        import ray

        per_shard = []
        for actor in list(self.actors):
            try:
                per_shard.append(ray.get(actor.stats.remote()))
            except ray.exceptions.RayActorError:
                continue  # replaced when the Replay gather next reaches it
        keys = ("size", "size_bytes", "num_added", "num_sampled", "add_throughput",
                "sample_throughput")
        summed = {key: sum(s[key] for s in per_shard) for key in keys
                  if per_shard and all(key in s for s in per_shard)}
        return {**summed, "num_shards": len(self.actors),
                "num_healthy_shards": len(per_shard),
                "num_shard_restarts": self.num_restarts, **self.restarter.counters()}

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
