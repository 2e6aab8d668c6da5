"""RL operators built on flowrl.flow: rollouts, training, weight sync, reporting."""

from flowrl.ops.metrics import CollectMetrics, StandardMetricsReporting
from flowrl.ops.rollout import (ConcatBatches, CountSampledSteps, ParallelRollouts,
                                SelectExperiences, StandardizeFields)
from flowrl.ops.train import (ApplyGradients, AverageGradients, BroadcastWeights,
                              ComputeGradients, TrainOneStep)

__all__ = ["ApplyGradients", "AverageGradients", "BroadcastWeights", "CollectMetrics",
           "ComputeGradients", "ConcatBatches", "CountSampledSteps", "ParallelRollouts",
           "SelectExperiences", "StandardMetricsReporting", "StandardizeFields",
           "TrainOneStep"]
