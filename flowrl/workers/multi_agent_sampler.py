"""Sampling multi-agent envs into MultiAgentBatches, one trajectory per agent.

    sampler = MultiAgentSampler(envs, policy_map, policy_mapping_fn, fragment_length=200)
    batch = sampler.sample()   # MultiAgentBatch: {policy_id: SampleBatch}, env_steps

Each step, the agents present in the observation dicts are grouped by policy and every
policy computes the actions of all its agents (over all envs) in one batched call. An
agent's rows form its own trajectory (``agent_index`` column = its position in
``possible_agents``); trajectories are postprocessed by the agent's policy when the
agent leaves the episode or the fragment ends (``truncate_episodes``: cut pieces are
bootstrapped by the policy) or kept until the episode ends (``complete_episodes``).
``fragment_length`` counts env steps per env.

Recurrent policies: each agent's trajectory keeps the policy's state and its previous
action / reward. They go into the policy's batched call, the extras store them per row
(``state_in_*``, ``state_out_*``, ``prev_actions`` / ``prev_rewards`` when the model
uses them), and they carry over from one fragment to the next (``truncate_episodes``),
so the cut pieces chain. They start from the initial state (and zeros) whenever the
agent's trajectory starts: in a new env episode, and when an agent acts for the first
time or again after it left (a respawned agent acts two env steps after its last row
at the earliest, so the ``t`` gap also starts a new training sequence there).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from flowrl.workers.callbacks import Episode
from flowrl.envs.multi_agent import ALL
from flowrl.data.sample_batch import MultiAgentBatch, SampleBatch
from flowrl.data.sequences import state_out_key
from flowrl.workers.sampler import EpisodeStats

_ROW_KEYS = (SampleBatch.OBS, SampleBatch.ACTIONS, SampleBatch.REWARDS,
             SampleBatch.TERMINATEDS, SampleBatch.TRUNCATEDS, SampleBatch.NEW_OBS,
             SampleBatch.EPS_ID, SampleBatch.T)


class _Trajectory:
    """Rows of one agent in one episode, not yet postprocessed.

    For a recurrent policy it also holds what the agent's next step starts from: the
    state and the previous action / reward (the initial state and zeros at first).
    """

    def __init__(self, policy_id: str, agent_index: int, policy: Any):
        self.policy_id = policy_id
        self.agent_index = agent_index
        self.rows: dict[str, list] = defaultdict(list)
        self.pending: dict | None = None  # the last action's row, waiting for its reward
        # A row whose step gave no next observation for this agent (a turn-based game:
        # the others move next). It stays open, collecting the agent's rewards, until
        # the agent observes again (its next turn) or leaves the episode.
        self.open_row: dict | None = None
        self.episode_return = 0.0         # this agent-episode's summed reward
        self.state: list[np.ndarray] = []
        self.prev_action: np.ndarray | None = None
        self.prev_reward = 0.0
        if policy.recurrent:
            layout = policy.action_layout
            self.state = policy.get_initial_state()
            self.prev_action = np.zeros(layout.shape, layout.dtype)

    def __len__(self) -> int:
        return len(self.rows[SampleBatch.OBS])


class MultiAgentSampler:
    """Steps multi-agent envs; returns postprocessed per-policy batches.

    Args:
        envs: MultiAgentEnv instances (``num_envs_per_worker`` of them).
        policy_map: ``{policy_id: Policy}``.
        policy_mapping_fn: ``fn(agent_id) -> policy_id``.
        fragment_length / batch_mode / seeds / explore / episode_id_base / callbacks /
            worker: as for :class:`~flowrl.workers.sampler.VectorSampler`.

    Episode stats carry ``policy_rewards``: ``{policy_id: mean return of that policy's
    agent-episodes}`` (an agent-episode runs from an agent's first action to its
    ``terminated``/``truncated``, or to the end of the env episode), besides the total
    return over all agents; the results report them as ``policy_reward_mean``.
    """

    def __init__(self, envs: Sequence[Any], policy_map: dict, policy_mapping_fn: Callable,
                 fragment_length: int, batch_mode: str = "truncate_episodes",
                 seeds: Sequence[int | None] = (), explore: bool = True,
                 episode_id_base: int = 0, callbacks: Any = None, worker: Any = None,
                 **_ignored: Any):
        if batch_mode not in ("truncate_episodes", "complete_episodes"):
            raise ValueError(f"batch_mode={batch_mode!r}; expected 'truncate_episodes' or "
                             "'complete_episodes'")
        self.envs = list(envs)
        self.policy_map = policy_map
        self.policy_mapping_fn = policy_mapping_fn
        self.fragment_length = int(fragment_length)
        self.batch_mode = batch_mode
        self.explore = explore
        self.callbacks = callbacks
        self.worker = worker
        self._next_eps_id = episode_id_base
        self._finished_stats: list[EpisodeStats] = []
        self._agent_index = {a: i for i, a in enumerate(self.envs[0].possible_agents)}
        seeds = list(seeds) or [None] * len(self.envs)
        self._obs: list[dict] = []
        self._episodes: list[Episode] = []
        self._policy_of: list[dict] = []          # per env: agent -> policy id
        self._trajectories: list[dict] = []       # per env: agent -> _Trajectory
        self._policy_rewards: list[dict] = []
        self._t: list[int] = []
        for i, (env, seed) in enumerate(zip(self.envs, seeds)):
            obs, info = env.reset(seed=seed)
            self._obs.append(obs)
            self._start_episode(i, obs, info)
        # complete_episodes: finished pieces of unfinished episodes, per env
        self._held: list[list[tuple[str, SampleBatch]]] = [[] for _ in self.envs]

    # ------------------------------------------------------------------ episodes
    def _start_episode(self, i: int, obs: dict, info: dict) -> None:
        self._next_eps_id += 1
        episode = Episode(self._next_eps_id, i, obs, info)
        if i < len(self._episodes):
            self._episodes[i] = episode
            self._policy_of[i], self._trajectories[i] = {}, {}
            self._policy_rewards[i], self._t[i] = defaultdict(list), 0
        else:
            self._episodes.append(episode)
            self._policy_of.append({})
            self._trajectories.append({})
            self._policy_rewards.append(defaultdict(list))
            self._t.append(0)
        if self.callbacks is not None:
            self.callbacks.on_episode_start(worker=self.worker, episode=episode, env_index=i)

    def _policy_id(self, i: int, agent: Any) -> str:
        mapping = self._policy_of[i]
        if agent not in mapping:
            pid = self.policy_mapping_fn(agent)
            if pid not in self.policy_map:
                raise ValueError(f"policy_mapping_fn({agent!r}) returned {pid!r}, which is "
                                 f"not a policy; policies: {sorted(self.policy_map)}")
            mapping[agent] = pid
        return mapping[agent]

    def _trajectory(self, i: int, agent: Any) -> _Trajectory:
        trajectories = self._trajectories[i]
        if agent not in trajectories:
            pid = self._policy_id(i, agent)
            trajectories[agent] = _Trajectory(pid, self._agent_index.get(agent, 0),
                                              self.policy_map[pid])
        return trajectories[agent]

    # ------------------------------------------------------------------ sampling
    def sample(self) -> MultiAgentBatch:
        """``fragment_length`` steps of every env (``truncate_episodes``), or whole
        episodes once at least that many steps ran (``complete_episodes``)."""
        pieces: list[tuple[str, SampleBatch]] = []
        steps, target = 0, self.fragment_length * len(self.envs)
        while steps < target or (self.batch_mode == "complete_episodes" and not pieces):
            pieces.extend(self._step_all())
            steps += len(self.envs)
        if self.batch_mode == "truncate_episodes":
            for i in range(len(self.envs)):
                for agent, trajectory in list(self._trajectories[i].items()):
                    if len(trajectory):
                        pieces.append(self._close(trajectory))
        per_policy: dict[str, list[SampleBatch]] = defaultdict(list)
        for pid, piece in pieces:
            per_policy[pid].append(piece)
        return MultiAgentBatch({pid: SampleBatch.concat_samples(b)
                                for pid, b in per_policy.items()}, env_steps=steps)

    def _step_all(self) -> list[tuple[str, SampleBatch]]:
        # One batched forward pass per policy over all its acting agents.
        requests: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for i, obs in enumerate(self._obs):
            for agent in obs:
                requests[self._policy_id(i, agent)].append((i, agent))
        actions: list[dict] = [{} for _ in self.envs]
        for pid, who in requests.items():
            policy = self.policy_map[pid]
            batch_obs = policy.obs_packer.pack([self._obs[i][a] for i, a in who])
            trajectories = [self._trajectory(i, agent) for i, agent in who]
            if policy.recurrent:
                acts, extras = policy.compute_actions(
                    batch_obs, explore=self.explore,
                    state=[np.stack(parts) for parts in zip(*(tr.state for tr in trajectories))],
                    prev_actions=np.stack([tr.prev_action for tr in trajectories]),
                    prev_rewards=np.array([tr.prev_reward for tr in trajectories], np.float32))
                state_out = [extras[state_out_key(p)] for p in range(len(trajectories[0].state))]
                for k, trajectory in enumerate(trajectories):
                    trajectory.state = [part[k].copy() for part in state_out]
                    trajectory.prev_action = np.array(acts[k])
            else:
                acts, extras = policy.compute_actions(batch_obs, explore=self.explore)
            for k, ((i, agent), trajectory) in enumerate(zip(who, trajectories)):
                actions[i][agent] = acts[k]
                trajectory.pending = {SampleBatch.OBS: batch_obs[k],
                                      SampleBatch.ACTIONS: acts[k],
                                      **{name: v[k] for name, v in extras.items()}}
        finished: list[tuple[str, SampleBatch]] = []
        for i, env in enumerate(self.envs):
            finished.extend(self._step_env(i, env, actions[i]))
        return finished

    def _step_env(self, i: int, env: Any, actions: dict) -> list[tuple[str, SampleBatch]]:
        # As the env takes them: Python ints for Discrete, nested for Dict / Tuple.
        env_actions = {a: self.policy_map[self._policy_id(i, a)].action_layout.to_env(
                           act, clip=False)
                       for a, act in actions.items()}
        obs, rewards, terms, truncs, infos = env.step(env_actions)
        episode = self._episodes[i]
        t = self._t[i]
        closed = []
        # Rows still open from earlier steps: their agents' rewards of this step, and
        # their end once the agent observes again or leaves.
        for agent, trajectory in list(self._trajectories[i].items()):
            if trajectory.open_row is None or agent in actions:
                continue
            reward = float(rewards.get(agent, 0.0))
            trajectory.open_row[SampleBatch.REWARDS] += reward
            trajectory.episode_return += reward
            ended = bool(terms.get(agent) or truncs.get(agent))
            if agent in obs or ended:
                self._finish_row(i, agent, trajectory, trajectory.open_row, obs, terms, truncs,
                                 closed)
        for agent in actions:
            trajectory = self._trajectory(i, agent)
            row = trajectory.pending
            trajectory.pending = None
            reward = float(rewards.get(agent, 0.0))
            row.update({SampleBatch.REWARDS: reward,
                        SampleBatch.EPS_ID: episode.episode_id, SampleBatch.T: t})
            trajectory.episode_return += reward
            if agent in obs or terms.get(agent) or truncs.get(agent):
                self._finish_row(i, agent, trajectory, row, obs, terms, truncs, closed)
            else:  # not its turn next: the row waits for its next observation
                trajectory.open_row = row
        episode.add_step(obs, actions, float(sum(rewards.values())), infos)
        if self.callbacks is not None:
            self.callbacks.on_episode_step(worker=self.worker, episode=episode, env_index=i)
        self._t[i] = t + 1
        if terms.get(ALL) or truncs.get(ALL):
            for agent, trajectory in list(self._trajectories[i].items()):
                if trajectory.open_row is not None:  # ends with the episode
                    final = self._packed_row(trajectory.policy_id, obs[agent]) \
                        if agent in obs else trajectory.open_row[SampleBatch.OBS]
                    self._append_row(trajectory, trajectory.open_row, final,
                                     bool(terms.get(agent)), bool(truncs.get(agent)))
                self._policy_rewards[i][trajectory.policy_id].append(
                    trajectory.episode_return)
                if len(trajectory):  # agents still in when the whole episode ended
                    trajectory.rows[SampleBatch.TRUNCATEDS][-1] = \
                        trajectory.rows[SampleBatch.TRUNCATEDS][-1] or not terms.get(ALL)
                    trajectory.rows[SampleBatch.TERMINATEDS][-1] = \
                        trajectory.rows[SampleBatch.TERMINATEDS][-1] or bool(terms.get(ALL))
                    closed.append(self._close(trajectory))
            if self.callbacks is not None:
                self.callbacks.on_episode_end(worker=self.worker, episode=episode,
                                              env_index=i)
            stats = EpisodeStats(episode.total_reward, episode.length,
                                 dict(episode.custom_metrics),
                                 {pid: float(np.mean(returns))
                                  for pid, returns in self._policy_rewards[i].items()})
            self._finished_stats.append(stats)
            new_obs, info = env.reset()
            self._obs[i] = new_obs
            self._start_episode(i, new_obs, info)
            if self.batch_mode == "complete_episodes":
                closed, self._held[i] = self._held[i] + closed, []
            return closed
        # Agents that just left report a final observation but act no more.
        self._obs[i] = {a: o for a, o in obs.items()
                        if not (terms.get(a) or truncs.get(a))}
        if self.batch_mode == "complete_episodes":
            self._held[i].extend(closed)
            return []
        return closed

    def _finish_row(self, i: int, agent: Any, trajectory: _Trajectory, row: dict, obs: dict,
                    terms: dict, truncs: dict, closed: list) -> None:
        """Completes ``row`` with the agent's next observation (its own last one if the
        env gave none) and end flags, and closes the trajectory if the agent left."""
        new_obs = self._packed_row(trajectory.policy_id, obs[agent]) if agent in obs \
            else row[SampleBatch.OBS]
        terminated, truncated = bool(terms.get(agent, False)), bool(truncs.get(agent, False))
        self._append_row(trajectory, row, new_obs, terminated, truncated)
        if terminated or truncated:
            self._policy_rewards[i][trajectory.policy_id].append(trajectory.episode_return)
            closed.append(self._close(trajectory))
            del self._trajectories[i][agent]

    @staticmethod
    def _append_row(trajectory: _Trajectory, row: dict, new_obs: Any, terminated: bool,
                    truncated: bool) -> None:
        row.update({SampleBatch.NEW_OBS: new_obs, SampleBatch.TERMINATEDS: terminated,
                    SampleBatch.TRUNCATEDS: truncated})
        for key, value in row.items():
            trajectory.rows[key].append(value)
        trajectory.open_row = None
        trajectory.prev_reward = float(row[SampleBatch.REWARDS])

    def _packed_row(self, policy_id: str, observation: Any) -> Any:
        """One observation as its batch row (a record for Dict / Tuple spaces)."""
        packer = self.policy_map[policy_id].obs_packer
        return packer.pack_one(observation)[0] if packer.nested else observation

    def _close(self, trajectory: _Trajectory) -> tuple[str, SampleBatch]:
        """Postprocesses the trajectory's rows with its policy and empties it."""
        rows = trajectory.rows
        n = len(trajectory)
        packer = self.policy_map[trajectory.policy_id].obs_packer
        columns = {key: np.array(values, dtype=packer.dtype)
                   if packer.nested and key in (SampleBatch.OBS, SampleBatch.NEW_OBS)
                   else np.asarray(values) for key, values in rows.items()}
        columns[SampleBatch.AGENT_INDEX] = np.full(n, trajectory.agent_index, np.int64)
        columns[SampleBatch.UNROLL_ID] = np.zeros(n, np.int64)
        piece = self.policy_map[trajectory.policy_id].postprocess_trajectory(
            SampleBatch(columns))
        trajectory.rows = defaultdict(list)
        return trajectory.policy_id, piece

    def pop_episode_metrics(self) -> list[EpisodeStats]:
        out, self._finished_stats = self._finished_stats, []
        return out


