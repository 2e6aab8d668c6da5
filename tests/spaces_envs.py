"""Small envs with Dict, Tuple, MultiDiscrete, masked and image spaces, for the tests.

Each env is a class taking the env context (a dict), so Agents build them directly.
"""

from __future__ import annotations

import sys
from typing import Any

import gymnasium as gym
import numpy as np
import ray

# Remote workers cannot import the test folder's modules: ship these envs by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CueEnv(gym.Env):
    """Dict observation ``{"cue": Discrete(3), "shift": Box(-1, 1, (2,))}``; 10 steps.

    Reward 1 when the action equals ``(cue + (shift[0] > 0)) % 3``: a policy must read
    both leaves. A uniformly random policy earns 10/3 per episode, a perfect one 10.
    """

    def __init__(self, config: Any = None) -> None:
        self.observation_space = gym.spaces.Dict({
            "cue": gym.spaces.Discrete(3),
            "shift": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)})
        self.action_space = gym.spaces.Discrete(3)
        self._rng = np.random.default_rng(0)
        self._t = 0

    def _observe(self) -> dict:
        self._obs = {"cue": int(self._rng.integers(3)),
                     "shift": self._rng.uniform(-1, 1, 2).astype(np.float32)}
        return self._obs

    def _answer(self) -> int:
        return (self._obs["cue"] + int(self._obs["shift"][0] > 0)) % 3

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._t = 0
        return self._observe(), {}

    def step(self, action: int):
        reward = float(int(action) == self._answer())
        self._t += 1
        return self._observe(), reward, False, self._t >= 10, {}


