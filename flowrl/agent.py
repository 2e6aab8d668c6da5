"""The Agent shell: config -> workers -> plan, with train / save / restore / act.

    from flowrl.plans.ppo import PPOAgent, DEFAULT_CONFIG
    config = DEFAULT_CONFIG.copy()
    config["num_workers"] = 2
    agent = PPOAgent(config=config, env="CartPole-v1")
    for _ in range(10):
        print(agent.train()["episode_reward_mean"])
    path = agent.save()

Each algorithm subclasses Agent with a name, a DEFAULT_CONFIG, a policy class and an
``execution_plan(workers, config, metrics)`` (or an imperative ``training_step``).
For Tune, :mod:`flowrl.trainable` wraps each Agent class in a ``Trainable``
registered under the algorithm's short name.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import string
import time
from typing import Any, ClassVar

import numpy as np

from flowrl.checkpoint import (read_extra_state, read_manifest, read_params,
                               read_policy_states, write_checkpoint)
from flowrl.config import (COMMON_CONFIG, merge_config, resolve_auto_resources,
                           validate_common)
from flowrl.envs.registry import EnvContext, make_env_creator
from flowrl.flow import LocalIterator, Metrics
from flowrl.resources import check_cluster_fits
from flowrl.sample_batch import DEFAULT_POLICY_ID
from flowrl.workers.worker_set import WorkerSet

logger = logging.getLogger(__name__)

DEFAULT_RESULTS_DIR = os.path.expanduser("~/ray_results")


def _call(target: Any, method: str, *args: Any) -> Any:
    """``target.method(*args)`` on a local object, or ``.remote`` on a Ray actor."""
    fn = getattr(target, method)
    return fn.remote(*args) if hasattr(fn, "remote") else fn(*args)


def _resolve(value: Any) -> Any:
    """``ray.get`` for object refs, the value itself otherwise."""
    if type(value).__name__ == "ObjectRef":
        import ray
        return ray.get(value)
    return value


class Agent:
    """Base class of all algorithms. See the module docstring for usage.

    Args:
        config: overrides of the algorithm's DEFAULT_CONFIG (deep-merged; unknown keys
            and wrong types raise ``ValueError`` before any worker starts).
        env: env name / gymnasium id / env class; same as ``config["env"]``.
        logdir: trial directory for results and checkpoints (default: a new
            ``~/ray_results/<Algo>_<env>_<timestamp>`` created on first use).
        log_to_disk: write params.json / result.json / progress.csv / TensorBoard
            events on each ``train()`` (Tune turns this off and logs itself).
    """

    _name: ClassVar[str] = "Agent"
    _default_config: ClassVar[dict] = {}
    _policy_class: ClassVar[type | None] = None

    def __init__(self, config: dict | None = None, env: Any = None,
                 logdir: str | None = None, log_to_disk: bool = True):
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        user_config = dict(config or {})
        if env is not None:
            user_config["env"] = env
        self.config = self.merge_config(user_config)
        self.env_creator = make_env_creator(self.config["env"])
        self._logdir = logdir
        self._log_to_disk = log_to_disk
        self._result_logger = None
        self._eval_env = None
        self._ensure_resources()
        self.metrics = Metrics()
        self.workers = WorkerSet(self.env_creator, self.get_policy_class(self.config),
                                 self.config,
                                 num_workers=self.worker_set_num_workers(self.config))
        self.iteration = 0
        self.time_total_s = 0.0
        self._plan: LocalIterator | None = None
        if type(self).training_step is Agent.training_step:
            self._plan = self.execution_plan(self.workers, self.config, self.metrics)

    # -- configuration ------------------------------------------------------------------
    @classmethod
    def merge_config(cls, user_config: dict | None) -> dict:
        """COMMON_CONFIG <- DEFAULT_CONFIG <- user config, validated."""
        base = merge_config(COMMON_CONFIG, cls._default_config)
        config = merge_config(base, user_config, check_keys=True)
        resolved = resolve_auto_resources(config)
        if resolved:
            logger.warning("%s: resolved 'auto' resources for this cluster: %s",
                           cls._name, ", ".join(f"{k}={v}" for k, v in resolved.items()))
        validate_common(config)
        cls.validate_config(config)
        return config

    @classmethod
    def validate_config(cls, config: dict) -> None:
        """Algorithm-specific checks; raise ``ValueError`` naming the bad value."""

    @classmethod
    def get_policy_class(cls, config: dict) -> type:
        return cls._policy_class

    @classmethod
    def worker_set_num_workers(cls, config: dict) -> int:
        """Remote RolloutWorkers the WorkerSet starts (default ``num_workers``).

        Algorithms that run their own actors (ES) return 0: the WorkerSet then holds
        only the local worker, while ``num_workers`` still sizes their actors.
        """
        return config["num_workers"]

    @staticmethod
    def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> LocalIterator:
        """Returns the plan: an iterator whose every item is one iteration's result."""
        raise NotImplementedError("Agent subclasses define execution_plan or training_step")

    def training_step(self) -> dict:
        """Imperative alternative to a plan: one iteration, returning a result dict.

        Subclasses that override this get no plan; ``train()`` calls it instead.
        """
        raise NotImplementedError

    def _ensure_resources(self) -> None:
        """Starts Ray if workers need it; fails fast if they could never be scheduled."""
        c = self.config
        if c["num_gpus"] > 0:
            import torch
            if not torch.cuda.is_available():
                logger.warning("num_gpus=%s but no CUDA device is visible: the learner "
                               "runs on the CPU.", c["num_gpus"])
        if c["num_workers"] == 0:
            return
        import ray
        if not ray.is_initialized():
            ray.init(include_dashboard=False, ignore_reinit_error=True)
        if ray.get_runtime_context().get_placement_group_id() is not None:
            return  # inside a Tune trial: its placement group already holds the workers
        check_cluster_fits(
            {"CPU": c["num_workers"] * c["num_cpus_per_worker"],
             "GPU": c["num_workers"] * c["num_gpus_per_worker"]},
            f"num_workers={c['num_workers']} with num_cpus_per_worker="
            f"{c['num_cpus_per_worker']} and num_gpus_per_worker={c['num_gpus_per_worker']}",
            "Use fewer workers or smaller per-worker resources (fractions are allowed).")

    # -- training -----------------------------------------------------------------------
    def step(self) -> dict:
        """One training iteration without bookkeeping fields (what Tune calls)."""
        if self._plan is not None:
            result = next(self._plan)
        else:
            result = self.training_step()
        self.iteration += 1
        interval = self.config["evaluation_interval"]
        if interval and self.iteration % interval == 0:
            result["evaluation"] = self.evaluate()
        return result

    def train(self) -> dict:
        """Runs one iteration and returns its result dict (also logged to the logdir)."""
        start = time.perf_counter()
        result = self.step()
        elapsed = time.perf_counter() - start
        self.time_total_s += elapsed
        result.update(training_iteration=self.iteration, time_this_iter_s=elapsed,
                      time_total_s=self.time_total_s, timestamp=int(time.time()),
                      date=datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"),
                      done=False)
        if self._log_to_disk:
            if self._result_logger is None:
                from flowrl.result_logger import ResultLogger
                self._result_logger = ResultLogger(self.logdir, self.config)
            self._result_logger.log(result)
        return result

    def evaluate(self) -> dict:
        """Runs ``evaluation_num_episodes`` episodes with ``evaluation_config`` applied
        (default: no exploration) on a separate env; returns their mean return/length."""
        eval_overrides = {"explore": False, **self.config["evaluation_config"]}
        explore = eval_overrides.get("explore", False)
        if self._eval_env is None:
            env_config = {**self.config["env_config"],
                          **eval_overrides.get("env_config", {})}
            self._eval_env = self.env_creator(EnvContext(env_config, worker_index=0))
        returns, lengths = [], []
        seed = self.config["seed"]
        for episode in range(self.config["evaluation_num_episodes"]):
            obs, _ = self._eval_env.reset(
                seed=None if seed is None else seed + 10_000_000 + episode)
            total, length, done = 0.0, 0, False
            while not done:
                action = self.compute_action(obs, explore=explore)
                obs, reward, terminated, truncated, _ = self._eval_env.step(action)
                total += float(reward)
                length += 1
                done = terminated or truncated
            returns.append(total)
            lengths.append(length)
        return {"episode_reward_mean": float(np.mean(returns)),
                "episode_reward_min": float(np.min(returns)),
                "episode_reward_max": float(np.max(returns)),
                "episode_len_mean": float(np.mean(lengths)),
                "episodes_this_iter": len(returns)}

    # -- acting -------------------------------------------------------------------------
    def get_policy(self, policy_id: str = DEFAULT_POLICY_ID):
        return self.workers.local_worker().get_policy(policy_id)

    def compute_action(self, obs: Any, explore: bool = False,
                       policy_id: str = DEFAULT_POLICY_ID) -> Any:
        """The action of one observation (greedy / mean action unless ``explore``)."""
        return self.get_policy(policy_id).compute_single_action(obs, explore=explore)

    # -- checkpoints --------------------------------------------------------------------
    @property
    def logdir(self) -> str:
        """The trial directory (created on first use)."""
        if self._logdir is None:
            env = self.config["env"]
            env_name = env if isinstance(env, str) else getattr(env, "__name__", "env")
            env_name = env_name.replace("/", "_").replace(":", "_")
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
            self._logdir = os.path.join(DEFAULT_RESULTS_DIR,
                                        f"{self._name}_{env_name}_{stamp}_{suffix}")
        os.makedirs(self._logdir, exist_ok=True)
        return self._logdir

    def save(self, checkpoint_dir: str | None = None) -> str:
        """Writes a checkpoint (atomically) and returns its directory.

        Default location: ``<logdir>/checkpoint_<iteration>``.
        """
        path = checkpoint_dir or os.path.join(self.logdir, f"checkpoint_{self.iteration:06d}")
        env = self.config["env"]
        manifest = {
            "algorithm": self._name,
            "env": env if isinstance(env, str) else repr(env),
            "iteration": self.iteration,
            "time_total_s": self.time_total_s,
            "counters": self.metrics.save(),
            "reporting": self._reporting_state(save=True),
        }
        return write_checkpoint(path, manifest, self.config,
                                self.workers.local_worker().get_state(),
                                self._replay_states())

    def restore(self, checkpoint_path: str) -> None:
        """Loads a checkpoint written by ``save()``: weights, optimizer state, counters.

        Remote workers receive the restored weights; training continues counting from
        the checkpoint's iteration and timesteps.
        """
        manifest = read_manifest(checkpoint_path)
        if manifest["algorithm"] != self._name:
            raise ValueError(
                f"Checkpoint {checkpoint_path!r} was written by {manifest['algorithm']}, "
                f"not {self._name}: restore it with Agent.from_checkpoint() or the "
                f"{manifest['algorithm']} agent.")
        states = read_policy_states(checkpoint_path, manifest)
        self.workers.local_worker().set_state(states)
        self.iteration = manifest["iteration"]
        self.time_total_s = manifest.get("time_total_s", 0.0)
        self.metrics.restore(manifest.get("counters", {}))
        self._reporting_state(restore=manifest.get("reporting", {}))
        replay = read_extra_state(checkpoint_path, manifest, "replay")
        if replay is not None and self.config.get("checkpoint_replay_buffer"):
            self._restore_replay(replay)
        self.workers.sync_weights()

    def _replay_shards(self) -> list:
        return list(getattr(self._plan, "replay_shards", []))

    def _replay_states(self) -> dict:
        """``{"replay": [shard states]}`` when ``checkpoint_replay_buffer`` is on."""
        shards = self._replay_shards()
        if not self.config.get("checkpoint_replay_buffer") or not shards:
            return {}
        states = [_call(shard, "get_state") for shard in shards]
        return {"replay": [_resolve(s) for s in states]}

    def _restore_replay(self, states: list) -> None:
        shards = self._replay_shards()
        if len(states) != len(shards):
            raise ValueError(f"The checkpoint holds {len(states)} replay shards, this agent "
                             f"has {len(shards)}: set num_replay_buffer_shards to "
                             f"{len(states)} or checkpoint_replay_buffer to False.")
        for shard, state in zip(shards, states):
            _resolve(_call(shard, "set_state", state))

    def _reporting_state(self, save: bool = False, restore: dict | None = None) -> dict:
        collector = getattr(self._plan, "collect_metrics", None)
        if collector is None:
            return {}
        if restore is not None:
            collector.restore(restore)
            return {}
        return collector.save()

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str, config_overrides: dict | None = None,
                        env: Any = None, **kwargs: Any) -> "Agent":
        """Builds the checkpoint's algorithm with its stored config, then restores it.

            agent = Agent.from_checkpoint(path, config_overrides={"num_workers": 0})
        """
        manifest = read_manifest(checkpoint_path)
        agent_cls = cls
        if cls is Agent or cls._name != manifest["algorithm"]:
            from flowrl.registry import get_agent_class
            agent_cls = get_agent_class(manifest["algorithm"])
        config = merge_config(read_params(checkpoint_path), config_overrides or {})
        agent = agent_cls(config=config, env=env, **kwargs)
        agent.restore(checkpoint_path)
        return agent

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Stops the plan's own resources (threads, replay actors), the workers, and
        closes the result files."""
        # A plan that owns threads or actors attaches ``cleanup`` to its iterator.
        cleanup = getattr(self._plan, "cleanup", None)
        if cleanup is not None:
            cleanup()
        self.workers.stop()
        if self._result_logger is not None:
            self._result_logger.close()
            self._result_logger = None
        if self._eval_env is not None:
            self._eval_env.close()
            self._eval_env = None

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(env={self.config['env']!r}, iteration={self.iteration})"