# ---------------------------------------------------------------- the multiagent config
POLICY_SPEC_KEYS = ("policy_class", "observation_space", "action_space", "config")


def policy_specs(multiagent: dict) -> dict[str, dict]:
    """``multiagent["policies"]`` normalized to ``{policy_id: {policy_class, observation_space,
    action_space, config}}`` (None = the algorithm's policy / the env's spaces).

    Accepted forms per policy: ``None``, a dict with those keys, or a 4-tuple
    ``(policy_class, observation_space, action_space, config)``; a list of ids means
    ``None`` for each.
    """
    policies = multiagent.get("policies") or {}
    if isinstance(policies, (list, tuple, set)):
        policies = {pid: None for pid in policies}
    if not isinstance(policies, dict):
        raise ValueError(f"multiagent.policies must be a dict or a list of policy ids, got "
                         f"{policies!r}")
    specs = {}
    for pid, spec in policies.items():
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"multiagent.policies: policy ids are non-empty strings, got "
                             f"{pid!r}")
        if spec is None:
            spec = {}
        elif isinstance(spec, (list, tuple)):
            if len(spec) != 4:
                raise ValueError(f"multiagent.policies[{pid!r}]: a tuple spec is (policy_class, "
                                 f"observation_space, action_space, config), got {spec!r}")
            spec = dict(zip(POLICY_SPEC_KEYS, spec))
        elif not isinstance(spec, dict):
            raise ValueError(f"multiagent.policies[{pid!r}] must be None, a dict or a 4-tuple, "
                             f"got {spec!r}")
        unknown = set(spec) - set(POLICY_SPEC_KEYS)
        if unknown:
            raise ValueError(f"multiagent.policies[{pid!r}]: unknown keys {sorted(unknown)}; "
                             f"valid: {', '.join(POLICY_SPEC_KEYS)}")
        specs[pid] = {key: spec.get(key) for key in POLICY_SPEC_KEYS}
        specs[pid]["config"] = dict(specs[pid]["config"] or {})
    return specs


