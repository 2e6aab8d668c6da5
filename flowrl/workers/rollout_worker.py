"""RolloutWorker: envs + policies + sampling, usable locally or as a Ray actor.

    worker = RolloutWorker(make_env_creator("CartPole-v1"), PPOTorchPolicy, config)
    batch = worker.sample()                 # postprocessed SampleBatch
    stats = worker.learn_on_batch(batch)    # {policy_id: learner stats}

As a ParallelIteratorWorker it yields ``sample()`` forever, so
``ParallelIterator.from_actors(remote_workers, ...)`` turns a set of them into a stream.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch

from flowrl.workers.callbacks import resolve_callbacks
from flowrl.envs.compat import ensure_gymnasium_env
from flowrl.envs.multi_agent import MultiAgentEnv
from flowrl.envs.registry import EnvContext
from flowrl.flow import ParallelIteratorWorker
from flowrl.data.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch
from flowrl.policies.filters import RunningStat
from flowrl.workers.external_sampler import ExternalEnv, ExternalEnvSampler
from flowrl.workers.multi_agent_sampler import MultiAgentSampler, build_policy_map
from flowrl.workers.reward_scaling import ReturnScaler
from flowrl.workers.sampler import EpisodeStats, VectorSampler


def worker_seed(seed: int | None, worker_index: int, vector_index: int = 0) -> int | None:
    """Seed of one env: ``seed + 1000 * worker_index + vector_index`` (None stays None)."""
    return None if seed is None else seed + 1000 * worker_index + vector_index


class RolloutWorker(ParallelIteratorWorker):
    """Owns ``num_envs_per_worker`` envs and the policy map; samples and learns.

    Args:
        env_creator: ``fn(EnvContext) -> gymnasium.Env``.
        policy_cls: a Policy class, built as ``policy_cls(obs_space, act_space, config)``.
        config: the full algorithm config.
        worker_index: 0 for the local (learner) worker, 1..N for remote workers.
        num_workers: number of remote workers in the set.
        monitor_dir: where videos go when ``config["monitor"]`` is on (the Agent passes
            ``<logdir>/videos``). Only the first env of one worker records: worker 1,
            or the local worker 0 when there are no remote workers.
    """

    def __init__(self, env_creator: Callable[[EnvContext], Any], policy_cls: type,
                 config: dict, worker_index: int = 0, num_workers: int = 0,
                 monitor_dir: str | None = None):
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.config = config
        self.callbacks = resolve_callbacks(config.get("callbacks"))()
        # Torch threads follow the CPUs reserved for this process: one per remote worker,
        # num_cpus_for_driver for the learner. Oversubscribed cores make small-net
        # torch steps tens of times slower, so the default stays at 1.
        threads = 1 if worker_index > 0 else max(1, int(config.get("num_cpus_for_driver", 1)))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        seed = config.get("seed")
        if seed is not None:
            torch.manual_seed(worker_seed(seed, worker_index))
            np.random.seed(worker_seed(seed, worker_index) % (2**32))
        context = EnvContext(config.get("env_config", {}), worker_index, 0, num_workers)
        num_envs = config.get("num_envs_per_worker", 1)
        # monitor: env 0 of worker 1 (of the local worker without remote ones) records.
        self.monitor_dir = monitor_dir if config.get("monitor") and \
            worker_index == (1 if num_workers > 0 else 0) else None
        self.envs = []
        for i in range(num_envs):
            ctx = context.copy_with_overrides(vector_index=i)
            if i == 0 and self.monitor_dir is not None:
                self.envs.append(self._video_env(env_creator, ctx))
            else:
                self.envs.append(ensure_gymnasium_env(env_creator(ctx)))
            if isinstance(self.envs[0], ExternalEnv):
                break  # serving: one ExternalEnv multiplexes its episodes (1 per worker)
        self.env = self.envs[0]
        # Policies see where they run (Ape-X gives each worker its own epsilon).
        where = {"worker_index": worker_index, "num_workers": num_workers}
        self.policies_to_train: set | None = None
        if isinstance(self.env, MultiAgentEnv):
            self._init_multi_agent(policy_cls, config, where, seed)
            ParallelIteratorWorker.__init__(self, lambda: iter(self.sample, None), repeat=True)
            return
        self.policy_map = {
            DEFAULT_POLICY_ID: policy_cls(self.env.observation_space,
                                          self.env.action_space, {**config, **where})
        }
        external = isinstance(self.env, ExternalEnv)
        scaler_kwargs = {}
        normalize = config.get("normalize_rewards", False)
        if normalize is True and external:
            raise ValueError("normalize_rewards=True is not supported with an external "
                             "(served) env; set it to False or 'auto'.")
        if normalize and not external:
            scaler_kwargs["reward_scaler"] = ReturnScaler(len(self.envs),
                                                          config.get("gamma", 0.99))
        sampler_cls = ExternalEnvSampler if external else VectorSampler
        self.sampler = sampler_cls(
            self.envs, self.policy_map[DEFAULT_POLICY_ID],
            fragment_length=config.get("rollout_fragment_length", 200),
            batch_mode=config.get("batch_mode", "truncate_episodes"),
            seeds=[worker_seed(seed, worker_index, i) for i in range(num_envs)],
            clip_actions=config.get("clip_actions", True),
            explore=config.get("explore", True),
            episode_id_base=worker_index << 40,
            callbacks=self.callbacks,
            worker=self,
            **scaler_kwargs,
        )
        ParallelIteratorWorker.__init__(self, lambda: iter(self.sample, None), repeat=True)

    def _init_multi_agent(self, policy_cls: type, config: dict, where: dict,
                          seed: int | None) -> None:
        """Policies from ``config["multiagent"]`` (one default policy for all agents when
        it names none) and a MultiAgentSampler."""
        if config.get("normalize_rewards") is True:
            raise ValueError("normalize_rewards=True is not supported with a MultiAgentEnv "
                             "yet; set it to False or 'auto'.")
        if not (config.get("multiagent") or {}).get("policies"):
            config = {**config, "multiagent": {**(config.get("multiagent") or {}),
                                               "policies": [DEFAULT_POLICY_ID]}}
        self.policy_map, mapping, self.policies_to_train = build_policy_map(
            self.env, policy_cls, config, where)
        self.sampler = MultiAgentSampler(
            self.envs, self.policy_map, mapping,
            fragment_length=config.get("rollout_fragment_length", 200),
            batch_mode=config.get("batch_mode", "truncate_episodes"),
            seeds=[worker_seed(seed, self.worker_index, i) for i in range(len(self.envs))],
            explore=config.get("explore", True), episode_id_base=self.worker_index << 40,
            callbacks=self.callbacks, worker=self)

    def _video_env(self, env_creator: Callable[[EnvContext], Any], ctx: EnvContext) -> Any:
        """The env, with render_mode "rgb_array" where flowrl builds it, recorded as
        the outermost wrapper (so Atari videos span whole games, not lives)."""
        from flowrl.envs.video import EpisodeVideoRecorder, make_recordable_env
        env = ensure_gymnasium_env(make_recordable_env(env_creator, ctx))
        return EpisodeVideoRecorder(env, self.monitor_dir,
                                    name_prefix=f"worker{self.worker_index}_episode")

    # -- sampling ---------------------------------------------------------------
    def sample(self) -> SampleBatch:
        """One fragment: ``rollout_fragment_length`` steps per env, postprocessed.

        Calls ``callbacks.on_sample_end(worker=self, samples=batch)`` before returning.
        """
        batch = self.sampler.sample()
        self.callbacks.on_sample_end(worker=self, samples=batch)
        return batch

    def get_metrics(self) -> list[EpisodeStats]:
        """(return, length) of the episodes finished since the last call.

        Each item is an :class:`EpisodeStats`: a ``(return, length)`` tuple whose
        ``custom_metrics`` attribute holds what the callbacks wrote for the episode.
        """
        return self.sampler.pop_episode_metrics()

    # -- learning ---------------------------------------------------------------
    def _policy_batches(self, batch: SampleBatch | MultiAgentBatch) -> dict[str, SampleBatch]:
        if isinstance(batch, MultiAgentBatch):
            return batch.policy_batches
        return {DEFAULT_POLICY_ID: batch}

    def learn_on_batch(self, batch: SampleBatch | MultiAgentBatch, num_sgd_iter: int = 1,
                       sgd_minibatch_size: int = 0) -> dict[str, dict]:
        """Trains each policy on its part of ``batch``; returns ``{policy_id: stats}``."""
        return {
            pid: self.policy_map[pid].learn_on_batch(b, num_sgd_iter, sgd_minibatch_size)
            for pid, b in self._policy_batches(batch).items() if self._trains(pid)
        }

    def _trains(self, policy_id: str) -> bool:
        """Whether ``policy_id`` learns here (``multiagent.policies_to_train``)."""
        return self.policies_to_train is None or policy_id in self.policies_to_train

    def compute_gradients(self, batch: SampleBatch | MultiAgentBatch
                          ) -> tuple[dict[str, list[np.ndarray]], dict[str, dict]]:
        grads, stats = {}, {}
        for pid, b in self._policy_batches(batch).items():
            if self._trains(pid):
                grads[pid], stats[pid] = self.policy_map[pid].compute_gradients(b)
        return grads, stats

    def observation_stats(self, batch: SampleBatch | MultiAgentBatch
                          ) -> dict[str, RunningStat]:
        """``{policy_id: RunningStat}`` of the raw observations of ``batch``, for each
        trained policy with an observation filter; sent along with
        :meth:`compute_gradients` results to :meth:`apply_gradients` (A2C, A3C)."""
        out = {}
        for pid, b in self._policy_batches(batch).items():
            if self._trains(pid):
                stats = self.policy_map[pid].observation_stats(b)
                if stats is not None:
                    out[pid] = stats
        return out

    def apply_gradients(self, grads: dict[str, list[np.ndarray]],
                        obs_stats: dict[str, RunningStat] | None = None) -> None:
        """One step per policy with its gradients; ``obs_stats`` (from
        :meth:`observation_stats` of the same batch) then join the policies' filters."""
        obs_stats = obs_stats or {}
        for pid, g in grads.items():
            self.policy_map[pid].apply_gradients(g, obs_stats.get(pid))

    # -- weights and state --------------------------------------------------------
    def get_policy(self, policy_id: str = DEFAULT_POLICY_ID):
        return self.policy_map[policy_id]

    def get_weights(self) -> dict[str, dict[str, np.ndarray]]:
        return {pid: p.get_weights() for pid, p in self.policy_map.items()}

    def set_weights(self, weights: dict[str, dict[str, np.ndarray]],
                    global_vars: dict | None = None) -> None:
        for pid, w in weights.items():
            self.policy_map[pid].set_weights(w)
        if global_vars:
            self.set_global_vars(global_vars)

    def set_global_vars(self, global_vars: dict) -> None:
        for p in self.policy_map.values():
            p.on_global_var_update(global_vars)

    def get_state(self) -> dict:
        return {pid: p.get_state() for pid, p in self.policy_map.items()}

    def set_state(self, state: dict) -> None:
        for pid, s in state.items():
            self.policy_map[pid].set_state(s)

    def apply(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(self, *args)`` on this worker and returns its result."""
        return fn(self, *args)

    def foreach_policy(self, fn: Callable[[Any, str], Any]) -> list:
        return [fn(p, pid) for pid, p in self.policy_map.items()]

    def get_pid(self) -> int:
        return os.getpid()

    def ping(self) -> str:
        return "ok"

    def stop(self) -> None:
        for env in self.envs:
            env.close()

    def __repr__(self) -> str:
        # Ray may call this on a worker whose __init__ failed: no attribute is guaranteed.
        return f"RolloutWorker(index={getattr(self, 'worker_index', '?')}, pid={os.getpid()})"
