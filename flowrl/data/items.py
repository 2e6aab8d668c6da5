"""The typed items that RL operators hand each other.

Operators tell items apart by type, never by tuple length or position::

    ParallelRollouts(async, with_source) -> SourcedItem(worker, batch)     (flowrl.flow)
    Replay                               -> SourcedItem(shard, batch)      (flowrl.flow)
    TrainOneStep, LearnerThread          -> TrainedBatch(batch, info, source)
    ComputeGradients, AverageGradients   -> Gradients(grads, count, info, obs_stats)
    AsyncGradients                       -> Gradients(grads, count, info, obs_stats,
                                                      source=worker)

Plain batches (:class:`~flowrl.data.sample_batch.SampleBatch` /
:class:`~flowrl.data.sample_batch.MultiAgentBatch`) travel bare. The generic provenance
pair :class:`~flowrl.flow.SourcedItem` lives in the flow layer (it knows no RL);
the RL items here are frozen dataclasses, so one can never be unpacked or indexed
as if it were another. An operator that gets the wrong kind raises
:func:`expect_item`'s ``TypeError``, which names the operator, the expected type
and what arrived.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from types import UnionType
from typing import Any, TypeVar, get_args

import numpy as np

from flowrl.data.sample_batch import MultiAgentBatch, SampleBatch
from flowrl.flow import SourcedItem

__all__ = ["AnyBatch", "Gradients", "TrainedBatch", "batch_of", "expect_item",
           "source_and_batch"]

#: What a policy or rollout worker learns on.
AnyBatch = SampleBatch | MultiAgentBatch

ItemT = TypeVar("ItemT")

_short = reprlib.Repr()
_short.maxother = 60
_short.maxstring = 60


@dataclass(frozen=True, slots=True, eq=False)
class TrainedBatch:
    """A batch the learner just trained on, with the stats of that update.

    Emitted by ``TrainOneStep`` and the ``LearnerThread``; read by
    ``UpdatePriorities`` (``info[policy_id]["td_error"]``), ``UpdateKL`` and
    ``CountTrainedSteps``.
    """

    #: The rows that were trained on.
    batch: AnyBatch
    #: Learner stats per policy id, as ``RolloutWorker.learn_on_batch`` returns them.
    info: dict[str, dict[str, Any]]
    #: The replay shard the batch came from (where its priorities go), or None.
    source: Any = None


@dataclass(frozen=True, slots=True, eq=False)
class Gradients:
    """Gradients of one batch (or the average over several), per policy id.

    Emitted by ``ComputeGradients``, ``AverageGradients`` and ``AsyncGradients``;
    applied by ``ApplyGradients``.
    """

    #: ``{policy_id: [one array per model parameter]}``.
    grads: dict[str, list[np.ndarray]]
    #: Env steps the gradients were computed on (summed when averaged).
    count: int
    #: Learner stats of the gradient computation per policy id (empty after averaging).
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Raw-observation statistics of the batch per policy id, for policies with an
    #: observation filter (a ``RunningStat`` each; merged when averaged): the learner
    #: adds them to its filter when it applies the gradients. Kept out of ``info``,
    #: which goes into result dicts.
    obs_stats: dict[str, Any] = field(default_factory=dict)
    #: The rollout worker actor that computed them (A3C: only it gets new weights), or None.
    source: Any = None


def _type_name(expected: Any) -> str:
    """``"A"`` for a class, ``"A or B"`` for a union ``A | B``."""
    members = get_args(expected) if isinstance(expected, UnionType) else (expected,)
    return " or ".join(member.__name__ for member in members)


def _describe(item: Any) -> str:
    """Type and a short repr of an unexpected item, for error messages."""
    text = _short.repr(item)
    name = type(item).__name__
    return text if text.startswith(name) else f"{name} {text}"


def expect_item(operator: str, item: Any, expected: type[ItemT] | UnionType) -> ItemT:
    """``item`` if it is an instance of ``expected`` (a class or a union such as
    ``AnyBatch``), else a TypeError naming ``operator``, the expected type and the item.

        grads = expect_item("ApplyGradients", item, Gradients)
    """
    if not isinstance(item, expected):
        raise TypeError(f"{operator} expects {_type_name(expected)} items, "
                        f"got {_describe(item)}")
    return item


def source_and_batch(operator: str, item: Any) -> tuple[Any, AnyBatch]:
    """``(actor, batch)`` of a ``SourcedItem(actor, batch)``; ``(None, batch)`` of a bare
    batch; a TypeError naming ``operator`` for anything else."""
    source, batch = (item.actor, item.item) if isinstance(item, SourcedItem) else (None, item)
    if not isinstance(batch, (SampleBatch, MultiAgentBatch)):
        raise TypeError(f"{operator} expects SampleBatch, MultiAgentBatch or SourcedItem of "
                        f"one, got {_describe(item)}")
    return source, batch


def batch_of(operator: str, item: Any) -> AnyBatch:
    """The batch of a bare batch or of a ``SourcedItem(actor, batch)`` (see
    :func:`source_and_batch`)."""
    return source_and_batch(operator, item)[1]
