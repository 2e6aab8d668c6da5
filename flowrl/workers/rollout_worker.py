"""RolloutWorker: envs + policies + sampling, usable locally or as a Ray actor.

    worker = RolloutWorker(make_env_creator("CartPole-v1"), PPOTorchPolicy, config)
    batch = worker.sample()                 # postprocessed SampleBatch
    stats = worker.learn_on_batch(batch)    # {policy_id: learner stats}

As a ParallelIteratorWorker it yields ``sample()`` forever, so
``ParallelIterator.from_actors(remote_workers, ...)`` turns a set of them into a stream.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Callable

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

if TYPE_CHECKING:
    from flowrl.workers.learner_group import DriverState, LearnerGroup


def worker_seed(seed: int | None, worker_index: int, vector_index: int = 0) -> int | None:
    """Seed of one env: ``seed + 1000 * worker_index + vector_index`` (None stays None)."""
    return None if seed is None else seed + 1000 * worker_index + vector_index


def policy_gpus(config: dict, worker_index: int) -> float:
    """The ``num_gpus`` a worker's policies see (they use ``cuda`` when > 0 and a GPU is
    visible): a remote worker's ``num_gpus_per_worker``; the local worker's ``num_gpus``,
    or 0 when learner actors (``num_learners``) hold the GPUs."""
    if worker_index > 0:
        return config.get("num_gpus_per_worker", 0)
    return 0 if config.get("num_learners", 0) > 0 else config.get("num_gpus", 0)


def _plain_values(state: dict) -> dict[str, Any]:
    """The entries of a policy state that are plain Python values (``kl_coeff``, counters)."""
    return {k: v for k, v in state.items() if isinstance(v, (bool, int, float, str))}


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

    Devices: the policies of a remote worker run on a GPU when ``num_gpus_per_worker``
    is > 0 (inference batched over the worker's envs); the local worker's with
    ``num_gpus``, unless learner actors take the GPUs (see :func:`policy_gpus`).

    Learner group: with ``num_learners`` > 0, the local worker (index 0) starts a
    :class:`~flowrl.workers.learner_group.LearnerGroup` on its first
    :meth:`learn_on_batch` and trains through it; see that module for what reaches
    the learners and what comes back.
    """

    def __init__(self, env_creator: Callable[[EnvContext], Any], policy_cls: type,
                 config: dict, worker_index: int = 0, num_workers: int = 0,
                 monitor_dir: str | None = None):
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.config = config
        # Data-parallel learners (local worker only), started on the first learn call.
        self._num_learners = int(config.get("num_learners", 0)) if worker_index == 0 else 0
        self._learner_group: LearnerGroup | None = None
        self._learner_lock = threading.RLock()
        self._latest_global_vars: dict = {}
        # Policies handed out since the learners last heard from the driver, and the
        # plain state values the learners are known to hold (see _driver_state()).
        self._handed_out: set[str] = set()
        self._synced_values: dict[str, dict[str, Any]] = {}
        if self._num_learners:
            from flowrl.workers.learner_group import check_learner_resources
            check_learner_resources(config)  # fail now, not at the first train()
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
        where = {"worker_index": worker_index, "num_workers": num_workers,
                 "num_gpus": policy_gpus(config, worker_index)}
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
        """Trains each policy on its part of ``batch``; returns ``{policy_id: stats}``.

        With ``num_learners`` > 0 the learner group trains instead (same stats form) and
        this worker then holds learner 0's weights.
        """
        if self._num_learners:
            return self._learn_with_group(batch, num_sgd_iter, sgd_minibatch_size)
        return {
            pid: self.policy_map[pid].learn_on_batch(b, num_sgd_iter, sgd_minibatch_size)
            for pid, b in self._policy_batches(batch).items() if self._trains(pid)
        }

    def _trains(self, policy_id: str) -> bool:
        """Whether ``policy_id`` learns here (``multiagent.policies_to_train``)."""
        return self.policies_to_train is None or policy_id in self.policies_to_train

    # -- learner group ------------------------------------------------------------
    @property
    def learner_group(self) -> LearnerGroup | None:
        """The running learner group (None before the first learn call, or without
        ``num_learners``)."""
        return self._learner_group

    def _started_learner_group(self) -> LearnerGroup:
        if self._learner_group is None:
            from flowrl.workers.learner_group import LearnerGroup
            trained = {pid: p for pid, p in self.policy_map.items() if self._trains(pid)}
            states = {pid: p.get_state() for pid, p in trained.items()}
            self._learner_group = LearnerGroup(trained, self.config, states)
            self._synced_values = {pid: _plain_values(s) for pid, s in states.items()}
            self._handed_out.clear()
        return self._learner_group

    def _driver_state(self) -> DriverState:
        """The latest global vars, and the plain state values (PPO's ``kl_coeff`` after
        ``UpdateKL``, ...) that the driver changed on trained policies since the
        learners last saw them. Only policies handed out by :meth:`get_policy` /
        :meth:`foreach_policy` since then are read: nothing else changes them."""
        from flowrl.workers.learner_group import DriverState
        changes = {}
        # A copy: the driver thread may hand out policies while a learner thread is here.
        handed_out = self._handed_out.copy()
        self._handed_out.difference_update(handed_out)
        for pid in handed_out:
            if pid not in self._synced_values:
                continue  # not trained here
            synced = self._synced_values[pid]
            values = _plain_values(self.policy_map[pid].get_state())
            changed = {k: v for k, v in values.items() if synced.get(k) != v}
            if changed:
                changes[pid] = changed
                synced.update(changed)
        return DriverState(dict(self._latest_global_vars), changes)

    def _load_learner_weights(self, weights: dict[str, dict]) -> None:
        """Learner 0's weights into this worker's policies (not sent back to the group)."""
        for pid, w in weights.items():
            self.policy_map[pid].set_weights(w)

    def _learn_with_group(self, batch: SampleBatch | MultiAgentBatch, num_sgd_iter: int,
                          sgd_minibatch_size: int) -> dict[str, dict]:
        batches = {pid: b for pid, b in self._policy_batches(batch).items()
                   if self._trains(pid)}
        if not batches:
            return {}
        # The whole batch's observation statistics: every learner's filter takes them.
        obs_stats = self.observation_stats(batch)
        with self._learner_lock:
            group = self._started_learner_group()
            stats, weights = group.learn_on_batch(batches, num_sgd_iter, sgd_minibatch_size,
                                                  obs_stats, self._driver_state())
            self._load_learner_weights(weights)
        return stats

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
        :meth:`observation_stats` of the same batch) then join the policies' filters.
        With ``num_learners`` > 0 every learner takes the step and this worker loads
        learner 0's weights."""
        obs_stats = obs_stats or {}
        if self._num_learners:
            with self._learner_lock:
                group = self._started_learner_group()
                weights = group.apply_gradients(grads, obs_stats, self._driver_state())
                self._load_learner_weights(weights)
            return
        for pid, g in grads.items():
            self.policy_map[pid].apply_gradients(g, obs_stats.get(pid))

    # -- weights and state --------------------------------------------------------
    def get_policy(self, policy_id: str = DEFAULT_POLICY_ID):
        if self._num_learners:
            self._handed_out.add(policy_id)  # the caller may change it (UpdateKL)
        return self.policy_map[policy_id]

    def get_weights(self) -> dict[str, dict[str, np.ndarray]]:
        return {pid: p.get_weights() for pid, p in self.policy_map.items()}

    def set_weights(self, weights: dict[str, dict[str, np.ndarray]],
                    global_vars: dict | None = None) -> None:
        """Loads ``weights`` (and ``global_vars``); a running learner group too."""
        for pid, w in weights.items():
            self.policy_map[pid].set_weights(w)
        if self._learner_group is not None:
            with self._learner_lock:
                self._learner_group.set_weights(weights)
        if global_vars:
            self.set_global_vars(global_vars)

    def set_global_vars(self, global_vars: dict) -> None:
        for p in self.policy_map.values():
            p.on_global_var_update(global_vars)
        if self._num_learners:
            self._latest_global_vars = dict(global_vars)  # sent with the next learn call

    def get_state(self) -> dict:
        """``{policy_id: state}``; with a running learner group the trained policies'
        come from learner 0 (their optimizer state and counters live there)."""
        if self._learner_group is None:
            return {pid: p.get_state() for pid, p in self.policy_map.items()}
        with self._learner_lock:
            learned = self._learner_group.get_state(self._driver_state())
        return {pid: learned[pid] if pid in learned else p.get_state()
                for pid, p in self.policy_map.items()}

    def set_state(self, state: dict) -> None:
        """Restores :meth:`get_state`; a running learner group too."""
        for pid, s in state.items():
            self.policy_map[pid].set_state(s)
        if self._learner_group is not None:
            with self._learner_lock:
                trained = {pid: s for pid, s in state.items() if pid in self._synced_values}
                self._learner_group.set_state(trained)
                for pid, s in trained.items():
                    self._synced_values[pid] = _plain_values(s)

    def apply(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs ``fn(self, *args)`` on this worker and returns its result."""
        return fn(self, *args)

    def foreach_policy(self, fn: Callable[[Any, str], Any]) -> list:
        """``[fn(policy, policy_id)]`` over this worker's policies. With a running
        learner group, ``fn`` also runs on the learners' trained policies (their results
        are dropped), so target updates and new hyperparameters reach them."""
        results = [fn(p, pid) for pid, p in self.policy_map.items()]
        if self._num_learners:
            self._handed_out.update(self.policy_map)
            if self._learner_group is not None:
                with self._learner_lock:
                    self._learner_group.foreach_policy(fn)
        return results

    def get_pid(self) -> int:
        return os.getpid()

    def ping(self) -> str:
        return "ok"

    def stop(self) -> None:
        try:
            for env in self.envs:
                env.close()
        finally:
            if self._learner_group is not None:
                self._learner_group.stop()
                self._learner_group = None

    def __repr__(self) -> str:
        # Ray may call this on a worker whose __init__ failed: no attribute is guaranteed.
        return f"RolloutWorker(index={getattr(self, 'worker_index', '?')}, pid={os.getpid()})"
