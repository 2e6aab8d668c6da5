"""One restart policy for sets of Ray actors: start actors by index, replace dead ones.

Rollout workers, replay shards and ES actors all use it, so they count, log and fail
the same way::

    restarter = ActorRestarter.from_config("worker", "Rollout worker", start_worker, config)
    actors = [restarter.start(i) for i in (1, 2)]
    ...                                     # a gather sees actors[0] die:
    new = restarter.replace(actors[0], error)   # same index; logged and counted
    restarter.counters()                        # {"num_worker_restarts": 1}

``kind`` names the counter (``num_<kind>_restarts``), ``label`` names the actor in
messages (``"Rollout worker 2 (pid 4242) died ..."``). When restarts are off or the
budget is spent, :meth:`ActorRestarter.replace` raises :class:`ActorRestartError`, which
names the actor and chains the original error (``__cause__``, with its traceback).
Actors must expose ``get_pid()``: it is asked when the actor starts, so that a message
about its death can name the process that died.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Generic, Mapping, TypeVar

__all__ = ["ActorRestartError", "ActorRestarter", "MAX_RESTARTS_KEY", "RESTARTS_ENABLED_KEY"]

logger = logging.getLogger(__name__)

#: The config keys :meth:`ActorRestarter.from_config` reads (and messages name).
RESTARTS_ENABLED_KEY = "recreate_failed_workers"
MAX_RESTARTS_KEY = "max_worker_restarts"
# How long a death message waits for the dead actor's pid (asked at start).
_PID_WAIT_S = 0.5

A = TypeVar("A")


class ActorRestartError(RuntimeError):
    """A dead actor that is not replaced (restarts off, or the restart budget spent).

    The message names the actor and the original error; the original error is the
    ``__cause__``, so its traceback prints above this one.
    """


class ActorRestarter(Generic[A]):
    """Starts the actors of one kind by index and replaces dead ones, at most
    ``max_restarts`` times in total. Thread-safe.

    Args:
        kind: counter name part: ``"worker"`` -> ``num_worker_restarts``.
        label: how messages name one actor: ``"Rollout worker"``, ``"Replay shard"``.
        start: ``start(index) -> actor handle``; called for first starts and restarts.
        max_restarts: replacements allowed over the restarter's lifetime.
        enabled: False: a death is raised at once (as :class:`ActorRestartError`).
    """

    def __init__(self, kind: str, label: str, start: Callable[[int], A], *,
                 max_restarts: int = 100, enabled: bool = True):
        self.kind = kind
        self.label = label
        self.max_restarts = int(max_restarts)
        self.enabled = bool(enabled)
        self.num_restarts = 0
        self._start = start
        self._index_of: dict[Any, int] = {}
        self._pid_ref_of: dict[Any, Any] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, kind: str, label: str, start: Callable[[int], A],
                    config: Mapping[str, Any]) -> "ActorRestarter[A]":
        """A restarter set by ``recreate_failed_workers`` [True] and
        ``max_worker_restarts`` [100] (one budget per actor set)."""
        return cls(kind, label, start, max_restarts=config.get(MAX_RESTARTS_KEY, 100),
                   enabled=config.get(RESTARTS_ENABLED_KEY, True))

    @property
    def counter_name(self) -> str:
        """``num_<kind>_restarts``."""
        return f"num_{self.kind}_restarts"

    def counters(self) -> dict[str, int]:
        """``{counter_name: restarts so far}``, for result dicts."""
        return {self.counter_name: self.num_restarts}

    # -- tracking ---------------------------------------------------------------------
    def start(self, index: int) -> A:
        """Starts the actor with ``index`` and tracks it."""
        actor = self._start(index)
        with self._lock:
            self._index_of[actor] = index
            self._pid_ref_of[actor] = actor.get_pid.remote()
        return actor

    def index_of(self, actor: A) -> int:
        """The index a tracked actor was started with."""
        with self._lock:
            return self._index_of[actor]

    def is_tracked(self, actor: A) -> bool:
        """False for actors this restarter did not start or already replaced."""
        with self._lock:
            return actor in self._index_of

    def describe(self, actor: A) -> str:
        """``"<label> <index> (pid <pid>)"`` (pid ``?`` when the actor never answered)."""
        import ray

        with self._lock:
            index = self._index_of.get(actor, "?")
            pid_ref = self._pid_ref_of.get(actor)
        try:
            pid = ray.get(pid_ref, timeout=_PID_WAIT_S) if pid_ref is not None else "?"
        except Exception:  # it died before answering
            pid = "?"
        return f"{self.label} {index} (pid {pid})"

    # -- failures ---------------------------------------------------------------------
    def replace(self, actor: A, error: BaseException) -> A | None:
        """A new actor with the dead ``actor``'s index, or None when ``actor`` is not
        tracked (already replaced, or not started here).

        Raises:
            ActorRestartError: restarts are off or ``max_restarts`` were used; it names
                the actor and chains ``error``.
        """
        with self._lock:
            if actor not in self._index_of:
                return None
            who = self.describe(actor)
            index = self._index_of.pop(actor)
            self._pid_ref_of.pop(actor, None)
            if not self.enabled:
                raise ActorRestartError(f"{who} died and {RESTARTS_ENABLED_KEY} is off: "
                                        f"{error}") from error
            if self.num_restarts >= self.max_restarts:
                raise ActorRestartError(
                    f"{who} died after {MAX_RESTARTS_KEY}={self.max_restarts} "
                    f"{self.label.lower()} replacements were used: {error}") from error
            self.num_restarts += 1
            logger.warning("%s died (%s: %s); starting replacement %d of at most %d.",
                           who, type(error).__name__, _first_line(error), self.num_restarts,
                           self.max_restarts)
            return self.start(index)

    def forget(self, actor: A) -> None:
        """Stops tracking ``actor`` (it was stopped on purpose)."""
        with self._lock:
            self._index_of.pop(actor, None)
            self._pid_ref_of.pop(actor, None)

    def __repr__(self) -> str:
        return (f"ActorRestarter({self.label!r}, {self.counter_name}={self.num_restarts}, "
                f"max_restarts={self.max_restarts}, enabled={self.enabled})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
