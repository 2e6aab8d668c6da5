"""The ES actors: workers that run antithetic perturbed episodes, and the set of them.

    actors = ESActorSet(env_creator, config, policy.num_params)
    params = {"weights": policy.get_flat_weights(), "filter": policy.filter.stats.to_dict()}
    result = actors.run(params, min_episodes=20, min_steps=1000, num_eval=4)
    result.returns           # [pairs, 2]: theta + sigma * eps(idx), theta - sigma * eps(idx)
    actors.stop()

The noise table (``noise_size`` float32 values from ``noise_seed``) is created once and
``ray.put`` once; actors read their slices zero-copy from the object store, so a
perturbation travels as one integer. Each :meth:`ESActorSet.run` broadcasts one
``ray.put`` of the weights and filter statistics and splits the iteration's quotas
among the actors (one call, many episodes each). A dead actor is replaced through an
:class:`~flowrl.flow.restart.ActorRestarter` (counter ``num_es_actor_restarts``) and
its share is run again by the replacement. ``num_workers: 0`` runs one
:class:`ESWorker` in this process, without Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import numpy as np
import torch

from flowrl.envs.compat import ensure_gymnasium_env
from flowrl.envs.context import EnvContext
from flowrl.envs.episodes import EpisodeRunner, EpisodeStep
from flowrl.flow.restart import ActorRestarter
from flowrl.policies.es import ESPolicy
from flowrl.policies.es_math import create_noise_table, perturb
from flowrl.workers.rollout_worker import worker_seed

__all__ = ["ESActorSet", "ESRolloutResult", "ESWorker"]


@dataclasses.dataclass
class ESRolloutResult:
    """Episodes of one or more :meth:`ESWorker.do_rollouts` calls.

    ``noise_indices [k]``, ``returns`` / ``lengths [k, 2]`` (pos, neg member of each
    antithetic pair), ``env_seeds [k]`` (both members start from the same seed),
    unperturbed evaluation episodes ``eval_returns`` / ``eval_lengths``, and the
    observation statistics each worker recorded (``filter_buffers``, one per call).
    """

    noise_indices: np.ndarray
    returns: np.ndarray
    lengths: np.ndarray
    env_seeds: np.ndarray
    eval_returns: list[float]
    eval_lengths: list[int]
    filter_buffers: list[dict]

    @property
    def num_pairs(self) -> int:
        return int(len(self.noise_indices))

    @property
    def perturbed_steps(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_steps(self) -> int:
        """All env steps, evaluation included."""
        return self.perturbed_steps + int(sum(self.eval_lengths))

    @property
    def num_episodes(self) -> int:
        """All episodes, evaluation included."""
        return int(self.lengths.size) + len(self.eval_returns)

    @property
    def eval_episodes(self) -> list[tuple[float, int]]:
        """``[(return, length)]`` of the unperturbed evaluation episodes."""
        return list(zip(self.eval_returns, self.eval_lengths))

    @staticmethod
    def concat(parts: list["ESRolloutResult"]) -> "ESRolloutResult":
        return ESRolloutResult(
            np.concatenate([p.noise_indices for p in parts]),
            np.concatenate([p.returns for p in parts]).reshape(-1, 2),
            np.concatenate([p.lengths for p in parts]).reshape(-1, 2),
            np.concatenate([p.env_seeds for p in parts]),
            [r for p in parts for r in p.eval_returns],
            [n for p in parts for n in p.eval_lengths],
            [b for p in parts for b in p.filter_buffers])


class ESWorker:
    """Runs perturbed and evaluation episodes; a Ray actor or a local object.

    Args:
        env_creator: ``fn(EnvContext) -> env`` (the Agent's creator).
        config: the full ES config.
        noise: the noise table, or ``[ref]`` holding the object-store ref to it (a ref
            nested in a list reaches the actor unresolved, so it can report which
            object it reads; the array itself is a zero-copy view of shared memory).
        worker_index: 1..N; seeds ``seed + 1000 * worker_index``.
        num_workers: number of ES actors (for the EnvContext).
    """

    def __init__(self, env_creator: Callable[[EnvContext], Any], config: dict,
                 noise: np.ndarray | list, worker_index: int = 1, num_workers: int = 0):
        if worker_index > 0 and num_workers > 0:
            torch.set_num_threads(1)  # one core per actor; small-net torch hates sharing
        self.worker_index = worker_index
        self.noise_ref = None
        if isinstance(noise, list):
            import ray
            self.noise_ref = noise[0]
            noise = ray.get(self.noise_ref)
        self.noise = noise
        seed = worker_seed(config.get("seed"), worker_index)
        self.env = ensure_gymnasium_env(env_creator(
            EnvContext(config.get("env_config", {}), worker_index, 0, num_workers)))
        self.runner = EpisodeRunner(self.env)  # the policy clips Box actions itself
        self.policy = ESPolicy(self.env.observation_space, self.env.action_space,
                               {**config, "seed": seed})
        if self.policy.num_params > len(self.noise):
            raise ValueError(f"noise_size={len(self.noise)} is smaller than the policy's "
                             f"{self.policy.num_params} parameters.")
        self.rng = np.random.default_rng(seed)
        self.sigma = float(config["noise_stdev"])
        self.eval_prob = float(config["eval_prob"])

    def rollout(self, add_noise: bool, env_seed: int | None = None,
                record: bool = False) -> tuple[float, int]:
        """One episode with the current weights; returns ``(return, length)``.

        ``add_noise``: action noise on Box actions (perturbed episodes). ``record``
        adds the episode's observations to the filter buffer.
        """
        policy = self.policy
        seen: list = []

        def remember(step: EpisodeStep) -> None:
            seen.append(step.obs)

        result = self.runner.run(
            functools.partial(policy.compute_single_action, explore=add_noise),
            seed=env_seed, on_step=remember if record else None)
        if record:
            policy.filter.record(policy.preprocess(np.stack(seen)))
        return result.episode_return, result.length

    def do_rollouts(self, params: dict, min_episodes: int, min_timesteps: int,
                    num_eval: int = 0) -> ESRolloutResult:
        """``num_eval`` evaluation episodes, then antithetic pairs until both minimums
        are met (plus an evaluation episode per slot with probability ``eval_prob``).

        ``params``: ``{"weights": theta, "filter": filter statistics}``; the filter is
        frozen for the call (its statistics change only on the driver).
        """
        policy = self.policy
        theta = np.asarray(params["weights"], dtype=np.float32)
        policy.filter.set_state(params["filter"])  # frozen for this call; clears the buffer
        n = policy.num_params
        eval_returns, eval_lengths = [], []

        def evaluate() -> None:
            policy.set_flat_weights(theta)
            r, length = self.rollout(add_noise=False,
                                     env_seed=int(self.rng.integers(2**31 - 1)))
            eval_returns.append(r)
            eval_lengths.append(length)

        for _ in range(num_eval):
            evaluate()
        indices, returns, lengths, seeds = [], [], [], []
        episodes = steps = 0
        while episodes < min_episodes or steps < min_timesteps:
            if self.eval_prob > 0 and self.rng.random() < self.eval_prob:
                evaluate()
                continue
            idx = int(self.rng.integers(0, len(self.noise) - n + 1))
            pos, neg = perturb(theta, self.noise[idx:idx + n], self.sigma)
            # Both members start from the same env state (common random numbers), so
            # their return difference measures the perturbation, not the start state.
            env_seed = int(self.rng.integers(2**31 - 1))
            policy.set_flat_weights(pos)
            r_pos, l_pos = self.rollout(add_noise=True, env_seed=env_seed, record=True)
            policy.set_flat_weights(neg)
            r_neg, l_neg = self.rollout(add_noise=True, env_seed=env_seed, record=True)
            indices.append(idx)
            seeds.append(env_seed)
            returns.append((r_pos, r_neg))
            lengths.append((l_pos, l_neg))
            episodes += 2
            steps += l_pos + l_neg
        return ESRolloutResult(np.asarray(indices, dtype=np.int64),
                               np.asarray(returns, dtype=np.float64).reshape(-1, 2),
                               np.asarray(lengths, dtype=np.int64).reshape(-1, 2),
                               np.asarray(seeds, dtype=np.int64),
                               eval_returns, eval_lengths, [policy.filter.pop_buffer()])

    def noise_table_info(self) -> dict[str, Any]:
        """Which table this worker reads: ref hex (None locally), size, writability."""
        return {"ref": None if self.noise_ref is None else self.noise_ref.hex(),
                "size": int(len(self.noise)),
                "writeable": bool(self.noise.flags.writeable)}

    def ping(self) -> str:
        return "ok"

    def get_pid(self) -> int:
        """This process's id (death messages name it)."""
        return os.getpid()

    def stop(self) -> None:
        self.env.close()


class ESActorSet:
    """The ES actors of one agent and the noise table they share (see the module
    docstring). Nothing starts before the first :meth:`run` (or :meth:`start`), so an
    agent built only to act creates neither the table nor the actors.

    Args:
        env_creator: ``fn(EnvContext) -> env``.
        config: the ES config (``num_workers``, ``noise_size``, ``noise_seed``,
            ``num_cpus_per_worker``, ``num_gpus_per_worker``, ``recreate_failed_workers``,
            ``max_worker_restarts``, and what :class:`ESWorker` reads).
        num_params: the policy's parameter count (the table must be at least as long).

    Counters: ``num_es_actor_restarts`` (:meth:`counters`).
    """

    def __init__(self, env_creator: Callable[[EnvContext], Any], config: dict,
                 num_params: int):
        if config["noise_size"] < num_params:
            raise ValueError(f"noise_size={config['noise_size']} must be at least the "
                             f"policy's {num_params} parameters (use >= 1000x that).")
        self.env_creator = env_creator
        self.config = config
        self.num_workers = int(config["num_workers"])
        self.restarter = ActorRestarter.from_config("es_actor", "ES actor",
                                                    self._start_actor, config)
        self.noise_ref: Any = None  # the object-store ref (None without Ray)
        self._noise: np.ndarray | None = None
        self._actor_cls: Any = None  # ray.remote(ESWorker) with the per-actor resources
        self._actors: list = []  # Ray actor handles, or the one local ESWorker

    @property
    def local_mode(self) -> bool:
        """``num_workers: 0``: one ESWorker in this process, no Ray."""
        return self.num_workers == 0

    def start(self) -> None:
        """Creates the noise table (one ``ray.put``) and the actors; idempotent."""
        if self._actors:
            return
        noise = create_noise_table(self.config["noise_size"], self.config["noise_seed"])
        if self.local_mode:
            self._noise = noise
            self._actors = [ESWorker(self.env_creator, self.config, noise, 1, 0)]
            return
        import ray
        self.noise_ref = ray.put(noise)
        del noise
        self._noise = ray.get(self.noise_ref)  # zero-copy view: one copy in the node
        self._actor_cls = ray.remote(ESWorker).options(
            num_cpus=self.config["num_cpus_per_worker"],
            num_gpus=self.config["num_gpus_per_worker"])
        self._actors = [self.restarter.start(i) for i in range(1, self.num_workers + 1)]
        # Surface env/policy construction errors now, with the actor's traceback.
        ray.get([w.ping.remote() for w in self._actors])

    def _start_actor(self, index: int) -> Any:
        return self._actor_cls.remote(self.env_creator, self.config, [self.noise_ref],
                                      index, self.num_workers)

    def noise_table(self) -> np.ndarray:
        """The shared noise table (read-only store copy with Ray); starts the set."""
        self.start()
        return self._noise

    def actors(self) -> list:
        """The actor handles (the one local ESWorker with ``num_workers: 0``); empty
        before the first :meth:`run`."""
        return list(self._actors)

    def num_healthy(self) -> int:
        return len(self._actors)

    def counters(self) -> dict[str, int]:
        """``{"num_es_actor_restarts": n}``."""
        return self.restarter.counters()

    def run(self, params: dict, min_episodes: int, min_steps: int,
            num_eval: int) -> ESRolloutResult:
        """One iteration's episodes: at least ``min_episodes`` perturbed episodes and
        ``min_steps`` perturbed steps, plus ``num_eval`` evaluation episodes, from all
        actors (one broadcast of ``params``)."""
        self.start()
        if self.local_mode:
            (worker,) = self._actors
            return worker.do_rollouts(params, min_episodes, min_steps, num_eval)
        return ESRolloutResult.concat(self._gather(params, min_episodes, min_steps, num_eval))

    def _gather(self, params: dict, want_eps: int, want_steps: int,
                num_eval_total: int) -> list[ESRolloutResult]:
        """Calls on the actors until the quotas are met.

        The quotas are split among the actors up front, one call each (every call runs
        many episodes, so there is one round trip per actor and iteration). A call
        always delivers at least its share, so more calls are made only when an actor
        died and its share is missing.
        """
        import ray
        params_ref = ray.put(params)  # the one broadcast of this iteration
        results: list[ESRolloutResult] = []
        got_eps = got_steps = 0
        n = len(self._actors)
        num_eval, rem = divmod(num_eval_total, n)
        pending: dict = {}  # ref -> (actor, promised episodes, promised steps)
        for i, actor in enumerate(self._actors):
            eps, steps = math.ceil(want_eps / n), math.ceil(want_steps / n)
            pending[actor.do_rollouts.remote(params_ref, eps, steps, num_eval + (i < rem))] = \
                (actor, eps, steps)
        while pending:
            # Take every finished call at once; block on one only if none is ready.
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            if not ready:
                ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                actor, _, _ = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    actor = self._replace(actor, error)
                else:
                    results.append(result)
                    got_eps += result.lengths.size
                    got_steps += result.perturbed_steps
                    continue
                # A share went missing: give what is still uncovered to the new actor.
                missing_eps = want_eps - got_eps - sum(p[1] for p in pending.values())
                missing_steps = want_steps - got_steps - sum(p[2] for p in pending.values())
                if missing_eps > 0 or missing_steps > 0:
                    eps, steps = max(2, missing_eps), max(0, missing_steps)
                    pending[actor.do_rollouts.remote(params_ref, eps, steps, 0)] = \
                        (actor, eps, steps)
        return results

    def _replace(self, actor: Any, error: Exception) -> Any:
        """The replacement of a dead actor (raises when the restart budget is spent)."""
        new_actor = self.restarter.replace(actor, error)
        self._actors = [new_actor if a is actor else a for a in self._actors]
        return new_actor

    def stop(self) -> None:
        """Stops the local worker's env, or kills the actors; idempotent."""
        actors, self._actors = self._actors, []
        if self.local_mode:
            for worker in actors:
                worker.stop()
        elif actors:
            import ray
            for actor in actors:
                self.restarter.forget(actor)
                ray.kill(actor)
        self._noise = None
        self.noise_ref = None

    def __repr__(self) -> str:
        where = "in this process" if self.local_mode else f"{self.num_workers} actors"
        return f"ESActorSet({where}, started={bool(self._actors)})"
