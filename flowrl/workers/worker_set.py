"""WorkerSet: one local (learner) worker plus ``num_workers`` remote RolloutWorker actors.

    workers = WorkerSet(env_creator, PPOTorchPolicy, config, num_workers=2)
    workers.foreach_worker(lambda w: w.worker_index)      # [0, 1, 2]
    workers.sync_weights(global_vars={"timestep": 1000})  # one ray.put, refs to all

With ``num_workers=0`` no actor is created and Ray is not needed at all.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Callable, ClassVar

from flowrl.envs.registry import EnvContext
from flowrl.flow.restart import ActorRestarter
from flowrl.workers.actor_start import free_resources, wait_until_started
from flowrl.workers.rollout_worker import RolloutWorker

logger = logging.getLogger(__name__)

# How long stop() waits for recording workers to finish their videos before killing them.
WORKER_STOP_TIMEOUT_S = 10.0


class WorkerSet:
    """The local worker (index 0) and the remote workers (indexes 1..num_workers).

    ``monitor_dir``: the video directory handed to the workers (used when
    ``config["monitor"]`` is on; see RolloutWorker). ``scheduling_strategy``: Ray's
    actor option for the remote workers (None: Ray's default, inside the current
    placement group if there is one; ``"DEFAULT"``: outside it). ``label``: how logs
    and errors name the workers ("Rollout worker 2 (pid ...) died").

    Counters: ``num_worker_restarts`` (read by the Agent's reports; see
    :class:`~flowrl.flow.restart.ActorRestarter`).
    """

    def __init__(self, env_creator: Callable[[EnvContext], Any], policy_cls: type,
                 config: dict, num_workers: int | None = None,
                 monitor_dir: str | None = None, scheduling_strategy: str | None = None,
                 label: str = "Rollout worker"):
        self.env_creator = env_creator
        self.policy_cls = policy_cls
        self.config = config
        self.num_workers = config.get("num_workers", 0) if num_workers is None else num_workers
        self.monitor_dir = monitor_dir
        self._lock = threading.Lock()
        self._local = RolloutWorker(env_creator, policy_cls, config, 0, self.num_workers,
                                    monitor_dir)
        self._remote: list = []
        # Tracks each remote worker's index and replaces dead ones (num_worker_restarts).
        self.restarter = ActorRestarter.from_config("worker", label, self._start_actor,
                                                    config)
        if self.num_workers > 0:
            import ray
            options: dict[str, Any] = {}
            if scheduling_strategy is not None:
                options["scheduling_strategy"] = scheduling_strategy
            needs = {"CPU": float(config.get("num_cpus_per_worker", 1)),
                     "GPU": float(config.get("num_gpus_per_worker", 0))}
            self._actor_cls = ray.remote(RolloutWorker).options(
                num_cpus=needs["CPU"], num_gpus=needs["GPU"], **options)
            free_before = free_resources()
            self._remote = [self.restarter.start(i) for i in range(1, self.num_workers + 1)]
            try:
                wait_until_started(self._remote, f"{label.lower()}s", needs, free_before,
                                   remedy="lower num_workers / num_cpus_per_worker")
            except BaseException:
                for worker in self._remote:
                    ray.kill(worker)
                raise
            self.sync_weights()

    def _start_actor(self, index: int):
        return self._actor_cls.remote(self.env_creator, self.policy_cls, self.config,
                                      index, self.num_workers, self.monitor_dir)

    @property
    def num_worker_restarts(self) -> int:
        """Remote workers replaced so far (the restarter's ``num_worker_restarts``)."""
        return self.restarter.num_restarts

    def local_worker(self) -> RolloutWorker:
        return self._local

    def remote_workers(self) -> list:
        return list(self._remote)

    def policies_to_train(self) -> list[str]:
        """The policy ids the learner trains (``multiagent.policies_to_train``, else all)."""
        local = self._local
        return [pid for pid in local.policy_map if local._trains(pid)]

    def num_healthy_workers(self) -> int:
        return len(self._remote)

    def foreach_worker(self, fn: Callable[[RolloutWorker], Any]) -> list:
        """``fn(worker)`` on the local worker and every remote worker, local first."""
        results = [fn(self._local)]
        if self._remote:
            import ray
            results += ray.get([w.apply.remote(fn) for w in self._remote])
        return results

    def foreach_worker_with_index(self, fn: Callable[[RolloutWorker, int], Any]) -> list:
        """``fn(worker, index)`` on every worker; index 0 is the local worker."""
        results = [fn(self._local, 0)]
        if self._remote:
            import ray
            results += ray.get([w.apply.remote(fn, self.restarter.index_of(w))
                                for w in self._remote])
        return results

    def sync_weights(self, global_vars: dict | None = None,
                     weights: dict | None = None) -> None:
        """Sends the local worker's weights to all remote workers (one ``ray.put``).

        ``weights``: send these instead (e.g. a learner's from another WorkerSet, as
        for evaluation workers); the local worker takes them too.
        """
        if global_vars:
            self._local.set_global_vars(global_vars)
        if weights is not None:
            self._local.set_weights(weights)
        if not self._remote:
            return
        import ray
        weights_ref = ray.put(self._local.get_weights() if weights is None else weights)
        for w in self._remote:
            w.set_weights.remote(weights_ref, global_vars)

    def handle_actor_failure(self, actor, error: Exception):
        """Called by gathers when ``actor`` died: returns a replacement or None.

        Replaces the worker (same index, current weights) through :attr:`restarter`:
        when ``recreate_failed_workers`` is on and fewer than ``max_worker_restarts``
        restarts happened; otherwise raises
        :class:`~flowrl.flow.restart.ActorRestartError` naming the worker, chained to
        the original error.
        """
        with self._lock:
            if not self.restarter.is_tracked(actor):
                return None
            self._remote = [w for w in self._remote if w is not actor]
            new_actor = self.restarter.replace(actor, error)
            import ray
            new_actor.set_weights.remote(ray.put(self._local.get_weights()))
            self._remote.append(new_actor)
            self._remote.sort(key=self.restarter.index_of)
            return new_actor

    def stop(self) -> None:
        """Stops the envs and kills the remote actors.

        With videos on, remote workers first close their envs (up to
        WORKER_STOP_TIMEOUT_S), so that a video in progress is finished.
        """
        try:
            self._local.stop()
        finally:
            if self._remote:
                import ray
                if self.monitor_dir is not None and self.config.get("monitor"):
                    ray.wait([w.stop.remote() for w in self._remote],
                             num_returns=len(self._remote), timeout=WORKER_STOP_TIMEOUT_S)
                for w in self._remote:
                    ray.kill(w)
                self._remote = []


class DeprecatedOptimizerAliases:
    """RLlib 0.x's ``agent.optimizer`` evaluator API, mapped onto a :class:`WorkerSet`.

        agent.optimizer.foreach_evaluator(fn)             # -> agent.workers.foreach_worker(fn)
        agent.optimizer.foreach_evaluator_with_index(fn)  # -> ...foreach_worker_with_index(fn)
        agent.optimizer.local_evaluator                   # -> agent.workers.local_worker()
        agent.optimizer.remote_evaluators                 # -> agent.workers.remote_workers()
        agent.optimizer.workers                           # -> agent.workers

    Each alias works as its new call does and warns once per process with a
    ``DeprecationWarning`` that names the new call.
    """

    _warned: ClassVar[set[str]] = set()

    def __init__(self, workers: WorkerSet):
        self._workers = workers

    def _deprecated(self, old: str, new: str) -> None:
        if old in self._warned:
            return
        self._warned.add(old)
        # stacklevel 3: the user's line, above this helper and the alias.
        warnings.warn(f"agent.optimizer.{old} is RLlib 0.x's API and is deprecated: use "
                      f"{new} instead.", DeprecationWarning, stacklevel=3)

    def foreach_evaluator(self, fn: Callable[[RolloutWorker], Any]) -> list:
        """Deprecated alias of :meth:`WorkerSet.foreach_worker`."""
        self._deprecated("foreach_evaluator(fn)", "agent.workers.foreach_worker(fn)")
        return self._workers.foreach_worker(fn)

    def foreach_evaluator_with_index(self, fn: Callable[[RolloutWorker, int], Any]) -> list:
        """Deprecated alias of :meth:`WorkerSet.foreach_worker_with_index`."""
        self._deprecated("foreach_evaluator_with_index(fn)",
                         "agent.workers.foreach_worker_with_index(fn)")
        return self._workers.foreach_worker_with_index(fn)

    @property
    def local_evaluator(self) -> RolloutWorker:
        """Deprecated alias of :meth:`WorkerSet.local_worker`."""
        self._deprecated("local_evaluator", "agent.workers.local_worker()")
        return self._workers.local_worker()

    @property
    def remote_evaluators(self) -> list:
        """Deprecated alias of :meth:`WorkerSet.remote_workers`."""
        self._deprecated("remote_evaluators", "agent.workers.remote_workers()")
        return self._workers.remote_workers()

    @property
    def workers(self) -> WorkerSet:
        """Deprecated: the WorkerSet itself (``agent.workers``)."""
        self._deprecated("workers", "agent.workers")
        return self._workers
