"""Evolution strategies (Salimans et al. 2017, "Evolution Strategies as a Scalable
Alternative to Reinforcement Learning") as a dataflow plan.

    ESRollouts -> EvalEpisodes -> ESGradientStep -> MergeObservationFilter
        -> StandardMetricsReporting (episodes: the unperturbed evaluation episodes)

One iteration:

    1. one ray.put of (theta, observation-filter statistics), the ref to every ES actor
    2. each actor runs antithetic pairs theta +/- sigma * eps(idx), eps read from the
       shared noise table at random offsets idx, until its share of the episode and
       timestep quotas; plus unperturbed evaluation episodes
    3. centered ranks of all returns; gradient estimate
       g = sum_i (rank_i+ - rank_i-) * eps(idx_i) / (2 * num_pairs)
    4. Adam ascent step on the flat weights (with L2 decay)
    5. workers' observation statistics merged into the driver's filter
    6. report: the mean return of the unperturbed evaluation episodes of the last
       ``report_length`` iterations (a window of ``report_length *
       num_evaluation_episodes`` episodes)

The ES actors (:class:`~flowrl.workers.es_actors.ESActorSet`, started on the first
iteration) are the plan's own; the WorkerSet holds only the local worker (acting,
checkpoints), see :meth:`ESAgent.worker_set_num_workers`. ``num_workers: 0`` runs the
perturbations in the driver process without Ray. The math lives in
:mod:`flowrl.policies.es_math`, the operators in :mod:`flowrl.ops.es`.

Results: ``episodes_this_iter`` / ``episodes_total`` count the evaluation episodes the
reported return comes from; ``info/episodes_so_far`` counts all episodes. ``info``
also holds ``num_pairs``, ``eval_episodes_this_iter``, ``perturbed_reward_mean|max``,
``perturbed_len_mean``, ``weights_norm``, ``grad_norm``, ``update_ratio`` and
``num_es_actor_restarts`` (also as ``num_worker_restarts``).

Default config (tuned for CartPole-v1 on two cores, see ``DEFAULT_CONFIG``):
``noise_size`` is 25M floats (100 MB); the paper's reference code used 250M (1 GB),
which small machines cannot spare. The table only has to be much larger than the
number of parameters (2k-10k for classic-control MLPs) so that slices rarely overlap.
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.flow import Metrics, Plan
from flowrl.ops import StandardMetricsReporting
from flowrl.ops.es import (ESGradientStep, ESRollouts, ESStats, EvalEpisodes,
                           MergeObservationFilter)
from flowrl.policies.es import ESPolicy
from flowrl.policies.es_math import (RETURN_PROC_MODES, batched_weighted_sum,
                                     compute_centered_ranks, create_noise_table,
                                     es_gradient, perturb, process_returns)
from flowrl.workers.es_actors import ESActorSet, ESWorker
from flowrl.workers.worker_set import WorkerSet

# The ES math and worker keep their earlier import path here too.
__all__ = ["DEFAULT_CONFIG", "ESAgent", "ESWorker", "RETURN_PROC_MODES",
           "batched_weighted_sum", "compute_centered_ranks", "create_noise_table",
           "es_gradient", "execution_plan", "perturb", "process_returns"]

DEFAULT_CONFIG: dict = with_common_config({
    # ES actors (not RolloutWorkers); 0 = perturbations run in the driver process.
    "num_workers": 2,
    # Per iteration: at least this many perturbed episodes (pairs count as 2) ...
    "episodes_per_batch": 20,
    # ... and at least this many perturbed env steps.
    "train_batch_size": 1000,
    # sigma: std of the parameter perturbations.
    "noise_stdev": 0.02,
    # Adam step size on the flat weights (ES does not use "lr").
    "stepsize": 0.01,
    # L2 weight decay coefficient added to the gradient.
    "l2_coeff": 0.005,
    # Shared noise table: float32 values (25M = 100 MB; the paper used 250M = 1 GB).
    "noise_size": 25_000_000,
    "noise_seed": 123,
    # Probability that an episode slot runs the unperturbed policy (paper: 0.01-0.03).
    "eval_prob": 0.0,
    # Unperturbed evaluation episodes per iteration, shared among the actors.
    "num_evaluation_episodes": 4,
    # Reported episode_reward_mean: eval episodes of the last report_length iterations.
    "report_length": 3,
    # ES's own filter (frozen per iteration, see flowrl/policies/es.py); checked with
    # the common keys. Other algorithms default to "NoFilter".
    "observation_filter": "MeanStdFilter",
    # Gaussian noise on Box actions in perturbed episodes (not in evaluation).
    "action_noise_std": 0.01,
    # "centered_rank" (ranks scaled to [-0.5, 0.5]) or "raw" returns.
    "return_proc_mode": "centered_rank",
    "model": {"fcnet_hiddens": [32, 32], "fcnet_activation": "tanh"},
})


def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
    policy = workers.local_worker().get_policy()
    # Started on the first iteration: an agent built only to act starts no actors.
    actors = ESActorSet(workers.env_creator, config, policy.num_params)
    eval_episodes = EvalEpisodes()
    # (1)-(2) broadcast theta + filter statistics; perturbed and evaluation episodes
    train_op = (ESRollouts(actors, policy, metrics, config)
                .for_each(eval_episodes)
                # (3)-(4) centered ranks -> gradient estimate -> Adam step
                .for_each(ESGradientStep(policy, actors, metrics, config))
                # (5) statistics recorded under this iteration's filter feed the next
                .for_each(MergeObservationFilter(policy)))
    # (6) the reported return: evaluation episodes of the last report_length iterations
    window = config["report_length"] * max(1, config["num_evaluation_episodes"])
    plan = StandardMetricsReporting(train_op, workers,
                                    {**config, "metrics_smoothing_episodes": window},
                                    metrics, episodes=eval_episodes.pop,
                                    extra_stats=ESStats(actors, metrics))
    return plan.owning(actors)  # Agent.stop() stops the ES actors


class ESAgent(Agent):
    """Evolution strategies; see the module docstring for one iteration.

        agent = ESAgent(env="CartPole-v1")
        result = agent.train()   # episode_reward_mean: unperturbed evaluation episodes

    Reads counters: num_steps_sampled (all env steps, evaluation included),
    num_steps_trained (perturbed steps), episodes_so_far (all episodes).
    """

    _name = "ES"
    _default_config = DEFAULT_CONFIG
    _policy_class = ESPolicy
    execution_plan = staticmethod(execution_plan)

    @classmethod
    def worker_set_num_workers(cls, config: dict) -> int:
        # ES runs its own actors; the WorkerSet keeps only the local worker.
        return 0

    @classmethod
    def validate_config(cls, config: dict) -> None:
        require(config["noise_stdev"] > 0, f"noise_stdev={config['noise_stdev']!r} must be > 0.")
        require(config["stepsize"] > 0, f"stepsize={config['stepsize']!r} must be > 0.")
        require(config["l2_coeff"] >= 0, f"l2_coeff={config['l2_coeff']!r} must be >= 0.")
        require(config["noise_size"] >= 1, f"noise_size={config['noise_size']!r} must be >= 1.")
        require(config["episodes_per_batch"] >= 2,
                f"episodes_per_batch={config['episodes_per_batch']!r} must be >= 2 "
                "(one antithetic pair).")
        require(0.0 <= config["eval_prob"] < 1.0,
                f"eval_prob={config['eval_prob']!r} must be in [0, 1).")
        require(config["num_evaluation_episodes"] >= 0,
                f"num_evaluation_episodes={config['num_evaluation_episodes']!r} must be >= 0.")
        require(config["report_length"] >= 1,
                f"report_length={config['report_length']!r} must be >= 1.")
        require(config["action_noise_std"] >= 0,
                f"action_noise_std={config['action_noise_std']!r} must be >= 0.")
        require(config["return_proc_mode"] in RETURN_PROC_MODES,
                f"return_proc_mode={config['return_proc_mode']!r}; expected one of "
                f"{RETURN_PROC_MODES}.")
        require(config["num_evaluation_episodes"] > 0 or config["eval_prob"] > 0,
                "ES reports the return of unperturbed episodes: set "
                "num_evaluation_episodes > 0 or eval_prob > 0.")
        require(not config["multiagent"]["policies"],
                "ES runs single-agent envs only: remove multiagent.policies.")

    def es_actors(self) -> ESActorSet:
        """The ES actor set the plan owns."""
        (actor_set,) = [r for r in self.plan.owns if isinstance(r, ESActorSet)]
        return actor_set

    def es_workers(self) -> list:
        """The ES actors (or the one local ESWorker with ``num_workers: 0``); empty
        before the first iteration."""
        return self.es_actors().actors()