def mapping_function(multiagent: dict, policy_ids: list[str]) -> Callable[[Any], str]:
    """``multiagent["policy_mapping_fn"]`` as a function: a callable, an import string
    ``"file.py:fn"``, a dict ``{agent_id: policy_id}``, or None (only with one policy,
    or when every agent id is itself a policy id)."""
    spec = multiagent.get("policy_mapping_fn")
    if spec is None:
        if len(policy_ids) == 1:
            only = policy_ids[0]
            return lambda agent_id: only
        return _AgentIsPolicy(policy_ids)
    if isinstance(spec, dict):
        return _MappingTable(spec)
    if isinstance(spec, str):
        from flowrl.imports import load_object
        spec = load_object(spec)
    if not callable(spec):
        raise ValueError(f"multiagent.policy_mapping_fn must be a function, an import string or "
                         f"a dict, got {spec!r}")
    return spec


class _AgentIsPolicy:
    def __init__(self, policy_ids: list[str]):
        self.policy_ids = set(policy_ids)

    def __call__(self, agent_id: Any) -> str:
        if agent_id not in self.policy_ids:
            raise ValueError(f"agent {agent_id!r} has no policy: set multiagent.policy_mapping_fn "
                             f"(policies: {sorted(self.policy_ids)})")
        return agent_id


