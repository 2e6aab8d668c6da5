"""StandardMetricsReporting: turns a training stream into one result dict per iteration."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

import numpy as np

from flowrl.workers.callbacks import summarize_custom_metrics
from flowrl.flow import LocalIterator, Metrics, NotReady, Plan
from flowrl.ops.counters import LEARNER_INFO, NUM_STEPS_SAMPLED, NUM_STEPS_TRAINED
from flowrl.workers.worker_set import WorkerSet

logger = logging.getLogger(__name__)


class CollectMetrics:
    """Builds a result dict from worker episode stats, counters and timers.

        CollectMetrics(workers, metrics, smoothing_episodes=100)()  -> {"episode_reward_mean": ...}

    Episode stats come from ``selected_workers`` (default: all remote workers, or the
    local worker when there are none; a callable returning the list follows worker
    replacements), or from ``episodes()`` when given (``[(return, length)]`` finished
    since its last call, e.g. ES evaluation episodes kept on the driver); means are
    over the last ``smoothing_episodes``. ``extra_stats()`` adds keys to the result;
    its ``"info"`` dict is merged into ``result["info"]``.
    Custom metrics that callbacks set on episodes (``EpisodeStats.custom_metrics``) are
    summarized over the same window as ``result["custom_metrics"]["<name>_mean"]``
    (and ``_min``, ``_max``).
    Reads counters: num_steps_sampled and all others (reported under ``info``).
    """

    def __init__(self, workers: WorkerSet, metrics: Metrics, smoothing_episodes: int = 100,
                 selected_workers: list | Callable[[], list] | None = None,
                 extra_stats: Callable[[], dict] | None = None,
                 episodes: Callable[[], list] | None = None):
        self.workers = workers
        self.metrics = metrics
        self.selected_workers = selected_workers
        self.extra_stats = extra_stats
        self.episode_source = episodes
        self.episodes: collections.deque = collections.deque(maxlen=smoothing_episodes)
        self.episodes_total = 0
        self.last_steps = 0
        self.last_trained = 0
        self.last_time = time.perf_counter()

    def _fetch_episodes(self) -> list[tuple[float, int]]:
        if self.episode_source is not None:
            return list(self.episode_source())
        remote = self.selected_workers if self.selected_workers is not None \
            else self.workers.remote_workers()
        if callable(remote):
            remote = remote()
        if not remote:
            return self.workers.local_worker().get_metrics()
        import ray
        episodes = []
        refs = {w.get_metrics.remote(): w for w in remote}
        for ref, worker in refs.items():
            try:
                episodes.extend(ray.get(ref))
            except ray.exceptions.RayActorError as error:
                # The rollout gathers replace dead workers; their stats are lost.
                logger.warning("Could not collect episode stats from a dead worker: %s",
                               error)
        return episodes

    def __call__(self, _item: Any = None) -> dict:
        new_episodes = self._fetch_episodes()
        self.episodes.extend(new_episodes)
        self.episodes_total += len(new_episodes)
        returns = [r for r, _ in self.episodes]
        lengths = [n for _, n in self.episodes]
        steps = self.metrics.get(NUM_STEPS_SAMPLED)
        trained = self.metrics.get(NUM_STEPS_TRAINED)
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        result = {
            "episode_reward_mean": float(np.mean(returns)) if returns else float("nan"),
            "episode_reward_min": float(np.min(returns)) if returns else float("nan"),
            "episode_reward_max": float(np.max(returns)) if returns else float("nan"),
            "episode_len_mean": float(np.mean(lengths)) if lengths else float("nan"),
            "episodes_this_iter": len(new_episodes),
            "episodes_total": self.episodes_total,
            # Plain (return, length) tuples (no callbacks involved) carry none.
            "custom_metrics": summarize_custom_metrics(
                getattr(e, "custom_metrics", None) for e in self.episodes),
            "timesteps_total": steps,
            "timesteps_this_iter": steps - self.last_steps,
            "num_healthy_workers": self.workers.num_healthy_workers(),
            "info": {**self.metrics.counters_snapshot(),
                     "num_worker_restarts": self.workers.num_worker_restarts,
                     LEARNER_INFO: _scalar_stats(self.metrics.info.get(LEARNER_INFO, {}))},
            "timers": {**self.metrics.timers_snapshot(),
                       "sampled_steps_per_s": (steps - self.last_steps) / elapsed,
                       "trained_steps_per_s": (trained - self.last_trained) / elapsed},
        }
        result.update(_policy_reward_stats(self.episodes))
        if self.extra_stats is not None:
            extra = dict(self.extra_stats())
            result["info"].update(extra.pop("info", {}))
            result.update(extra)
        self.last_steps, self.last_trained, self.last_time = steps, trained, now
        return result

    def save(self) -> dict:
        return {"episodes_total": self.episodes_total, "last_steps": self.last_steps}

    def restore(self, state: dict) -> None:
        self.episodes_total = state.get("episodes_total", 0)
        self.last_steps = state.get("last_steps", 0)


def _policy_reward_stats(episodes: Any) -> dict:
    """Multi-agent episodes: ``policy_reward_mean|min|max`` = ``{policy_id: value}``
    over the smoothing window (empty for single-agent runs)."""
    per_policy: dict[str, list[float]] = collections.defaultdict(list)
    for episode in episodes:
        for pid, reward in getattr(episode, "policy_rewards", {}).items():
            per_policy[pid].append(reward)
    if not per_policy:
        return {}
    return {f"policy_reward_{name}": {pid: float(fn(values))
                                      for pid, values in per_policy.items()}
            for name, fn in (("mean", np.mean), ("min", np.min), ("max", np.max))}


def _scalar_stats(learner_info: dict) -> dict:
    """Per-policy learner stats without per-row arrays (e.g. DQN's ``td_error``)."""
    return {pid: {k: v for k, v in stats.items() if np.ndim(v) == 0}
            for pid, stats in learner_info.items()}


class IdleBackoff:
    """How a driver loop waits after a ``NotReady`` pull: not at all if the plan made
    progress since the previous pull, else a short sleep that doubles (0.1 ms to 5 ms).

        backoff = IdleBackoff(metrics)
        if next(train_op) is NotReady: backoff.not_ready()
        else: backoff.reset()

    A branch that runs for its side effects only (DQN's sampling branch) hands every
    item to the consumer as NotReady; sleeping after those would stall a loop that
    is busy, not idle (about 0.2 ms, up to 2 ms on a loaded machine, per DQN round
    of 4 env steps). Progress is read from the counters num_steps_sampled and
    num_steps_trained.
    """

    MIN_S = 1e-4
    MAX_S = 5e-3

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.delay = self.MIN_S
        self.last_progress = self._progress()

    def _progress(self) -> tuple[int, int]:
        return self.metrics.get(NUM_STEPS_SAMPLED), self.metrics.get(NUM_STEPS_TRAINED)

    def not_ready(self) -> None:
        """After a NotReady pull: sleep unless the counters moved since the last pull."""
        progress = self._progress()
        if progress != self.last_progress:
            self.last_progress = progress
            self.delay = self.MIN_S
            return
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, self.MAX_S)

    def reset(self) -> None:
        """After a real item: the next idle wait starts short again."""
        self.delay = self.MIN_S
        self.last_progress = self._progress()


