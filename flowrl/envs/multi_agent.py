"""Multi-agent environments: dicts keyed by agent id, and a PettingZoo adapter.

    class MyEnv(MultiAgentEnv):
        possible_agents = ["red", "blue"]
        observation_spaces = {"red": Box(...), "blue": Box(...)}
        action_spaces = {"red": Discrete(2), "blue": Discrete(2)}
        def reset(self, *, seed=None, options=None):
            return {"red": obs_r, "blue": obs_b}, {}
        def step(self, actions):          # {"red": a_r, "blue": a_b}
            return obs, rewards, terminateds, truncateds, infos  # dicts by agent id
                                          # terminateds["__all__"]: the episode is over

Agents present in an observation dict act in that step; an agent whose
``terminateds[agent]`` is true leaves the episode. With a ``multiagent`` config, each
agent id is mapped to a policy id by ``policy_mapping_fn`` and every policy learns from
its agents' trajectories (see :class:`flowrl.workers.multi_agent_sampler.MultiAgentSampler`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ALL = "__all__"


class MultiAgentEnv(gym.Env):
    """Base class of multi-agent envs (see the module docstring for the protocol).

    Subclasses set ``possible_agents`` (every agent id that can appear),
    ``observation_spaces`` and ``action_spaces`` (dicts by agent id).
    """

    possible_agents: list = []
    observation_spaces: dict = {}
    action_spaces: dict = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict, dict]:
        """``(observations, infos)``, dicts keyed by agent id."""
        raise NotImplementedError(f"{type(self).__name__} must implement reset()")

    def step(self, action_dict: dict) -> tuple[dict, dict, dict, dict, dict]:
        """``(observations, rewards, terminateds, truncateds, infos)`` keyed by agent id,
        ``terminateds["__all__"]`` / ``truncateds["__all__"]`` ending the episode."""
        raise NotImplementedError(f"{type(self).__name__} must implement step()")


class ParallelEnvAdapter(MultiAgentEnv):
    """A PettingZoo *parallel* env (``reset`` / ``step`` with dicts, ``possible_agents``,
    ``observation_space(agent)``, ``action_space(agent)``) as a :class:`MultiAgentEnv`.

        register_env("pistonball", lambda ctx: ParallelEnvAdapter(
            pistonball_v6.parallel_env(**ctx)))

    PettingZoo itself is not a flowrl dependency: any object with that API works.
    ``__all__`` is true once every agent is terminated (or truncated).
    """

    def __init__(self, parallel_env: Any):
        for attribute in ("possible_agents", "reset", "step", "observation_space",
                          "action_space"):
            if not hasattr(parallel_env, attribute):
                raise TypeError(f"ParallelEnvAdapter needs a PettingZoo parallel env; "
                                f"{type(parallel_env).__name__} has no {attribute!r}")
        self.parallel_env = parallel_env
        self.possible_agents = list(parallel_env.possible_agents)
        self.observation_spaces = {a: parallel_env.observation_space(a)
                                   for a in self.possible_agents}
        self.action_spaces = {a: parallel_env.action_space(a) for a in self.possible_agents}
        self._live: set = set()

    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict, dict]:
        result = self.parallel_env.reset(seed=seed, options=options)
        obs, infos = result if isinstance(result, tuple) else (result, {})
        self._live = set(obs)
        return dict(obs), dict(infos or {})

    def step(self, action_dict: dict) -> tuple[dict, dict, dict, dict, dict]:
        obs, rewards, terms, truncs, infos = self.parallel_env.step(action_dict)
        terms, truncs = dict(terms), dict(truncs)
        for agent in list(self._live):
            if terms.get(agent) or truncs.get(agent):
                self._live.discard(agent)
        terms[ALL] = not self._live and any(terms.values())
        truncs[ALL] = not self._live and not terms[ALL]
        return dict(obs), dict(rewards), terms, truncs, dict(infos or {})

    def close(self) -> None:
        if hasattr(self.parallel_env, "close"):
            self.parallel_env.close()


class MultiCartPole(MultiAgentEnv):
    """``num_agents`` independent CartPole-v1 poles, one per agent ``agent_<i>``.

    An agent leaves when its pole falls (or at 500 steps); the episode ends when all
    have left. With ``respawn`` an agent whose pole fell gets a fresh pole in the next
    step (a new agent-episode) and the env episode ends after ``horizon`` steps, so
    every agent acts in every step, however well the others do.
    ``env_config``: ``num_agents`` (default 2), ``respawn`` (False), ``horizon`` (1000).
    A small, fast env for tests and the two-trainer example.
    """

    def __init__(self, config: dict | None = None):
        config = config or {}
        self.num_agents = int(config.get("num_agents", 2))
        if self.num_agents < 1:
            raise ValueError(f"num_agents={self.num_agents} must be >= 1")
        self.respawn = bool(config.get("respawn", False))
        self.horizon = int(config.get("horizon", 1000))
        self._steps = 0
        self._fallen: set = set()
        self.possible_agents = [f"agent_{i}" for i in range(self.num_agents)]
        self.envs = {a: gym.make("CartPole-v1") for a in self.possible_agents}
        self.observation_spaces = {a: e.observation_space for a, e in self.envs.items()}
        self.action_spaces = {a: e.action_space for a, e in self.envs.items()}
        self.observation_space = self.observation_spaces[self.possible_agents[0]]
        self.action_space = self.action_spaces[self.possible_agents[0]]
        self._live: set = set()

    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict, dict]:
        obs = {}
        for i, (agent, env) in enumerate(self.envs.items()):
            obs[agent], _ = env.reset(seed=None if seed is None else seed + 7919 * i)
        self._live = set(self.possible_agents)
        self._steps, self._fallen = 0, set()
        return obs, {}

    def step(self, action_dict: dict) -> tuple[dict, dict, dict, dict, dict]:
        obs, rewards, terms, truncs = {}, {}, {}, {}
        for agent in self._fallen:  # respawn: a fresh pole, acting from the next step
            obs[agent], _ = self.envs[agent].reset()
            self._live.add(agent)
        self._fallen = set()
        for agent, action in action_dict.items():
            if agent not in self._live or agent in obs:
                raise ValueError(f"agent {agent!r} acted while it was not in the episode")
            o, r, term, trunc, _ = self.envs[agent].step(int(np.asarray(action)))
            obs[agent], rewards[agent], terms[agent], truncs[agent] = o, r, term, trunc
            if term or trunc:
                self._live.discard(agent)
                if self.respawn:
                    self._fallen.add(agent)
        self._steps += 1
        if self.respawn and self._steps >= self.horizon:
            for agent in self._live:
                truncs[agent] = True
            self._live = set()
            terms[ALL], truncs[ALL] = False, True
            return obs, rewards, terms, truncs, {}
        terms[ALL] = not self._live and not self._fallen and any(terms.values())
        truncs[ALL] = not self._live and not self._fallen and not terms[ALL]
        return obs, rewards, terms, truncs, {}

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
