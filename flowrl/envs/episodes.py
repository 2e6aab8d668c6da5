"""One episode runner: plays one episode of a gymnasium env with an action function.

    runner = EpisodeRunner(env, clip_actions=True)
    result = runner.run(lambda obs: policy.compute_single_action(obs), seed=7)
    result.episode_return, result.length           # what the results report

Used by ``Agent.evaluate``, the ES workers and ``scripts/rollout.py`` (the vectorized
samplers keep their own batched loops). It handles

* ``terminated`` / ``truncated``: either ends the episode;
* envs that report whole episodes in ``info["episode"]`` (Atari training envs, whose
  lost lives end "episodes" while the game goes on): a life loss resets and plays on,
  and the game's ``info["episode"]`` return and length are reported (the unclipped
  score), as the training results do;
* Box actions clipped to the bounds (``clip_actions``) before the env sees them;
* a step limit (``max_steps``): the episode is then reported unfinished;
* per-step hooks: ``on_start(obs, info)`` after the first reset and
  ``on_step(EpisodeStep)`` after every env step (callbacks, recording observations,
  keeping steps). Videos and on-screen rendering are env wrappers / ``render_mode``,
  so they need no hook.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import gymnasium as gym
import numpy as np

__all__ = ["EpisodeResult", "EpisodeRunner", "EpisodeStep", "env_reports_episodes"]


def env_reports_episodes(env: gym.Env) -> bool:
    """True if a wrapper reports whole-episode stats in ``info["episode"]``.

    Atari training envs clip rewards and end "episodes" at each life loss; their
    ``RecordEpisodeStatistics`` layer (or any wrapper with ``reports_episode_stats =
    True``) reports the real game's unclipped return, which is what users want to see.
    """
    while env is not None:
        if isinstance(env, gym.wrappers.RecordEpisodeStatistics) or \
                getattr(env, "reports_episode_stats", False) is True:
            return True
        env = getattr(env, "env", None)
    return False


class EpisodeStep(NamedTuple):
    """One env step, as the ``on_step`` hook sees it."""

    obs: Any            # the observation the action was chosen for
    action: Any         # what the action function returned
    env_action: Any     # what the env received (clipped with ``clip_actions``)
    reward: float
    next_obs: Any
    terminated: bool
    truncated: bool
    info: dict


class EpisodeResult(NamedTuple):
    """One played episode.

    ``episode_return`` / ``length``: the sums of this run, or the env's
    ``info["episode"]`` stats when it reports whole episodes. ``num_steps``: the
    ``env.step`` calls made (differs from ``length`` when the env counts steps the
    agent did not take, e.g. FIRE presses after Atari resets). ``finished``: False
    when ``max_steps`` cut the episode.
    """

    episode_return: float
    length: int
    num_steps: int
    finished: bool


class EpisodeRunner:
    """Plays episodes of ``env`` one at a time (see the module docstring).

    Args:
        env: a gymnasium env (5-tuple ``step``, ``reset`` returning ``(obs, info)``).
        clip_actions: clip actions to a Box action space's bounds before stepping.
    """

    def __init__(self, env: gym.Env, clip_actions: bool = False):
        self.env = env
        self.reports_episodes = env_reports_episodes(env)
        space = env.action_space
        self._clip_bounds = (space.low, space.high) \
            if clip_actions and isinstance(space, gym.spaces.Box) else None

    def run(self, act: Callable[[Any], Any], *, seed: int | None = None,
            max_steps: int | None = None,
            on_start: Callable[[Any, dict], None] | None = None,
            on_step: Callable[[EpisodeStep], None] | None = None) -> EpisodeResult:
        """Resets the env (with ``seed``) and steps it with ``act(obs)`` until the
        episode ends or ``max_steps`` steps were taken."""
        env, bounds = self.env, self._clip_bounds
        obs, info = env.reset(seed=seed)
        if on_start is not None:
            on_start(obs, info)
        total, length = 0.0, 0
        while max_steps is None or length < max_steps:
            action = act(obs)
            env_action = action if bounds is None else np.clip(action, *bounds)
            next_obs, reward, terminated, truncated, info = env.step(env_action)
            total += float(reward)
            length += 1
            if on_step is not None:
                on_step(EpisodeStep(obs, action, env_action, float(reward), next_obs,
                                    bool(terminated), bool(truncated), info))
            obs = next_obs
            if not (terminated or truncated):
                continue
            if self.reports_episodes and "episode" in info:
                stats = info["episode"]
                return EpisodeResult(float(np.asarray(stats["r"]).item()),
                                     int(np.asarray(stats["l"]).item()), length, True)
            if self.reports_episodes and not truncated:
                obs, _ = env.reset()  # a lost life: the game goes on
                continue
            return EpisodeResult(total, length, length, True)
        return EpisodeResult(total, length, length, False)