def StandardMetricsReporting(train_op: LocalIterator, workers: WorkerSet, config: dict,
                             metrics: Metrics, selected_workers: list | Callable[[], list] | None = None,
                             extra_stats: Callable[[], dict] | None = None,
                             episodes: Callable[[], list] | None = None) -> Plan:
    """A Plan whose results are one training iteration's result dict each.

        train_op = rollouts.combine(ConcatBatches(4000)).for_each(TrainOneStep(...))
        plan = StandardMetricsReporting(train_op, workers, config, metrics)
        result = next(plan)
        return plan.owning(learner_thread)    # in an execution plan

    The Plan's state holds ``"reporting"`` (episode totals), so checkpoints keep them.

    Pulls ``train_op`` until at least ``timesteps_per_iteration`` new steps were sampled
    and ``min_iter_time_s`` passed (with neither set: until one item arrived), then
    reports.
    NotReady items are waited out here with a short back-off (see :class:`IdleBackoff`:
    none after a NotReady that stands for a side branch's progress), so results are
    never NotReady. ``extra_stats()`` adds plan-specific keys (e.g. replay buffer stats; an
    ``"info"`` dict is merged into ``info``); ``episodes()`` replaces the workers as
    the episode source (see :class:`CollectMetrics`).
    Reads counters: num_steps_sampled, num_steps_trained.
    """
    collect = CollectMetrics(workers, metrics, config.get("metrics_smoothing_episodes", 100),
                             selected_workers, extra_stats, episodes)
    min_steps = config.get("timesteps_per_iteration", 0)
    min_time = config.get("min_iter_time_s", 0)

    def iteration_done(pulled: int, start_steps: int, start_time: float) -> bool:
        if metrics.get(NUM_STEPS_SAMPLED) - start_steps < min_steps:
            return False
        if time.perf_counter() - start_time < min_time:
            return False
        # With thresholds set, an iteration may end with no output item (e.g. Ape-X
        # before learning starts); without any, it waits for one.
        return pulled > 0 or min_steps > 0 or min_time > 0

    def reports(_non_blocking: bool):
        backoff = IdleBackoff(metrics)
        while True:
            start_time = time.perf_counter()
            start_steps = metrics.get(NUM_STEPS_SAMPLED)
            pulled = 0
            while not iteration_done(pulled, start_steps, start_time):
                if next(train_op) is NotReady:
                    backoff.not_ready()
                else:
                    pulled += 1
                    backoff.reset()
            yield collect()

    reporter = LocalIterator(reports, metrics,
                             name=f"{train_op.name} -> StandardMetricsReporting")
    return Plan(reporter, state={"reporting": collect})
