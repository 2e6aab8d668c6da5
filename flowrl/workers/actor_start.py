"""Waiting for freshly created actors (rollout workers, learners) to come up.

One rule for every kind of actor a :class:`~flowrl.workers.worker_set.WorkerSet` or a
:class:`~flowrl.workers.learner_group.LearnerGroup` starts::

    actors = [actor_cls.remote(...) for _ in range(n)]
    wait_until_started(actors, "rollout workers", {"CPU": 1.0}, free_before,
                       remedy="lower num_workers / num_cpus_per_worker")

* Actors that cannot get their resources (another agent or actor holds them) fail
  after :data:`START_TIMEOUT_S`, with the numbers, instead of hanging.
* Actors that got them (the cluster's free amount dropped by their share since
  ``free_before``), or that have them free to take, are only slow to start, as on a
  busy machine: they get up to :data:`CONSTRUCT_TIMEOUT_S`, with a warning each
  :data:`START_TIMEOUT_S`.
* A construction error (bad env, bad policy config) surfaces with the actor's traceback.

Every actor class used here has a ``ping()`` method.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds actors may wait for resources before the error says why they can't get them.
START_TIMEOUT_S = 60.0
#: Seconds actors that hold their resources may take to construct (a busy machine).
CONSTRUCT_TIMEOUT_S = 600.0


def free_resources() -> dict[str, float]:
    """The Ray cluster's free resources now (call before creating the actors)."""
    import ray
    return dict(ray.available_resources())


def _starting(pending: int, needs: dict[str, float], free_before: dict[str, float],
              free: dict[str, float]) -> bool:
    """Whether ``pending`` actors hold, or can take, every resource they need."""
    for name, each in needs.items():
        share = pending * each
        if share <= 0:
            continue
        got = free_before.get(name, 0.0) - free.get(name, 0.0) >= share - 1e-9
        if not (got or free.get(name, 0.0) >= share - 1e-9):
            return False
    return True


def wait_until_started(actors: list[Any], label: str, needs: dict[str, float],
                       free_before: dict[str, float], remedy: str) -> None:
    """Returns once every actor answers ``ping()``; raises RuntimeError when some
    cannot get ``needs`` (resources per actor, e.g. ``{"CPU": 1, "GPU": 0}``) within
    :data:`START_TIMEOUT_S`, or do not start within :data:`CONSTRUCT_TIMEOUT_S`. The
    message names ``label`` and ends with ``remedy``. The caller stops the actors on
    an error."""
    import ray
    step = START_TIMEOUT_S
    pings = [actor.ping.remote() for actor in actors]
    pending, waited = list(pings), 0.0
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=step)
        waited += step
        if not pending:
            break
        free = free_resources()
        if _starting(len(pending), needs, free_before, free) and waited < CONSTRUCT_TIMEOUT_S:
            logger.warning("%d of %d %s still starting after %.0f s (a busy machine?); "
                           "waiting up to %.0f s", len(pending), len(actors), label, waited,
                           CONSTRUCT_TIMEOUT_S)
            continue
        total = ray.cluster_resources()
        wanted = " and ".join(f"{each:g} {name}" for name, each in needs.items())
        has = ", ".join(f"{free.get(name, 0.0):g} of {total.get(name, 0.0):g} {name}s free"
                        for name, each in needs.items() if each > 0)
        raise RuntimeError(
            f"{len(pending)} of {len(actors)} {label} did not start within {waited:g} s: "
            f"each needs {wanted} and the Ray cluster has {has}. Another agent or actor "
            f"may hold them (call its stop()), or {remedy}.")
    ray.get(pings)  # raises an actor's construction error with its traceback
