"""ReplayCheckpoint: replay contents as a saveable piece of a Plan's state.

    shards = ReplayShards(config, num_shards=4)
    ...
    return plan.saving(replay=ReplayCheckpoint(shards.actors,
                                               enabled=config["checkpoint_replay_buffer"]))

Each buffer is a local :class:`~flowrl.replay.actor.ReplayActor` or a Ray actor handle
of one; a list that is updated in place (``ReplayShards.actors``) is read at save time,
so replaced shards are saved too.
"""

from __future__ import annotations

from typing import Any, Sequence


class ReplayCheckpoint:
    """Saves and restores the contents of a plan's replay buffers, one state per shard.

    Args:
        buffers: the plan's replay buffers (local objects or actor handles), read at
            each save / restore.
        enabled: when False, ``save()`` returns None (nothing goes into checkpoints)
            and ``restore`` ignores what a checkpoint holds.
    """

    def __init__(self, buffers: Sequence[Any], enabled: bool = True):
        self.buffers = buffers
        self.enabled = enabled

    def save(self) -> list[dict] | None:
        if not self.enabled or not self.buffers:
            return None
        return _gather([_invoke(buffer, "get_state") for buffer in self.buffers])

    def restore(self, states: list[dict]) -> None:
        if not self.enabled:
            return
        if len(states) != len(self.buffers):
            raise ValueError(f"The checkpoint holds {len(states)} replay shards, this agent "
                             f"has {len(self.buffers)}: set num_replay_buffer_shards to "
                             f"{len(states)} or checkpoint_replay_buffer to False.")
        _gather([_invoke(buffer, "set_state", state)
                 for buffer, state in zip(self.buffers, states)])

    def __repr__(self) -> str:
        return f"ReplayCheckpoint({len(self.buffers)} buffers, enabled={self.enabled})"


def _is_actor(buffer: Any) -> bool:
    import ray.actor
    return isinstance(buffer, ray.actor.ActorHandle)


def _invoke(buffer: Any, method: str, *args: Any) -> Any:
    """Calls ``method`` on a local buffer, or starts it on an actor (returns a ref)."""
    if _is_actor(buffer):
        return getattr(buffer, method).remote(*args)
    return getattr(buffer, method)(*args)


def _gather(values: list) -> list:
    """Values with the actors' object refs resolved (all fetched in one ``ray.get``)."""
    import ray
    refs = [i for i, v in enumerate(values) if isinstance(v, ray.ObjectRef)]
    if refs:
        fetched = ray.get([values[i] for i in refs])
        for i, value in zip(refs, fetched):
            values[i] = value
    return values
