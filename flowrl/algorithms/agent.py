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
For Tune, :mod:`flowrl.algorithms.trainable` wraps each Agent class in a ``Trainable``
registered under the algorithm's short name.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import random
import string
import time
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch

from flowrl.workers.callbacks import DefaultCallbacks, resolve_callbacks, summarize_custom_metrics
from flowrl.algorithms.checkpoint import (read_extra_state, read_manifest, read_params,
                               read_policy_states, write_checkpoint)
from flowrl.algorithms.config import (COMMON_CONFIG, merge_config, resolve_auto_resources,
                           validate_common)
from flowrl.envs.registry import EnvContext, make_env_creator
from flowrl.flow import Metrics, Plan, as_plan
from flowrl.algorithms.resources import check_cluster_fits
from flowrl.data.sample_batch import DEFAULT_POLICY_ID
from flowrl.data.sequences import state_out_key
from flowrl.envs.episodes import EpisodeStep
from flowrl.workers.worker_set import DeprecatedOptimizerAliases, WorkerSet

logger = logging.getLogger(__name__)

DEFAULT_RESULTS_DIR = os.path.expanduser("~/ray_results")


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
        self._eval_callbacks = None
        # The driver's own instance: on_train_result (workers build theirs).
        self.callbacks = self.config["callbacks"]()
        self._ensure_resources()
        self.metrics = Metrics()
        self.workers = WorkerSet(self.env_creator, self.get_policy_class(self.config),
                                 self.config,
                                 num_workers=self.worker_set_num_workers(self.config),
                                 monitor_dir=self.video_dir if self.config["monitor"] else None)
        try:
            self.evaluation_workers: WorkerSet | None = self._make_evaluation_workers()
        except BaseException:
            self.workers.stop()
            raise
        self.iteration = 0
        self.time_total_s = 0.0
        self._seeds_reported = False
        # What the plan started and holds is declared in the Plan value (owns, state).
        self.plan: Plan | None = None
        if type(self).training_step is Agent.training_step:
            self.plan = as_plan(self.execution_plan(self.workers, self.config, self.metrics),
                                f"{type(self).__name__}.execution_plan")

    # -- configuration ------------------------------------------------------------------
    @classmethod
    def merge_config(cls, user_config: dict | None) -> dict:
        """COMMON_CONFIG <- DEFAULT_CONFIG <- user config, validated."""
        base = merge_config(COMMON_CONFIG, cls._default_config)
        config = merge_config(base, user_config, check_keys=True)
        resolved = resolve_auto_resources(config)
        # Values the user asked to be "auto" are worth a warning; defaults only a note.
        asked = {k for k, v in (user_config or {}).items() if v == "auto"}
        if resolved:
            (logger.warning if asked & set(resolved) else logger.info)("%s: resolved 'auto' resources for this cluster: %s",
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
    def execution_plan(workers: WorkerSet, config: dict, metrics: Metrics) -> Plan:
        """Returns the :class:`~flowrl.flow.Plan`: its results iterator yields one result
        dict per iteration; it declares what it owns (stopped by :meth:`stop`) and the
        state that checkpoints keep."""
        raise NotImplementedError("Agent subclasses define execution_plan or training_step")

    def training_step(self) -> dict:
        """Imperative alternative to a plan: one iteration, returning a result dict.

        Subclasses that override this get no plan; ``train()`` calls it instead.
        """
        raise NotImplementedError(f"{type(self).__name__} defines neither an execution_plan "
                                  "nor a training_step")

    def _ensure_resources(self) -> None:
        """Starts Ray if workers need it; fails fast if they could never be scheduled."""
        c = self.config
        # With num_learners the GPUs belong to the learner actors, not to this process.
        if c["num_gpus"] > 0 and not c["num_learners"]:
            import torch
            if not torch.cuda.is_available():
                logger.warning("num_gpus=%s but no CUDA device is visible: the learner "
                               "runs on the CPU.", c["num_gpus"])
        actors = c["num_workers"] + c["evaluation_num_workers"]
        if actors == 0:
            return
        import ray
        if not ray.is_initialized():
            ray.init(include_dashboard=False, ignore_reinit_error=True)
        if ray.get_runtime_context().get_placement_group_id() is not None:
            return  # inside a Tune trial: its placement group already holds the workers
        evaluation = (f" + evaluation_num_workers={c['evaluation_num_workers']}"
                      if c["evaluation_num_workers"] else "")
        check_cluster_fits(
            {"CPU": actors * c["num_cpus_per_worker"],
             "GPU": actors * c["num_gpus_per_worker"]},
            f"num_workers={c['num_workers']}{evaluation} with num_cpus_per_worker="
            f"{c['num_cpus_per_worker']} and num_gpus_per_worker={c['num_gpus_per_worker']}",
            "Use fewer workers or smaller per-worker resources (fractions are allowed).")

    # -- training -----------------------------------------------------------------------
    def step(self) -> dict:
        """One training iteration without bookkeeping fields (what Tune calls).

        Adds ``result["evaluation"]`` every ``evaluation_interval`` iterations, then
        calls ``callbacks.on_train_result(agent=self, result=result)``. With evaluation
        workers, that evaluation runs on them while this iteration trains (see
        :meth:`evaluate`).
        """
        interval = self.config["evaluation_interval"]
        evaluating = bool(interval) and (self.iteration + 1) % interval == 0
        # Evaluation workers play while the iteration samples and learns.
        pending = self._start_evaluation() \
            if evaluating and self.evaluation_workers is not None else None
        if self.plan is not None:
            result = next(self.plan)
        else:
            result = self.training_step()
        self.iteration += 1
        if not self._seeds_reported:
            # Recorded once per agent (result.json): which env seeds each worker used.
            result.setdefault("info", {})["worker_seeds"] = self.worker_seeds()
            self._seeds_reported = True
        if evaluating:
            result["evaluation"] = self.evaluate() if pending is None \
                else self._finish_evaluation(pending)
        self.callbacks.on_train_result(agent=self, result=result)
        return result

    def worker_seeds(self) -> dict[str, list[int]]:
        """``{worker index: [seed of each of its envs]}`` (empty without ``seed``).

        Worker ``i``'s env ``v`` is seeded ``seed + 1000 * i + v``: distinct per worker
        and env, and the same in every run with the same ``seed``.
        """
        from flowrl.workers.rollout_worker import worker_seed
        if self.config["seed"] is None:
            return {}
        num_envs = self.config["num_envs_per_worker"]
        return {str(i): [worker_seed(self.config["seed"], i, v) for v in range(num_envs)]
                for i in range(self.workers.num_workers + 1)}

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
                from flowrl.algorithms.result_logger import ResultLogger
                self._result_logger = ResultLogger(self.logdir, self.config)
            self._result_logger.log(result)
        return result

    def evaluation_config(self) -> dict:
        """The config evaluation runs with: this config with ``evaluation_config``
        applied (``explore`` False unless set there; ``env_config`` entries update the
        training ones).

        Evaluation honors ``env``, ``env_config``, ``explore``, ``clip_actions``,
        ``callbacks`` and ``seed``. Evaluation workers (``evaluation_num_workers > 0``)
        are RolloutWorkers built with this config, so keys that shape the policy
        (``model``, ``multiagent``) must stay as in training: they receive the
        learner's weights. Other keys are accepted (they are validated like the top
        level) but do not change how the episodes are played.
        """
        overrides = self.config["evaluation_config"]
        config = merge_config(self.config, {"explore": False, **overrides})
        config["env_config"] = {**self.config["env_config"],
                                **overrides.get("env_config", {})}
        return config

    def evaluate(self) -> dict:
        """Plays ``evaluation_num_episodes`` episodes with :meth:`evaluation_config`
        (default: no exploration) and returns their statistics.

        With ``evaluation_num_workers=0`` (default) they run here, on a separate env.
        With N > 0 they run on the N evaluation workers (remote RolloutWorkers built
        with the evaluation config), split among them (10 episodes on 2 workers: 5
        each), after the learner's current weights were sent to them; this call waits
        for all of them. ``train()`` at an evaluation iteration starts them *before*
        the iteration trains and collects them after it, so they run in parallel with
        sampling and learning; they play the weights the iteration started from.

        Returns ``episode_reward_mean|min|max``, ``episode_len_mean``,
        ``episodes_this_iter`` and ``custom_metrics`` (from the episode callbacks).
        Episodes are real ones: on envs that report whole games in ``info["episode"]``
        (Atari training envs end an "episode" at each lost life) the loop plays on
        across lost lives and reports the game's unclipped score and length, as the
        training results do. The env keeps the training preprocessing, so the policy
        sees what it was trained on. Episode ``i`` is seeded ``seed + 10_000_000 + i``
        (with ``seed`` set), wherever it runs.
        """
        if self.evaluation_workers is not None:
            return self._finish_evaluation(self._start_evaluation())
        self._check_evaluation_env()
        config = self.evaluation_config()
        if self._eval_env is None:
            creator = self.env_creator if config["env"] == self.config["env"] \
                else make_env_creator(config["env"])
            self._eval_env = creator(EnvContext(config["env_config"], worker_index=0))
            self._eval_callbacks = config["callbacks"]()
        episodes = play_episodes(
            self._eval_env, self.compute_action, self.get_policy().recurrent,
            self._eval_callbacks, range(config["evaluation_num_episodes"]),
            explore=config["explore"], clip_actions=config["clip_actions"],
            seed=config["seed"])
        return summarize_evaluation(episodes)

    def _check_evaluation_env(self) -> None:
        from flowrl.envs.multi_agent import MultiAgentEnv
        if isinstance(self.workers.local_worker().env, MultiAgentEnv):
            raise ValueError("evaluate() / evaluation_interval runs single-agent envs; for "
                             f"the multi-agent env {self.config['env']!r} read the "
                             "policy_reward_mean of the training results instead")

    def _make_evaluation_workers(self) -> WorkerSet | None:
        """``evaluation_num_workers`` remote RolloutWorkers with the evaluation config
        (one env each, no videos); None when it is 0."""
        num = self.config["evaluation_num_workers"]
        if num == 0:
            return None
        self._check_evaluation_env()
        config = merge_config(self.evaluation_config(),
                              {"num_workers": num, "num_envs_per_worker": 1,
                               "monitor": False})
        creator = self.env_creator if config["env"] == self.config["env"] \
            else make_env_creator(config["env"])
        return WorkerSet(creator, self.get_policy_class(self.config), config,
                         num_workers=num, scheduling_strategy=self._evaluation_scheduling(),
                         label="Evaluation worker")

    def _evaluation_scheduling(self) -> str | None:
        """Ray's scheduling strategy for the evaluation workers.

        Inside a Tune trial, actors go into the trial's placement group; when its
        resource request holds no bundles for the evaluation workers they would wait
        forever there, so they start outside it (``"DEFAULT"``) with a warning.
        """
        import ray
        group = ray.util.get_current_placement_group()
        if group is None:
            return None
        c = self.config
        needed = 1 + c["num_workers"] + c["evaluation_num_workers"]
        if len(group.bundle_specs) >= needed:
            return None
        logger.warning("%s: the Tune trial's resource request has no bundles for "
                       "evaluation_num_workers=%d; they start outside the trial's "
                       "placement group, on the cluster's free CPUs.", self._name,
                       c["evaluation_num_workers"])
        return "DEFAULT"

    def _start_evaluation(self) -> list[tuple[Any, list[int], Any]]:
        """Sends the learner's current weights to the evaluation workers (one
        ``ray.put``) and starts each one's share of the episodes; returns
        ``[(worker, episode indexes, result ref)]`` for :meth:`_finish_evaluation`."""
        self._check_evaluation_env()
        self.evaluation_workers.sync_weights(
            weights=self.workers.local_worker().get_weights())
        config = self.evaluation_workers.config
        workers = self.evaluation_workers.remote_workers()
        if not workers:
            raise RuntimeError("no evaluation worker is left to evaluate on (they died and "
                               "were not replaced; see recreate_failed_workers)")
        shares = np.array_split(np.arange(config["evaluation_num_episodes"]), len(workers))
        pending = []
        for worker, share in zip(workers, shares):
            if len(share):
                indexes = [int(i) for i in share]
                pending.append((worker, indexes, worker.apply.remote(
                    play_worker_episodes, indexes, config["explore"],
                    config["clip_actions"], config["seed"])))
        return pending

    def _finish_evaluation(self, pending: list[tuple[Any, list[int], Any]]) -> dict:
        """Waits for the evaluation workers' episodes and summarizes them. A worker that
        died is replaced (current weights, same index) and its share played again."""
        import ray
        from ray.exceptions import RayActorError
        config = self.evaluation_workers.config
        episodes = []
        for worker, indexes, ref in pending:
            try:
                episodes += ray.get(ref)
            except RayActorError as error:
                replacement = self.evaluation_workers.handle_actor_failure(worker, error)
                if replacement is None:
                    raise
                episodes += ray.get(replacement.apply.remote(
                    play_worker_episodes, indexes, config["explore"],
                    config["clip_actions"], config["seed"]))
        return summarize_evaluation(episodes)

    @property
    def optimizer(self) -> DeprecatedOptimizerAliases:
        """RLlib 0.x's ``agent.optimizer`` (deprecated): ``foreach_evaluator(fn)``,
        ``foreach_evaluator_with_index(fn)``, ``local_evaluator`` and
        ``remote_evaluators`` run the :attr:`workers` methods of the same meaning
        (``foreach_worker``, ...), each warning once with a ``DeprecationWarning``."""
        return DeprecatedOptimizerAliases(self.workers)

    # -- acting -------------------------------------------------------------------------
    def get_policy(self, policy_id: str = DEFAULT_POLICY_ID):
        return self.workers.local_worker().get_policy(policy_id)

    def compute_action(self, obs: Any, state: list[np.ndarray] | None = None,
                       prev_action: Any = None, prev_reward: float | None = None,
                       explore: bool = False, policy_id: str = DEFAULT_POLICY_ID) -> Any:
        """The action for one observation (greedy / mean action unless ``explore``).

        A policy that is not recurrent returns the action alone, as the env takes it
        (Box actions are not clipped); it takes no ``state``, ``prev_action`` or
        ``prev_reward`` (a ``ValueError`` if given). A recurrent policy
        (``model.use_lstm``, or a ``RecurrentModel`` custom model) returns
        ``(action, state_out)``: thread ``state_out`` into the next call, and start each
        episode from ``state=None`` (the initial state, as :meth:`get_initial_state`)::

            state, prev_action, prev_reward = None, None, None
            obs, _ = env.reset()
            while True:
                action, state = agent.compute_action(obs, state, prev_action, prev_reward)
                obs, reward, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    break
                prev_action, prev_reward = action, reward

        ``state``: one unbatched float32 array per state part (LSTM: ``[h, c]``, each
        ``[lstm_cell_size]``); a list of another length or shape is a ``ValueError``
        that says what is expected. ``prev_action`` (the action this method returned
        the step before, unclipped, as the training sampler feeds it back) and
        ``prev_reward`` are inputs only when the model uses them
        (``lstm_use_prev_action`` / ``lstm_use_prev_reward``); None means zero, as at
        an episode's first step, and the model ignores them otherwise. :meth:`evaluate`
        and ``scripts/rollout.py`` carry all three this way (:class:`EpisodeActor`).
        """
        return compute_policy_action(self.get_policy(policy_id), obs, state, prev_action,
                                     prev_reward, explore=explore, policy_id=policy_id)

    def get_initial_state(self, policy_id: str = DEFAULT_POLICY_ID) -> list[np.ndarray]:
        """A recurrent policy's state before an episode's first step: one unbatched
        float32 array per part (LSTM: ``[zeros(cell), zeros(cell)]``); ``[]`` for a
        policy that is not recurrent. ``compute_action(obs, state=None)`` starts from it."""
        policy = self.get_policy(policy_id)
        return policy.get_initial_state() if policy.recurrent else []

    def export_policy(self, export_dir: str, policy_id: str = DEFAULT_POLICY_ID,
                      format: str = "torchscript") -> str:  # noqa: A002  the public name
        """Writes the policy's greedy actions as TorchScript or ONNX; returns the file's path.

        ``format="torchscript"`` (default): ``<export_dir>/policy.pt`` maps a batch of
        raw observations (as the env returns them) to the actions
        ``compute_action(obs, explore=False)`` gives (Box actions clipped to the bounds
        when ``clip_actions`` is on). It loads with torch alone:
        ``torch.jit.load(path)(torch.as_tensor(obs_batch))``.

        ``format="onnx"``: ``<export_dir>/policy.onnx``, the same module as an ONNX
        graph (input ``obs``, or ``obs.<key>`` per leaf of a nested observation; output
        ``actions``; a dynamic batch axis), for onnxruntime and other ONNX runtimes:
        ``onnxruntime.InferenceSession(path).run(None, {"obs": obs_batch})``. It is
        checked with onnxruntime against the eager module before this returns. Needs the
        optional ``onnx`` extra (``pip install 'flowrl[onnx]'``); without it this raises
        ImportError. See :mod:`flowrl.policies.onnx_export`.

        ``policy.json`` next to the file records the format, the algorithm, env,
        observation / action spaces, and the module's arguments and outputs (for ONNX
        also each input's and output's name, shape and dtype).

        A recurrent policy's module takes one step with the state:
        ``module(obs, *state_in[, prev_actions][, prev_rewards]) -> (actions,
        *state_out)``, each state part a float32 ``[B, size]`` tensor (``policy.json``
        lists them under ``"state"`` with their initial values; see
        :mod:`flowrl.policies.export`); in ONNX the inputs ``state_in_<i>`` and outputs
        ``state_out_<i>``.
        """
        if format not in ("torchscript", "onnx"):
            raise ValueError(f"export format must be 'torchscript' or 'onnx', got {format!r}")
        if format == "onnx":
            # Before any work: without the optional extra this is an ImportError.
            from flowrl.policies.onnx_export import require_onnx, write_onnx_export
            require_onnx()
            write = write_onnx_export
        else:
            from flowrl.policies.export import write_export
            write = write_export
        policy = self.get_policy(policy_id)
        env = self.config["env"]
        metadata = {"algorithm": self._name, "policy_id": policy_id,
                    "env": env if isinstance(env, str) else repr(env),
                    "iteration": self.iteration}
        return write(export_dir, policy.export_module(), policy.observation_space,
                     policy.action_space, metadata)

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

    @property
    def video_dir(self) -> str:
        """``<logdir>/videos``: where ``monitor: true`` writes its mp4 files."""
        return os.path.join(self.logdir, "videos")

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
        }
        plan_state = self.plan.save() if self.plan is not None else {}
        return write_checkpoint(path, manifest, self.config,
                                self.workers.local_worker().get_state(),
                                {**plan_state, "rng": self._rng_state()})

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
        if self.plan is not None:
            self.plan.restore(self._plan_states(checkpoint_path, manifest))
        rng = read_extra_state(checkpoint_path, manifest, "rng")
        if rng is not None:
            self._set_rng_state(rng)
        self.workers.sync_weights()

    def _rng_state(self) -> dict:
        """The driver's random streams (python, numpy, torch, each local policy's
        generator), so that a resumed run continues them instead of reseeding."""
        policies = {}
        for pid, policy in self.workers.local_worker().policy_map.items():
            generator = getattr(policy, "_rng", None)
            if isinstance(generator, np.random.Generator):
                # PCG64 states are 128-bit ints: stored as JSON text.
                policies[pid] = json.dumps(generator.bit_generator.state)
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": json.dumps(random.getstate()),
                "numpy": {"kind": kind, "keys": keys, "pos": pos, "has_gauss": has_gauss,
                          "cached": cached},
                "torch": torch.get_rng_state(), "policies": policies}

    def _set_rng_state(self, state: dict) -> None:
        version, internal, gauss = json.loads(state["python"])
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached"])))
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        for pid, text in state.get("policies", {}).items():
            policy = self.workers.local_worker().policy_map.get(pid)
            generator = getattr(policy, "_rng", None)
            if isinstance(generator, np.random.Generator):
                generator.bit_generator.state = json.loads(text)

    def _plan_states(self, checkpoint_path: str, manifest: dict) -> dict:
        """The checkpoint's states of the names this plan declares (a name the
        checkpoint lacks, e.g. replay saved with ``checkpoint_replay_buffer`` off, is
        left as the plan built it)."""
        states = {}
        for name in self.plan.state:
            state = read_extra_state(checkpoint_path, manifest, name)
            if state is None and name == "reporting":
                state = manifest.get("reporting")  # checkpoints before Plan values
            if state is not None:
                states[name] = state
        return states

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str, config_overrides: dict | None = None,
                        env: Any = None, **kwargs: Any) -> "Agent":
        """Builds the checkpoint's algorithm with its stored config, then restores it.

            agent = Agent.from_checkpoint(path, config_overrides={"num_workers": 0})
        """
        manifest = read_manifest(checkpoint_path)
        agent_cls = cls
        if cls is Agent or cls._name != manifest["algorithm"]:
            from flowrl.algorithms.registry import get_agent_class
            agent_cls = get_agent_class(manifest["algorithm"])
        params = read_params(checkpoint_path)
        overrides = config_overrides or {}
        if "callbacks" not in overrides and isinstance(params.get("callbacks"), str):
            # params.json names classes by path; one defined in a function or another
            # script cannot be imported here, and the checkpoint stays usable without it.
            try:
                resolve_callbacks(params["callbacks"])
            except ValueError as e:
                logger.warning("%s Using DefaultCallbacks; pass config_overrides="
                               "{'callbacks': YourCallbacks} to keep yours.", e)
                params["callbacks"] = DefaultCallbacks
        config = merge_config(params, overrides)
        agent = agent_cls(config=config, env=env, **kwargs)
        agent.restore(checkpoint_path)
        return agent

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Stops the plan's own resources (threads, replay actors), the workers, and
        closes the result files."""
        try:
            if self.plan is not None:
                self.plan.stop()  # what the plan started (threads, replay actors), newest first
        finally:
            try:
                self.workers.stop()
            finally:
                if self.evaluation_workers is not None:
                    self.evaluation_workers.stop()
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


def compute_policy_action(policy: Any, obs: Any, state: list[np.ndarray] | None = None,
                          prev_action: Any = None, prev_reward: float | None = None,
                          explore: bool = False, policy_id: str = DEFAULT_POLICY_ID) -> Any:
    """:meth:`Agent.compute_action` for a policy object (``scripts/rollout.py`` has no
    agent); ``policy_id`` only names the policy in error messages."""
    if isinstance(state, bool):
        raise TypeError("compute_action(obs, state, prev_action, prev_reward, ...): the "
                        "second argument is a recurrent policy's state; pass explore "
                        "by keyword (explore=True)")
    if not policy.recurrent:
        given = [name for name, value in (("state", state), ("prev_action", prev_action),
                                          ("prev_reward", prev_reward)) if value is not None]
        if given:
            raise ValueError(
                f"Policy {policy_id!r} is not recurrent: compute_action takes no "
                f"{' / '.join(given)} for it. Recurrent policies come from "
                "model.use_lstm or a RecurrentModel custom_model.")
        return policy.compute_single_action(obs, explore=explore)
    state = _checked_state(policy, policy_id, state)
    batch = policy.obs_packer.pack_one(obs) if policy.obs_packer.nested \
        else np.asarray(obs)[None]
    prev_actions = None if prev_action is None \
        else policy.action_layout.from_env(prev_action)[None]
    actions, extra = policy.compute_actions(
        batch, explore=explore, state=[part[None] for part in state],
        prev_actions=prev_actions,
        prev_rewards=np.array([0.0 if prev_reward is None else prev_reward], np.float32))
    state_out = [extra[state_out_key(i)][0] for i in range(len(state))]
    # Not clipped, as compute_single_action's: fed back as prev_action, it gives the
    # model the action row the sampler gives it in training.
    return policy.action_layout.to_env(actions[0], clip=False), state_out


def _checked_state(policy: Any, policy_id: str, state: Any) -> list[np.ndarray]:
    """``state`` as unbatched float32 arrays, checked against the policy's initial state
    (None: the initial state)."""
    initial = policy.get_initial_state()
    if state is None:
        return initial
    expected = (f"policy {policy_id!r} takes a list of {len(initial)} unbatched float32 "
                f"arrays of shapes {[tuple(part.shape) for part in initial]} (the "
                "state_out of the previous compute_action call; None at an episode's start)")
    if not isinstance(state, (list, tuple)):
        raise TypeError(f"state must be a list, got {type(state).__name__}: {expected}")
    if len(state) != len(initial):
        raise ValueError(f"state has {len(state)} parts; {expected}")
    parts = []
    for index, (part, init) in enumerate(zip(state, initial)):
        arr = np.asarray(part, dtype=np.float32)
        if arr.shape != init.shape:
            raise ValueError(f"state[{index}] has shape {arr.shape}; {expected}")
        parts.append(arr)
    return parts


class EpisodeActor:
    """The action function of an episode loop, stepping a policy as training does::

        actor = EpisodeActor(agent.compute_action, agent.get_policy().recurrent)
        actor.reset()                                   # at each episode start
        runner.run(actor, on_step=actor.observe)        # flowrl.envs.episodes

    ``compute_action`` has :meth:`Agent.compute_action`'s signature (or is
    :func:`compute_policy_action` bound to a policy). For a ``recurrent`` policy the
    state, the previous action and the previous reward are carried from step to step;
    :meth:`reset`, and :meth:`observe` when an env step ends an episode (an Atari lost
    life included, as in the sampler), go back to the initial state and zeros.
    Used by :meth:`Agent.evaluate` and ``scripts/rollout.py``.
    """

    def __init__(self, compute_action: Callable[..., Any], recurrent: bool,
                 explore: bool = False) -> None:
        self.compute_action = compute_action
        self.recurrent = bool(recurrent)
        self.explore = explore
        self.state: list[np.ndarray] | None = None
        self.prev_action: Any = None
        self.prev_reward: float | None = None

    def reset(self) -> None:
        """Starts an episode: the initial state, no previous action or reward."""
        self.state = self.prev_action = self.prev_reward = None

    def __call__(self, obs: Any) -> Any:
        """The action for ``obs``, as the env takes it (Box actions not clipped)."""
        if not self.recurrent:
            return self.compute_action(obs, explore=self.explore)
        action, self.state = self.compute_action(
            obs, state=self.state, prev_action=self.prev_action,
            prev_reward=self.prev_reward, explore=self.explore)
        self.prev_action = action
        return action

    def observe(self, step: EpisodeStep) -> None:
        """After each env step: its reward is the next step's previous reward; an
        ended episode starts over."""
        self.prev_reward = step.reward
        if step.terminated or step.truncated:
            self.reset()


# One finished evaluation episode: (return, length, custom metrics of the callbacks).
EvaluationEpisode = tuple[float, int, dict]


def play_episodes(env: Any, compute_action: Callable[..., Any], recurrent: bool,
                  callbacks: DefaultCallbacks, episode_indexes: Iterable[int], *,
                  explore: bool, clip_actions: bool, seed: int | None,
                  worker: Any = None) -> list[EvaluationEpisode]:
    """Plays one evaluation episode per index on ``env``.

    The loop of :meth:`Agent.evaluate`, in the driver and on evaluation workers alike.
    ``compute_action`` has :meth:`Agent.compute_action`'s signature; a ``recurrent``
    policy's state is carried through each episode (:class:`EpisodeActor`). Episode
    ``i`` is seeded ``seed + 10_000_000 + i`` (unseeded without ``seed``), and the
    episode callbacks see it with ``worker`` (None in the driver).
    """
    from flowrl.envs.episodes import EpisodeRunner
    from flowrl.workers.callbacks import Episode, overrides_episode_hooks
    hooks = overrides_episode_hooks(callbacks)
    runner = EpisodeRunner(env, clip_actions=clip_actions)
    actor = EpisodeActor(compute_action, recurrent, explore)
    played: list[EvaluationEpisode] = []
    for index in episode_indexes:
        episode: Episode | None = None

        def start(obs: Any, info: dict) -> None:
            nonlocal episode
            episode = Episode(index, 0, obs, info)
            if hooks:
                callbacks.on_episode_start(worker=worker, episode=episode, env_index=0)

        def observe(s: EpisodeStep) -> None:
            actor.observe(s)
            if hooks:
                episode.add_step(s.next_obs, s.action, s.reward, s.info)
                callbacks.on_episode_step(worker=worker, episode=episode, env_index=0)

        actor.reset()
        result = runner.run(actor, seed=None if seed is None else seed + 10_000_000 + index,
                            on_start=start, on_step=observe)
        if hooks:
            callbacks.on_episode_end(worker=worker, episode=episode, env_index=0)
        played.append((float(result.episode_return), int(result.length),
                       dict(episode.custom_metrics)))
    return played


def play_worker_episodes(worker: Any, episode_indexes: list[int], explore: bool,
                         clip_actions: bool, seed: int | None) -> list[EvaluationEpisode]:
    """:func:`play_episodes` on an evaluation worker (a RolloutWorker, through
    ``worker.apply``): its env, its default policy and its callbacks."""
    policy = worker.get_policy()
    return play_episodes(worker.env, functools.partial(compute_policy_action, policy),
                         policy.recurrent, worker.callbacks, episode_indexes,
                         explore=explore, clip_actions=clip_actions, seed=seed,
                         worker=worker)


def summarize_evaluation(episodes: list[EvaluationEpisode]) -> dict:
    """The ``result["evaluation"]`` dict of some evaluation episodes."""
    returns = [ret for ret, _, _ in episodes]
    lengths = [length for _, length, _ in episodes]
    return {"episode_reward_mean": float(np.mean(returns)),
            "episode_reward_min": float(np.min(returns)),
            "episode_reward_max": float(np.max(returns)),
            "episode_len_mean": float(np.mean(lengths)),
            "episodes_this_iter": len(episodes),
            "custom_metrics": summarize_custom_metrics([c for _, _, c in episodes])}
