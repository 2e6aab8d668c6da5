"""Turn-based (AEC) PettingZoo games as flowrl multi-agent envs.

    import pettingzoo     # or: from pettingzoo.classic import tictactoe_v3; tictactoe_v3.env()
    register_env("tictactoe", lambda ctx: AECEnvAdapter(
        pettingzoo.make("aec", "classic/tictactoe-v3")))
    config = {"multiagent": {"policies": ["shared"],
                             "policy_mapping_fn": lambda agent_id: "shared"}}

In an AEC ("agent environment cycle") game one agent moves at a time: the env names it
in ``agent_selection``, ``last()`` gives its view, ``step(action)`` plays its move and
``rewards`` holds what every agent earned by that move. :class:`AECEnvAdapter` maps one
move to one flowrl step:

* **Turns.** The observation dict of ``reset()`` and of every ``step()`` holds the
  agent whose turn it is next, and only that agent acts in the following step. An
  action for any other agent is a ``ValueError`` naming it and whose turn it is.
* **Rewards are reported when they are earned**, for every agent, not only for the one
  that moved: when the winner of tic-tac-toe moves, the step's rewards are
  ``{winner: +1, loser: -1}``. Summing an agent's rewards over the steps of an episode
  gives its return in the game.
* **Ends.** An agent that is terminated (or truncated) by a step appears in that
  step's ``terminateds`` (``truncateds``) and, with its final observation, in the
  observation dict; like every agent that has left, it acts no more. The episode ends
  (``__all__``) once no agent is left to move. The env's own bookkeeping for agents
  that have left (the ``step(None)`` PettingZoo asks for) happens inside the adapter.
* **Action masks.** A game whose observations are dicts of ``observation`` and
  ``action_mask`` (PettingZoo's classic games) is seen through a ``Dict`` space of
  ``observations`` and ``action_mask`` (a ``Box(0, 1, (n,), int8)``), the masked
  observation flowrl's policies recognise (see :func:`flowrl.data.spaces.action_mask_keys`):
  policies then sample and choose only legal actions. Other observations pass through.
  A move the mask forbids is left to the game's own rule (PettingZoo's classic games
  end the game with -1 for the player who made it).

PettingZoo itself is not a flowrl dependency: any object with the AEC API works.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.envs.multi_agent import ALL, MultiAgentEnv

__all__ = ["AECEnvAdapter"]

_AEC_METHODS = ("reset", "step", "last", "observe", "observation_space", "action_space",
                "close")
_PZ_OBS, _PZ_MASK = "observation", "action_mask"   # PettingZoo's keys
_OBS, _MASK = "observations", "action_mask"        # flowrl's masked-observation keys


def _masked_space(space: gym.Space, action_space: gym.Space, agent: Any) -> gym.Space:
    """``space`` with PettingZoo's ``observation`` key renamed ``observations`` and the
    mask as an int8 0/1 Box; spaces without a mask are returned as they are."""
    if not isinstance(space, gym.spaces.Dict) or _PZ_OBS not in space.spaces or \
            _PZ_MASK not in space.spaces:
        return space
    mask = space[_PZ_MASK]
    if not isinstance(mask, (gym.spaces.Box, gym.spaces.MultiBinary)) or len(mask.shape) != 1:
        raise ValueError(f"agent {agent!r}: the action_mask space {mask} is not a 1-D Box or "
                         "MultiBinary vector")
    shape = mask.shape
    if isinstance(action_space, gym.spaces.Discrete) and shape[0] != action_space.n:
        raise ValueError(f"agent {agent!r}: the action_mask has {shape[0]} entries but the "
                         f"action space {action_space} has {action_space.n} actions")
    parts = {(_OBS if key == _PZ_OBS else key): sub for key, sub in space.spaces.items()}
    parts[_MASK] = gym.spaces.Box(0, 1, shape, np.int8)
    return gym.spaces.Dict(parts)


class AECEnvAdapter(MultiAgentEnv):
    """A PettingZoo AEC (turn-based) env as a :class:`MultiAgentEnv`; see the module
    docstring for turns, rewards, ends and action masks.

    Args:
        aec_env: an object with the AEC API: ``possible_agents``, ``agents``,
            ``agent_selection``, ``reset(seed=, options=)``, ``step(action)``, ``last()``,
            ``observe(agent)``, ``rewards``, ``terminations``, ``truncations``, ``infos``,
            ``observation_space(agent)``, ``action_space(agent)`` and ``close()``.
    """

    def __init__(self, aec_env: Any) -> None:
        missing = [name for name in ("possible_agents", *_AEC_METHODS)
                   if not hasattr(aec_env, name)]
        if missing:
            raise TypeError(f"AECEnvAdapter needs a PettingZoo AEC env; "
                            f"{type(aec_env).__name__} has no {', '.join(map(repr, missing))}")
        self.aec_env = aec_env
        self.possible_agents = list(aec_env.possible_agents)
        if not self.possible_agents:
            raise ValueError(f"{type(aec_env).__name__}.possible_agents is empty")
        self.action_spaces = {a: aec_env.action_space(a) for a in self.possible_agents}
        self._raw_spaces = {a: aec_env.observation_space(a) for a in self.possible_agents}
        self.observation_spaces = {a: _masked_space(s, self.action_spaces[a], a)
                                   for a, s in self._raw_spaces.items()}
        # Single-agent code paths (and users) read these; the first agent's spaces.
        first = self.possible_agents[0]
        self.observation_space = self.observation_spaces[first]
        self.action_space = self.action_spaces[first]
        self._reported: set = set()   # agents whose end this episode was already reported
        self._any_terminated = False  # whether some agent's end this episode was terminal
        self._over = True             # no episode running: reset() first

    # ------------------------------------------------------------------ helpers
    @property
    def current_agent(self) -> Any:
        """The agent whose turn it is (the only one that may act in the next step);
        None when no episode is running."""
        return None if self._over else self.aec_env.agent_selection

    def _convert(self, agent: Any, observation: Any) -> Any:
        """An AEC observation as the adapter's observation space has it."""
        if self.observation_spaces[agent] is self._raw_spaces[agent]:
            return observation
        out = {(_OBS if key == _PZ_OBS else key): value for key, value in observation.items()}
        out[_MASK] = np.asarray(observation[_PZ_MASK], dtype=np.int8)
        return out

    def _dead(self, agent: Any) -> bool:
        env = self.aec_env
        return bool(env.terminations.get(agent, False) or env.truncations.get(agent, False))

    def _skip_dead(self) -> None:
        """Plays PettingZoo's ``step(None)`` for agents that have left, until a live
        agent is to move or none is left (the episode is over)."""
        env = self.aec_env
        # Bounded: each dead step removes one agent; a game that never removes them
        # ends here anyway, since only dead agents are left.
        for _ in range(len(env.agents) + 1):
            if not env.agents or all(self._dead(a) for a in env.agents):
                self._over = True
                return
            if not self._dead(env.agent_selection):
                return
            env.step(None)
        self._over = True

    def _turn(self) -> tuple[dict, dict]:
        """``({agent: obs}, {agent: info})`` of the agent to move; empty when over."""
        if self._over:
            return {}, {}
        agent = self.aec_env.agent_selection
        observation, _, _, _, info = self.aec_env.last()
        return {agent: self._convert(agent, observation)}, {agent: dict(info or {})}

    # ------------------------------------------------------------------ the env API
    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[dict, dict]:
        """Starts a game; the observation dict holds the agent that moves first."""
        self.aec_env.reset(seed=seed, options=options)
        self._reported, self._any_terminated = set(), False
        self._over = False
        self._skip_dead()
        return self._turn()

    def step(self, action_dict: dict) -> tuple[dict, dict, dict, dict, dict]:
        """Plays the move of the agent whose turn it is (``{agent: action}``).

        Returns ``(observations, rewards, terminateds, truncateds, infos)``: the next
        agent to move and the agents that left in this step (with their final
        observations) in ``observations``; every agent's reward from this move.
        """
        if self._over:
            raise RuntimeError("AECEnvAdapter.step() called with no episode running: the "
                               "game is over (or was never started); call reset() first")
        if not isinstance(action_dict, dict):
            raise TypeError(f"step() takes a dict {{agent: action}}, got "
                            f"{type(action_dict).__name__}")
        env = self.aec_env
        mover = env.agent_selection
        others = [a for a in action_dict if a != mover]
        if others:
            raise ValueError(f"agent {others[0]!r} cannot act now: it is {mover!r}'s turn "
                             f"(only the agent in the last observation dict acts)")
        if mover not in action_dict:
            raise ValueError(f"no action for {mover!r}, whose turn it is")
        action = action_dict[mover]
        if isinstance(action, np.generic):
            action = action.item()  # PettingZoo games index with plain ints
        env.step(action)

        # Read everything this move produced before dead steps clear it.
        rewards = {a: float(r) for a, r in env.rewards.items()}
        rewards.setdefault(mover, 0.0)
        obs: dict = {}
        terms: dict = {a: False for a in rewards}
        truncs: dict = {a: False for a in rewards}
        infos: dict = {}
        ended: dict = {}  # agent -> whether it terminated (else truncated) in this move
        for agent in list(env.agents):
            if agent in self._reported or not self._dead(agent):
                continue
            self._reported.add(agent)
            # Both flags set (PettingZoo's illegal-move rule sets both) count as
            # terminated: the agent's return does not go on.
            ended[agent] = bool(env.terminations.get(agent, False))
            terms[agent], truncs[agent] = ended[agent], not ended[agent]
            obs[agent] = self._convert(agent, env.observe(agent))
            infos[agent] = dict(env.infos.get(agent) or {})
        self._any_terminated = self._any_terminated or any(ended.values())
        self._skip_dead()
        turn_obs, turn_infos = self._turn()
        obs.update(turn_obs)
        infos.update(turn_infos)
        # How the game ended for the agents still in it decides __all__ (agents that
        # left earlier carry their own flags).
        terms[ALL] = self._over and (any(ended.values()) if ended else self._any_terminated)
        truncs[ALL] = self._over and not terms[ALL]
        return obs, rewards, terms, truncs, infos

    def render(self) -> Any:
        """The AEC env's ``render()``."""
        return self.aec_env.render()

    def close(self) -> None:
        """Closes the AEC env."""
        self.aec_env.close()
