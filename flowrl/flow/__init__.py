"""flowrl's dataflow core: lazy, named, pull-based iterators over local data and Ray actors.

No RL lives here; ``flowrl.ops`` builds RL operators on top of it::

    from flowrl.flow import Metrics, from_actors, concurrently

    metrics = Metrics()
    rollouts = from_actors(workers, "ParallelRollouts(async)", metrics=metrics)
    train_op = rollouts.gather_async(num_async=2).for_each(TrainOneStep(...))
    report = concurrently([train_op, other_op], mode="async", output_indexes=[0])
    next(report)
"""

from flowrl.flow.iterators import LocalIterator, NotReady, SourcedItem, concurrently, from_items
from flowrl.flow.metrics import Metrics, TimerStat
from flowrl.flow.parallel import ParallelIterator, ParallelIteratorWorker, from_actors
from flowrl.flow.plan import Plan, Saveable, Stoppable, as_plan

__all__ = [
    "NotReady",
    "SourcedItem",
    "Metrics",
    "TimerStat",
    "LocalIterator",
    "ParallelIterator",
    "ParallelIteratorWorker",
    "from_items",
    "from_actors",
    "concurrently",
    "Plan",
    "Saveable",
    "Stoppable",
    "as_plan",
]
