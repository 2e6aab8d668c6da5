"""Replay buffers (uniform, prioritized), segment trees, frame-stack storage, replay actors.

Local use in a DQN-style plan, and sharded over actors in Ape-X::

    from flowrl.replay import PrioritizedReplayBuffer, ReplayActor, linear_schedule

    buffer = PrioritizedReplayBuffer(50_000, alpha=0.6)
    buffer.add(batch)
    replayed = buffer.sample(32, beta=linear_schedule(t, 100_000, 0.4, 1.0))
    buffer.update_priorities(replayed["batch_indexes"], np.abs(td_error) + 1e-6)

    shards = [ray.remote(ReplayActor).remote(config, i, 4) for i in range(4)]
    replay_op = from_actors(shards, "Replay").gather_async(num_async=4)
"""

from flowrl.replay.actor import ReplayActor, ReplayShards
from flowrl.replay.buffers import PrioritizedReplayBuffer, ReplayBuffer, linear_schedule
from flowrl.replay.frame_storage import FrameStackStorage
from flowrl.replay.segment_tree import MinSegmentTree, SegmentTree, SumSegmentTree

__all__ = [
    "ReplayBuffer",
    "PrioritizedReplayBuffer",
    "linear_schedule",
    "FrameStackStorage",
    "SegmentTree",
    "SumSegmentTree",
    "MinSegmentTree",
    "ReplayActor",
    "ReplayShards",
]