class TwoDialsEnv(gym.Env):
    """MultiDiscrete([3, 4]) actions; the observation shows the two target settings
    as one-hot vectors. Reward per step: how many dials are set right (0-2); 10 steps.

    A uniformly random policy earns 10 * (1/3 + 1/4) = 5.8 per episode, a perfect one 20.
    """

    def __init__(self, config: Any = None) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, (7,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([3, 4])
        self._rng = np.random.default_rng(0)
        self._t = 0

    def _observe(self) -> np.ndarray:
        self._target = (int(self._rng.integers(3)), int(self._rng.integers(4)))
        obs = np.zeros(7, np.float32)
        obs[self._target[0]] = 1.0
        obs[3 + self._target[1]] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._t = 0
        return self._observe(), {}

    def step(self, action: np.ndarray):
        assert self.action_space.contains(np.asarray(action)), action
        reward = float(int(action[0]) == self._target[0]) + float(int(action[1]) == self._target[1])
        self._t += 1
        return self._observe(), reward, False, self._t >= 10, {}


class MaskedGreedEnv(gym.Env):
    """A masked observation ``{"action_mask", "observations"}`` over 5 actions.

    Action 0 always pays 1 and the others 0, but each step a random half of the
    actions (often action 0) is illegal: a policy that ignores the mask would pick
    action 0 everywhere. Stepping an illegal action raises, so a leak cannot hide.
    """

    num_actions = 5

    def __init__(self, config: Any = None) -> None:
        n = self.num_actions
        self.observation_space = gym.spaces.Dict({
            "action_mask": gym.spaces.Box(0, 1, (n,), np.int8),
            "observations": gym.spaces.Box(-1.0, 1.0, (3,), np.float32)})
        self.action_space = gym.spaces.Discrete(n)
        self._rng = np.random.default_rng(0)
        self._t = 0
        self.illegal_actions = 0

    def _observe(self) -> dict:
        mask = (self._rng.random(self.num_actions) < 0.5).astype(np.int8)
        if not mask.any():
            mask[int(self._rng.integers(self.num_actions))] = 1
        self._mask = mask
        return {"action_mask": mask,
                "observations": self._rng.uniform(-1, 1, 3).astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._t = 0
        return self._observe(), {}

    def step(self, action: int):
        if not self._mask[int(action)]:
            raise AssertionError(f"illegal action {action} under mask {self._mask}")
        reward = float(int(action) == 0)
        self._t += 1
        return self._observe(), reward, False, self._t >= 20, {}


class ImageGoalEnv(gym.Env):
    """An image observation of any layout: a bright pixel left or right of centre.

    ``shape`` is the observation shape, e.g. ``(4, 84, 84)`` channels-first or
    ``(32, 32, 3)`` channels-last (``channels_first`` says which); uint8 pixels.
    Reward 1 for the action naming the side with the pixel; 10 steps.
    """

    def __init__(self, config: Any = None) -> None:
        config = dict(config or {})
        self.shape = tuple(config.get("shape", (32, 32, 3)))
        self.channels_first = bool(config.get("channels_first", False))
        self.observation_space = gym.spaces.Box(0, 255, self.shape, np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self._rng = np.random.default_rng(0)
        self._t = 0

    def _observe(self) -> np.ndarray:
        self._side = int(self._rng.integers(2))
        height, width = (self.shape[1:] if self.channels_first else self.shape[:2])
        image = np.zeros((height, width), np.uint8)
        image[height // 2, (width // 4) if self._side == 0 else (3 * width // 4)] = 255
        stacked = np.repeat(image[None], self.shape[0], 0) if self.channels_first \
            else np.repeat(image[..., None], self.shape[2], 2)
        return stacked

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._t = 0
        return self._observe(), {}

    def step(self, action: int):
        reward = float(int(action) == self._side)
        self._t += 1
        return self._observe(), reward, False, self._t >= 10, {}


class DictPendulum(gym.ObservationWrapper):
    """Pendulum-v1 with a Dict observation: ``{"angle": [cos, sin], "speed": [w]}``."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(gym.make("Pendulum-v1"))
        self.observation_space = gym.spaces.Dict({
            "angle": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            "speed": gym.spaces.Box(-8.0, 8.0, (1,), np.float32)})

    def observation(self, observation: np.ndarray) -> dict:
        return {"angle": observation[:2], "speed": observation[2:]}


class MixedActionEnv(gym.Env):
    """A Dict action ``{"dial": Discrete(3), "knob": Box(-1, 1, (1,)), "bits":
    MultiBinary(2)}`` and a Tuple observation ``(Discrete(3), Box(-1, 1, (1,)))``
    naming the target dial and knob. Reward per step: dial right (1) minus the knob's
    distance to its target, plus 0.5 per bit set; 10 steps. Every action is checked
    against the space, so a wrongly shaped action fails the step."""

    def __init__(self, config: Any = None) -> None:
        self.observation_space = gym.spaces.Tuple((gym.spaces.Discrete(3),
                                                   gym.spaces.Box(-1.0, 1.0, (1,), np.float32)))
        self.action_space = gym.spaces.Dict({
            "dial": gym.spaces.Discrete(3),
            "knob": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
            "bits": gym.spaces.MultiBinary(2)})
        self._rng = np.random.default_rng(0)
        self._t = 0

    def _observe(self) -> tuple:
        self._target = (int(self._rng.integers(3)),
                        self._rng.uniform(-1, 1, 1).astype(np.float32))
        return self._target

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._t = 0
        return self._observe(), {}

    def step(self, action: dict):
        assert self.action_space.contains(action), action
        reward = (float(action["dial"] == self._target[0])
                  - float(abs(action["knob"][0] - self._target[1][0]))
                  + 0.5 * float(np.sum(action["bits"])))
        self._t += 1
        return self._observe(), reward, False, self._t >= 10, {}


class StatelessCartPole(gym.ObservationWrapper):
    """CartPole-v1 with the velocities zeroed: ``[x, 0, angle, 0]``. A policy without
    memory cannot tell which way the pole moves; one with memory can."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(gym.make("CartPole-v1"))

    def observation(self, observation: np.ndarray) -> np.ndarray:
        observation = np.array(observation, dtype=np.float32)
        observation[1] = 0.0
        observation[3] = 0.0
        return observation


class AnySpacesEnv(gym.Env):
    """Samples of ``env_config["observation_space"]``; takes ``env_config["action_space"]``
    (defaults: a Box observation, Discrete(2) actions). For checks that need only spaces."""

    def __init__(self, config: Any = None) -> None:
        config = dict(config or {})
        self.observation_space = config.get("observation_space",
                                            gym.spaces.Box(-1.0, 1.0, (3,), np.float32))
        self.action_space = config.get("action_space", gym.spaces.Discrete(2))
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.observation_space.seed(seed)
        self._t = 0
        return self.observation_space.sample(), {}

    def step(self, action: Any):
        self._t += 1
        return self.observation_space.sample(), 0.0, False, self._t >= 10, {}
