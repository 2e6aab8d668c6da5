"""Adapter for envs written against the old gym API.

Old API: ``reset() -> obs`` and ``step(a) -> (obs, reward, done, info)``, with
``info["TimeLimit.truncated"]`` marking time-limit ends. New (gymnasium) API:
``reset(seed=..., options=...) -> (obs, info)`` and
``step(a) -> (obs, reward, terminated, truncated, info)``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


def _convert_space(space: Any) -> gym.spaces.Space:
    """Turns a space of the old ``gym`` package (duck-typed) into a gymnasium one."""
    if isinstance(space, gym.spaces.Space):
        return space
    kind = type(space).__name__
    if kind == "Discrete":
        return gym.spaces.Discrete(int(space.n))
    if kind == "Box":
        return gym.spaces.Box(np.asarray(space.low), np.asarray(space.high),
                              dtype=space.dtype)
    if kind == "MultiDiscrete":
        return gym.spaces.MultiDiscrete(np.asarray(space.nvec))
    if kind == "MultiBinary":
        return gym.spaces.MultiBinary(space.n)
    if kind == "Tuple":
        return gym.spaces.Tuple([_convert_space(s) for s in space.spaces])
    if kind == "Dict":
        return gym.spaces.Dict({k: _convert_space(s) for k, s in space.spaces.items()})
    raise ValueError(f"Cannot convert space {space!r} to a gymnasium space")


class OldGymAPIAdapter(gym.Env):
    """Presents an old-gym-API env as a gymnasium env.

        env = OldGymAPIAdapter(MyOldEnv())
        obs, info = env.reset(seed=0)
        obs, r, terminated, truncated, info = env.step(action)
    """

    def __init__(self, env: Any):
        self.env = env
        self.observation_space = _convert_space(env.observation_space)
        self.action_space = _convert_space(env.action_space)
        self.metadata = getattr(env, "metadata", {})
        self.render_mode = getattr(env, "render_mode", None)
        self.spec = getattr(env, "spec", None)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and hasattr(self.env, "seed"):
            self.env.seed(seed)
        out = self.env.reset()
        # Some envs already return (obs, info) while keeping the 4-tuple step.
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            return out
        return out, {}

    def step(self, action):
        out = self.env.step(action)
        if len(out) == 5:
            return out
        if len(out) != 4:
            raise ValueError(f"{type(self.env).__name__}.step() returned {len(out)} "
                             "values; expected 4 (old gym API) or 5 (gymnasium API)")
        obs, reward, done, info = out
        truncated = bool(done and info.get("TimeLimit.truncated", False))
        return obs, reward, bool(done) and not truncated, truncated, info

    def render(self):
        return self.env.render()

    def close(self):
        if hasattr(self.env, "close"):
            self.env.close()


def _speaks_gymnasium(env: Any) -> bool:
    return isinstance(env, gym.Env) or (
        isinstance(env, gym.Wrapper))


def ensure_gymnasium_env(env: Any) -> gym.Env:
    """Returns ``env`` itself if it is a gymnasium env, else wraps it in the adapter."""
    if _speaks_gymnasium(env):
        return env
    for attr in ("reset", "step", "observation_space", "action_space"):
        if not hasattr(env, attr):
            raise ValueError(f"The env creator returned {type(env).__name__}, which has "
                             f"no {attr!r}: it must return a gymnasium.Env or an "
                             "old-gym-API env")
    return OldGymAPIAdapter(env)
