"""Evolution-strategies operators: one ES iteration as a pipeline.

    actors = ESActorSet(workers.env_creator, config, policy.num_params)
    eval_episodes = EvalEpisodes()
    train_op = (ESRollouts(actors, policy, metrics, config)       # perturbed episodes
                .for_each(eval_episodes)                          # kept for reporting
                .for_each(ESGradientStep(policy, actors, metrics, config))
                .for_each(MergeObservationFilter(policy)))
    plan = StandardMetricsReporting(train_op, workers, config, metrics,
                                    episodes=eval_episodes.pop,
                                    extra_stats=ESStats(actors, metrics))

Items between the operators are :class:`~flowrl.workers.es_actors.ESRolloutResult`.
"""

from __future__ import annotations

import threading
from typing import Any

from flowrl.flow import LocalIterator, Metrics
from flowrl.ops.counters import LEARN_TIMER, NUM_STEPS_SAMPLED, NUM_STEPS_TRAINED, SAMPLE_TIMER
from flowrl.policies.es import ESPolicy
from flowrl.policies.es_math import es_gradient
from flowrl.workers.es_actors import ESActorSet, ESRolloutResult

__all__ = ["ES_INFO", "NUM_ES_EPISODES", "ESGradientStep", "ESRollouts", "ESStats",
           "EvalEpisodes", "MergeObservationFilter"]

#: ``metrics.info`` key of the latest iteration's ES statistics (reported under ``info``).
ES_INFO = "es"
#: Counter of all ES episodes, perturbed and evaluation (``info/episodes_so_far``).
NUM_ES_EPISODES = "episodes_so_far"


def ESRollouts(actors: ESActorSet, policy: ESPolicy, metrics: Metrics,
               config: dict) -> LocalIterator[ESRolloutResult]:
    """Source: one item per ES iteration, the episodes of all actors.

        train_op = ESRollouts(actors, policy, metrics, config).for_each(...)

    Each round broadcasts the policy's flat weights and observation-filter statistics
    (one ``ray.put``), then runs at least ``episodes_per_batch`` perturbed episodes
    and ``train_batch_size`` perturbed steps plus ``num_evaluation_episodes``
    unperturbed ones, split among the actors.
    Counters: num_steps_sampled (all env steps, evaluation included),
    episodes_so_far (all episodes); timer ``sample``; info ``es`` (pairs, perturbed
    returns, evaluation episodes of the round).
    """
    quotas = (config["episodes_per_batch"], config["train_batch_size"],
              config["num_evaluation_episodes"])

    def one_round() -> ESRolloutResult:
        params = {"weights": policy.get_flat_weights(),
                  "filter": policy.filter.stats.to_dict()}
        with metrics.timer(SAMPLE_TIMER) as timer:
            result = actors.run(params, *quotas)
        timer.push_units_processed(result.num_steps)
        metrics.inc(NUM_STEPS_SAMPLED, result.num_steps)
        metrics.inc(NUM_ES_EPISODES, result.num_episodes)
        metrics.update_info(ES_INFO, {
            "num_pairs": result.num_pairs,
            "eval_episodes_this_iter": len(result.eval_returns),
            "perturbed_reward_mean": float(result.returns.mean()),
            "perturbed_reward_max": float(result.returns.max()),
            "perturbed_len_mean": float(result.lengths.mean())})
        return result

    return LocalIterator(lambda _non_blocking: iter(one_round, None), metrics,
                         name=f"ESRollouts({actors!r})")


class EvalEpisodes:
    """Keeps the evaluation episodes of each item for the reporting (which pops them).

        eval_episodes = EvalEpisodes()
        train_op = ESRollouts(...).for_each(eval_episodes)
        StandardMetricsReporting(..., episodes=eval_episodes.pop)

    No counters.
    """

    def __init__(self) -> None:
        self._episodes: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def __call__(self, result: ESRolloutResult) -> ESRolloutResult:
        with self._lock:
            self._episodes.extend(result.eval_episodes)
        return result

    def pop(self) -> list[tuple[float, int]]:
        """``[(return, length)]`` kept since the last call."""
        with self._lock:
            episodes, self._episodes = self._episodes, []
        return episodes

    def __repr__(self) -> str:
        return "EvalEpisodes"


class ESGradientStep:
    """Centered ranks (or raw returns) -> gradient estimate -> Adam step on the policy's
    flat weights (with ``l2_coeff`` decay).

        train_op = ESRollouts(...).for_each(ESGradientStep(policy, actors, metrics, config))

    g = sum_i (f(R_i+) - f(R_i-)) * eps(idx_i) / (2 * num_pairs), eps read from the
    actors' shared noise table.
    Counters: num_steps_trained (perturbed steps); timer ``learn``; info ``es``
    (weights_norm, grad_norm, update_ratio).
    """

    def __init__(self, policy: ESPolicy, actors: ESActorSet, metrics: Metrics, config: dict):
        self.policy = policy
        self.actors = actors
        self.metrics = metrics
        self.mode = config["return_proc_mode"]
        self.l2_coeff = config["l2_coeff"]

    def __call__(self, result: ESRolloutResult) -> ESRolloutResult:
        with self.metrics.timer(LEARN_TIMER):
            grad = es_gradient(result.returns, self.actors.noise_table(),
                               result.noise_indices, self.policy.num_params, self.mode)
            stats = self.policy.apply_es_gradient(grad, self.l2_coeff)
        self.metrics.inc(NUM_STEPS_TRAINED, result.perturbed_steps)
        self.metrics.update_info(ES_INFO, stats)
        return result

    def __repr__(self) -> str:
        return f"ESGradientStep({self.mode})"


class MergeObservationFilter:
    """Merges the observation statistics the workers recorded into the policy's filter.

        train_op = ...for_each(ESGradientStep(...)).for_each(MergeObservationFilter(policy))

    After the update: statistics gathered under the old filter feed the next
    iteration's one (the filter stays frozen within an iteration). No counters.
    """

    def __init__(self, policy: ESPolicy):
        self.policy = policy

    def __call__(self, result: ESRolloutResult) -> ESRolloutResult:
        for buffer in result.filter_buffers:
            self.policy.filter.merge_buffer(buffer)
        return result

    def __repr__(self) -> str:
        return "MergeObservationFilter"


class ESStats:
    """``extra_stats`` for the reporting: the ES actors' health and restarts, and the
    latest iteration's ES info.

        StandardMetricsReporting(..., extra_stats=ESStats(actors, metrics))

    ``num_healthy_workers`` counts ES actors; ``info`` gains the ``es`` info,
    ``num_es_actor_restarts`` and, since ES's workers are its actors,
    ``num_worker_restarts`` with the same value. Reads counters: none.
    """

    def __init__(self, actors: ESActorSet, metrics: Metrics):
        self.actors = actors
        self.metrics = metrics

    def __call__(self) -> dict[str, Any]:
        restarts = self.actors.counters()
        return {"num_healthy_workers": self.actors.num_healthy(),
                "info": {**self.metrics.info.get(ES_INFO, {}), **restarts,
                         "num_worker_restarts": sum(restarts.values())}}

    def __repr__(self) -> str:
        return "ESStats"
