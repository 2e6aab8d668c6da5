"""User hooks into sampling and training: subclass :class:`DefaultCallbacks`.

    class LongPoleCallbacks(DefaultCallbacks):
        def on_episode_start(self, *, worker, episode, env_index):
            episode.user_data["angles"] = []

        def on_episode_step(self, *, worker, episode, env_index):
            episode.user_data["angles"].append(abs(episode.last_observation[2]))

        def on_episode_end(self, *, worker, episode, env_index):
            episode.custom_metrics["max_angle"] = max(episode.user_data["angles"])

    agent = PPOAgent(config={"callbacks": LongPoleCallbacks}, env="CartPole-v1")
    agent.train()["custom_metrics"]["max_angle_mean"]

``config["callbacks"]`` is the class (each worker and the driver build their own
instance), or its import path as a string (``"my_pkg.callbacks:LongPoleCallbacks"`` or
``"my_pkg.callbacks.LongPoleCallbacks"``) so that YAML files and ``--config`` JSON can
name one. The class travels to remote workers inside the config, so it must be
picklable by Ray (defined in an importable module, or registered with
``ray.cloudpickle.register_pickle_by_value``).

Which hooks run where:

* episode hooks: on the worker that samples, once per env step for ``on_episode_step``.
  The sampler calls them only if the class overrides one of them, so the default
  costs nothing per step.
* ``on_sample_end``: on the worker, after each ``RolloutWorker.sample()``.
* ``on_train_result``: on the driver, at the end of every ``Agent.step()`` (hence of
  ``train()`` and of Tune's iterations), after evaluation results were added.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np


class Episode:
    """The state of one episode, handed to the episode callbacks.

    An episode is what the results count as one: for Atari training envs, whose lost
    lives end the sampler's "episodes", it is the whole game (its end is the step
    whose ``info`` carries the game's ``"episode"`` stats).

    Attributes:
        episode_id: unique across workers; the ``eps_id`` of the episode's first
            sampled piece.
        env_index: index of the env among the worker's ``num_envs_per_worker``.
        length: env steps taken so far.
        total_reward: sum of the rewards the sampler received so far (for Atari
            training envs: the clipped rewards; the results report the game score).
        custom_metrics: ``{name: float}`` written by the user; finished episodes' values
            are summarized as ``custom_metrics/<name>_mean|min|max`` in the results.
        user_data: a free dict for the user's own per-episode state.
        last_observation: the latest observation (after ``reset`` at the start).
        last_action: the policy's latest action (None at the start).
        last_reward: the latest reward (None at the start).
        last_info: the latest ``info`` dict (the reset info at the start).
    """

    __slots__ = ("episode_id", "env_index", "length", "total_reward", "custom_metrics",
                 "user_data", "last_observation", "last_action", "last_reward",
                 "last_info")

    def __init__(self, episode_id: int, env_index: int, observation: Any = None,
                 info: dict | None = None):
        self.episode_id = episode_id
        self.env_index = env_index
        self.length = 0
        self.total_reward = 0.0
        self.custom_metrics: dict[str, float] = {}
        self.user_data: dict[str, Any] = {}
        self.last_observation = observation
        self.last_action: Any = None
        self.last_reward: float | None = None
        self.last_info: dict = info if info is not None else {}

    def add_step(self, observation: Any, action: Any, reward: float, info: dict) -> None:
        """Records one env step (called by the sampler before ``on_episode_step``)."""
        self.length += 1
        self.total_reward += float(reward)
        self.last_observation = observation
        self.last_action = action
        self.last_reward = float(reward)
        self.last_info = info

    def __repr__(self) -> str:
        return (f"Episode(id={self.episode_id}, env_index={self.env_index}, "
                f"length={self.length}, total_reward={self.total_reward:g})")


class DefaultCallbacks:
    """No-op hooks. Subclass and override the ones you need (keyword arguments only).

    One instance per worker (and one on the driver for ``on_train_result``), so the
    instance may keep state of its own between calls.
    """

    def on_episode_start(self, *, worker: Any, episode: Episode, env_index: int) -> None:
        """A new episode started (after the env's reset); ``worker`` is the RolloutWorker
        (None in ``Agent.evaluate()``)."""

    def on_episode_step(self, *, worker: Any, episode: Episode, env_index: int) -> None:
        """After every env step; ``episode.last_*`` hold the step's outcome."""

    def on_episode_end(self, *, worker: Any, episode: Episode, env_index: int) -> None:
        """The episode ended (after its last step's ``on_episode_step``). Write
        ``episode.custom_metrics`` here at the latest."""

    def on_sample_end(self, *, worker: Any, samples: Any) -> None:
        """After ``RolloutWorker.sample()``; ``samples`` is the postprocessed batch
        (may be modified in place)."""

    def on_train_result(self, *, agent: Any, result: dict) -> None:
        """At the end of each training iteration on the driver; may modify ``result``
        in place (add keys, ...)."""


EPISODE_HOOKS = ("on_episode_start", "on_episode_step", "on_episode_end")


def overrides_episode_hooks(callbacks: DefaultCallbacks | type) -> bool:
    """True if ``callbacks`` (instance or class) overrides any episode hook."""
    cls = callbacks if isinstance(callbacks, type) else type(callbacks)
    return any(getattr(cls, name) is not getattr(DefaultCallbacks, name)
               for name in EPISODE_HOOKS)


def resolve_callbacks(value: Any, key: str = "callbacks") -> type:
    """The callbacks class named by a config value.

    Accepts a :class:`DefaultCallbacks` subclass, None (the defaults), or an import
    path ``"module.path:ClassName"`` / ``"module.path.ClassName"``.

    Raises:
        ValueError: the path does not import, or the value is not a subclass of
            DefaultCallbacks (the message names ``key`` and the value).
    """
    if value is None:
        return DefaultCallbacks
    if isinstance(value, str):
        cls = _import_path(value, key)
    elif isinstance(value, type):
        cls = value
    elif isinstance(value, DefaultCallbacks):
        raise ValueError(f"Config key {key!r}: pass the class {type(value).__name__}, not "
                         "an instance (every worker builds its own).")
    else:
        raise ValueError(f"Config key {key!r} has value {value!r} of type "
                         f"{type(value).__name__}; expected a subclass of "
                         "flowrl.workers.callbacks.DefaultCallbacks or its import path "
                         "('module.path:ClassName').")
    if not issubclass(cls, DefaultCallbacks):
        raise ValueError(f"Config key {key!r}: {value!r} is not a subclass of "
                         "flowrl.workers.callbacks.DefaultCallbacks.")
    return cls


def _import_path(path: str, key: str) -> Any:
    """``"pkg.mod:Outer.Inner"``, ``"pkg.mod.Name"`` or ``"file.py:Name"`` -> the object."""
    from flowrl.imports import load_object
    try:
        return load_object(path)
    except ValueError as e:
        raise ValueError(f"Config key {key!r}: {e}") from e


def summarize_custom_metrics(metrics: Iterable[dict | None]) -> dict[str, float]:
    """``[{name: value}, ...]`` -> ``{"<name>_mean", "<name>_min", "<name>_max"}``.

    Each name is summarized over the episodes that set it; None entries are skipped.
    """
    values: dict[str, list[float]] = {}
    for custom in metrics:
        for name, value in (custom or {}).items():
            values.setdefault(name, []).append(float(value))
    summary = {}
    for name, vals in values.items():
        summary[f"{name}_mean"] = float(np.mean(vals))
        summary[f"{name}_min"] = float(np.min(vals))
        summary[f"{name}_max"] = float(np.max(vals))
    return summary
