"""Ray Tune integration: every Agent class as a ``Trainable`` under its short name.

    import flowrl, ray.tune as tune
    tune.run_experiments({"sweep": {"run": "PPO", "env": "CartPole-v1",
                                    "stop": {"episode_reward_mean": 150},
                                    "config": {"lr": tune.grid_search([1e-3, 3e-4])}}})

The Agent stays a plain class (usable with no Ray at all); this adapter gives Tune
``setup`` / ``step`` / ``save_checkpoint`` / ``load_checkpoint`` and the trial's
resource request (driver CPU/GPU + one bundle per rollout worker). A request that
the cluster can never satisfy fails at once instead of leaving the trial pending.
"""

from __future__ import annotations

import os
from typing import Any

from ray import tune
from ray.tune import PlacementGroupFactory, Trainable
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, LoggerCallback

from flowrl.algorithms.registry import ALGORITHMS, get_agent_class
from flowrl.algorithms.resources import check_cluster_fits
from flowrl.policies.policy import Policy
from flowrl.algorithms.result_logger import TensorBoardWriter, progress_line

_TRAINABLES: dict[str, type] = {}


def make_trainable(agent_cls: type) -> type:
    """A Tune ``Trainable`` class that runs ``agent_cls``."""

    class AgentTrainable(Trainable):
        _agent_class = agent_cls

        @classmethod
        def default_resource_request(cls, config: dict) -> PlacementGroupFactory:
            c = agent_cls.merge_config(config)
            # The driver, the learners (which then hold the GPUs, one each), the rollout
            # workers and the evaluation workers.
            learners = c["num_learners"]
            bundles = [{"CPU": c["num_cpus_for_driver"],
                        "GPU": 0 if learners else c["num_gpus"]}]
            bundles += [{"CPU": c["num_cpus_per_learner"], "GPU": c["num_gpus"] / learners}
                        for _ in range(learners)]
            bundles += [{"CPU": c["num_cpus_per_worker"], "GPU": c["num_gpus_per_worker"]}
                        for _ in range(c["num_workers"] + c["evaluation_num_workers"])]
            check_cluster_fits(
                {r: sum(b[r] for b in bundles) for r in ("CPU", "GPU")},
                f"The {agent_cls._name} trial (num_cpus_for_driver / num_gpus + "
                "num_learners x per-learner + num_workers x per-worker resources)",
                "Lower num_learners, num_workers or the per-worker resources (fractions "
                "are allowed), or start Ray with more resources.")
            return PlacementGroupFactory(bundles)

        def setup(self, config: dict) -> None:
            # Videos and other agent files belong in the trial's results folder; Tune
            # writes the result files and checkpoints itself.
            self.agent = agent_cls(config=config, logdir=self._trial_dir(),
                                   log_to_disk=False)

        def _trial_dir(self) -> str:
            """``<storage_path>/<experiment>/<trial>`` when it is a local folder (Ray 2.x
            gives the trainable a temporary working dir that is not synced back), else
            Tune's logdir."""
            storage = getattr(self, "_storage", None)
            path = getattr(storage, "trial_fs_path", None)
            filesystem = getattr(storage, "storage_filesystem", None)
            if path and type(filesystem).__name__ == "LocalFileSystem":
                os.makedirs(path, exist_ok=True)
                return path
            return self.logdir

        def step(self) -> dict:
            return self.agent.step()

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            self.agent.save(checkpoint_dir)

        def load_checkpoint(self, checkpoint: str) -> None:
            self.agent.restore(checkpoint)

        def reset_config(self, new_config: dict) -> bool:
            """Tune's actor reuse (``reuse_actors``, PBT): True when the new config
            differs only in hyperparameters the policies change in place."""
            return reset_agent_config(self.agent, new_config)

        def cleanup(self) -> None:
            self.agent.stop()

    AgentTrainable.__name__ = AgentTrainable.__qualname__ = agent_cls._name
    return AgentTrainable


def reset_agent_config(agent: Any, new_config: dict) -> bool:
    """Applies ``new_config`` to a running agent if it differs from the agent's config
    only in :attr:`Policy.IN_PLACE_KEYS <flowrl.policies.policy.Policy.IN_PLACE_KEYS>`
    (lr and its schedule, entropy coefficients, clipping, ...): every policy on every
    worker takes the new values, and True is returned. Any other difference (batch
    sizes, workers, the env, ...) shapes the plan itself: False, and Tune builds a new
    trial actor instead."""
    merged = type(agent).merge_config(new_config)
    if new_config.get("env") is None:  # an agent built with env=... keeps it
        merged["env"] = agent.config["env"]
    changes = {key: value for key, value in merged.items() if agent.config.get(key) != value}
    if set(changes) - Policy.IN_PLACE_KEYS:
        return False
    local_policies = agent.workers.local_worker().foreach_policy(lambda policy, _pid: policy)
    if changes and not all(isinstance(policy, Policy) for policy in local_policies):
        return False  # ES: its own policy class, nothing to change in place
    if changes:
        agent.workers.foreach_worker(
            lambda worker: worker.foreach_policy(
                lambda policy, _pid: policy.update_hyperparameters(changes)))
        agent.config.update(changes)
    return True


def get_trainable_class(name: str) -> type:
    """The registered Tune Trainable of algorithm ``name``."""
    if name not in _TRAINABLES:
        _TRAINABLES[name] = make_trainable(get_agent_class(name))
    return _TRAINABLES[name]


def register_trainables() -> None:
    """Registers every algorithm with Tune under its short name ("PPO", ...)."""
    for name in ALGORITHMS:
        tune.register_trainable(name, get_trainable_class(name))


class TensorBoardCallback(LoggerCallback):
    """A TensorBoard event file per trial directory, scalars under flowrl's names
    (``episode_reward_mean``, ``info/learner/default_policy/entropy``, ...)."""

    def __init__(self) -> None:
        self._writers: dict = {}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._writers:
            self._writers[trial] = TensorBoardWriter(trial.local_path)
        self._writers[trial].write(result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        writer = self._writers.pop(trial, None)
        if writer is not None:
            writer.close()


class ProgressLineCallback(LoggerCallback):
    """Prints one :func:`~flowrl.algorithms.result_logger.progress_line` per trial result."""

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        print(progress_line(str(trial), result), flush=True)


def tune_callbacks(progress: bool = True) -> list:
    """Tune callbacks for flowrl runs: result.json, progress.csv, TensorBoard scalars
    under flowrl's names, and (optionally) one progress line per iteration.

        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        tune.run_experiments(experiments, callbacks=tune_callbacks())

    Tune's own TensorBoard logger prefixes every name with ``ray/tune/``; the
    environment variable keeps it (and Tune's default JSON/CSV loggers, replaced
    here) from writing a second copy.
    """
    callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), TensorBoardCallback()]
    if progress:
        callbacks.append(ProgressLineCallback())
    return callbacks