class _MappingTable:
    def __init__(self, table: dict):
        self.table = dict(table)

    def __call__(self, agent_id: Any) -> str:
        if agent_id not in self.table:
            raise ValueError(f"multiagent.policy_mapping_fn has no entry for agent {agent_id!r}; "
                             f"it maps {sorted(map(str, self.table))}")
        return self.table[agent_id]


def validate_multiagent(config: dict) -> None:
    """Checks the ``multiagent`` config before any worker starts."""
    multiagent = config.get("multiagent") or {}
    if not multiagent.get("policies"):
        if multiagent.get("policies_to_train"):
            raise ValueError("multiagent.policies_to_train is set but multiagent.policies is "
                             "empty")
        return
    specs = policy_specs(multiagent)
    mapping_function(multiagent, list(specs))  # import strings resolve here
    to_train = multiagent.get("policies_to_train")
    if to_train is not None:
        if not isinstance(to_train, (list, tuple, set)):
            raise ValueError(f"multiagent.policies_to_train must be a list of policy ids, got "
                             f"{to_train!r}")
        unknown = [p for p in to_train if p not in specs]
        if unknown:
            raise ValueError(f"multiagent.policies_to_train names unknown policies {unknown}; "
                             f"policies: {sorted(specs)}")


def build_policy_map(env: Any, default_policy_cls: type, config: dict,
                     policy_config_extra: dict) -> tuple[dict, Callable, set | None]:
    """``(policy_map, policy_mapping_fn, policies_to_train)`` for a worker."""
    multiagent = config["multiagent"]
    specs = policy_specs(multiagent)
    mapping = mapping_function(multiagent, list(specs))
    agents_of: dict[str, Any] = {}
    for agent in getattr(env, "possible_agents", []):
        pid = mapping(agent)
        if pid not in specs:
            raise ValueError(f"policy_mapping_fn({agent!r}) returned {pid!r}, which is not a "
                             f"policy; policies: {sorted(specs)}")
        agents_of.setdefault(pid, agent)
    policy_map = {}
    for pid, spec in specs.items():
        agent = agents_of.get(pid)
        obs_space = spec["observation_space"]
        act_space = spec["action_space"]
        if obs_space is None or act_space is None:
            if agent is None:
                raise ValueError(f"policy {pid!r}: no agent of the env maps to it, so give its "
                                 "observation_space and action_space in multiagent.policies")
            obs_space = obs_space or env.observation_spaces[agent]
            act_space = act_space or env.action_spaces[agent]
        policy_cls = spec["policy_class"] or default_policy_cls
        if isinstance(policy_cls, str):
            from flowrl.imports import load_object
            policy_cls = load_object(policy_cls)
        policy_config = {**config, **spec["config"], **policy_config_extra}
        policy_map[pid] = policy_cls(obs_space, act_space, policy_config)
    to_train = multiagent.get("policies_to_train")
    return policy_map, mapping, None if to_train is None else set(to_train)
