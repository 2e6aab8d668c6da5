"""RL operators built on flowrl.flow: rollouts, training, replay, weight sync, reporting."""

from flowrl.ops.concurrency import (Concurrently, CountTrainedSteps, Dequeue, Enqueue,
                                    LearnerThread, MixInReplay, UpdateWorkerWeights)
from flowrl.ops.metrics import CollectMetrics, StandardMetricsReporting
from flowrl.ops.replay import Replay, StoreToReplay, UpdatePriorities
from flowrl.ops.rollout import (ConcatBatches, CountSampledSteps, ParallelRollouts,
                                SelectExperiences, StandardizeFields)
from flowrl.ops.train import (ApplyGradients, AsyncGradients, AverageGradients, BroadcastWeights,
                              ComputeGradients, TrainOneStep, UpdateTargetNetwork)

__all__ = ["ApplyGradients", "AsyncGradients", "AverageGradients", "BroadcastWeights", "CollectMetrics",
           "ComputeGradients", "ConcatBatches", "Concurrently", "CountSampledSteps",
           "CountTrainedSteps", "Dequeue", "Enqueue", "LearnerThread", "MixInReplay", "ParallelRollouts",
           "Replay", "SelectExperiences", "StandardMetricsReporting", "StandardizeFields",
           "StoreToReplay", "TrainOneStep", "UpdatePriorities", "UpdateTargetNetwork",
           "UpdateWorkerWeights"]
