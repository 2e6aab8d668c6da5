"""The Plan value: what an execution plan returns to the Agent.

    def execution_plan(workers, config, metrics) -> Plan:
        learner = LearnerThread(...)
        ...
        return StandardMetricsReporting(train_op, workers, config, metrics) \\
            .owning(learner).saving(replay=ReplayCheckpoint(shards, enabled=True))

A Plan holds three things, all declared, none attached to iterators:

* ``results``: the iterator whose every item is one training iteration's result dict;
* ``owns``: resources the plan started (learner threads, replay shards, actor sets),
  each with ``stop()``; :meth:`Plan.stop` stops them in reverse order of declaration;
* ``state``: named saveables (reporting totals, replay contents), each with
  ``save()`` / ``restore(state)``; the Agent puts :meth:`Plan.save` in checkpoints.

``plan.for_each(fn)`` extends ``results`` and keeps what the plan owns and saves, so a
user can post-process results without losing the learner thread or the replay.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

logger = logging.getLogger(__name__)


@runtime_checkable
class Stoppable(Protocol):
    """A resource a plan started and must release (a thread, an actor set)."""

    def stop(self) -> None: ...


@runtime_checkable
class Saveable(Protocol):
    """State a checkpoint keeps: ``save()`` returns plain data (dicts, lists, numpy
    arrays, numbers, strings) that ``restore(state)`` accepts back. ``save()`` may
    return None for "nothing to keep this time" (e.g. replay checkpointing off)."""

    def save(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class Plan:
    """An execution plan's result iterator with the resources and state it declares.

    Args:
        results: iterator of result dicts, one per training iteration.
        owns: resources with ``stop()``, stopped in reverse order by :meth:`stop`.
        state: ``{name: saveable}``, saved and restored by name.
    """

    results: Iterator[dict]
    owns: tuple[Stoppable, ...] = ()
    state: Mapping[str, Saveable] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for resource in self.owns:
            if not callable(getattr(type(resource), "stop", None)):
                raise TypeError(f"Plan owns {resource!r}, which has no stop() method")
        for name, saveable in self.state.items():
            if not isinstance(saveable, Saveable):
                raise TypeError(f"Plan state {name!r} is {saveable!r}, which lacks "
                                "save() and restore(state)")
        object.__setattr__(self, "state", dict(self.state))

    # -- iterating ----------------------------------------------------------------
    def __iter__(self) -> "Plan":
        return self

    def __next__(self) -> dict:
        return next(self.results)

    def __repr__(self) -> str:
        return (f"Plan({self.results!r}, owns={len(self.owns)}, "
                f"state={sorted(self.state)})")

    # -- extending ----------------------------------------------------------------
    def for_each(self, fn: Callable[[dict], Any], name: str | None = None) -> "Plan":
        """The same plan with ``fn`` applied to each result (owned and saved state kept)."""
        results = self.results
        if hasattr(results, "for_each"):
            extended = results.for_each(fn, name=name) if name else results.for_each(fn)
        else:
            extended = map(fn, results)
        return dataclasses.replace(self, results=extended)

    def owning(self, *resources: Stoppable) -> "Plan":
        """The same plan owning ``resources`` too (stopped before the earlier ones)."""
        return Plan(self.results, self.owns + tuple(resources), self.state)

    def saving(self, **state: Saveable) -> "Plan":
        """The same plan with more named state; a name may be declared only once."""
        clash = sorted(set(state) & set(self.state))
        if clash:
            raise ValueError(f"Plan state {clash} is already declared")
        return Plan(self.results, self.owns, {**self.state, **state})

    # -- lifecycle ----------------------------------------------------------------
    def stop(self) -> None:
        """Stops every owned resource, newest first; all are tried, the first error
        is raised after the others were stopped."""
        first_error: BaseException | None = None
        for resource in reversed(self.owns):
            try:
                resource.stop()
            except Exception as error:  # keep stopping the rest, then re-raise
                logger.error("Stopping %r failed: %s", resource, error)
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def save(self) -> dict[str, Any]:
        """``{name: saveable.save()}``, leaving out saveables that returned None."""
        saved = {name: saveable.save() for name, saveable in self.state.items()}
        return {name: value for name, value in saved.items() if value is not None}

    def restore(self, states: Mapping[str, Any]) -> None:
        """Restores each named state present in ``states``; unknown names are an error."""
        unknown = sorted(set(states) - set(self.state))
        if unknown:
            raise ValueError(f"The checkpoint holds plan state {unknown} that this plan "
                             f"does not declare (it declares {sorted(self.state)})")
        for name, value in states.items():
            self.state[name].restore(value)


def as_plan(value: Any, source: str) -> Plan:
    """``value`` as a Plan: a Plan passes through; a bare iterator of results (what
    plans returned before Plan existed) is wrapped, with one FutureWarning.

    ``source`` names the plan function in the messages.
    """
    if isinstance(value, Plan):
        return value
    if isinstance(value, Iterator):
        warnings.warn(f"{source} returned a bare iterator; return a flowrl.flow.Plan "
                      "(StandardMetricsReporting(...) already is one) so that the Agent "
                      "can stop what the plan started and checkpoint what it holds. "
                      "Bare iterators will stop being accepted.", FutureWarning,
                      stacklevel=3)
        return Plan(value)
    raise TypeError(f"{source} returned {type(value).__name__}, not a Plan: an execution "
                    "plan returns Plan(results, owns, state), e.g. the value of "
                    "StandardMetricsReporting(...)")
