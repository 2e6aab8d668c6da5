"""Vectorised sampling: N envs stepped together with one batched policy call per step.

Rollouts are written time-major into preallocated ``[T, N]`` arrays, then cut into
per-episode pieces that the policy postprocesses (GAE, n-step, ...).

Episode callbacks (:mod:`flowrl.workers.callbacks`) run per env step only when the callbacks
class overrides an episode hook; otherwise the loop does no per-episode bookkeeping.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from flowrl.workers.callbacks import DefaultCallbacks, Episode, overrides_episode_hooks
from flowrl.envs.episodes import env_reports_episodes  # also imported from here
from flowrl.data.actions import ActionLayout
from flowrl.data.sample_batch import SampleBatch
from flowrl.data.sequences import state_out_key
from flowrl.data.spaces import ObservationPacker
from flowrl.workers.reward_scaling import ReturnScaler

_STEP_COLUMNS = (SampleBatch.REWARDS, SampleBatch.TERMINATEDS, SampleBatch.TRUNCATEDS)


def _joined(pieces: list[SampleBatch]) -> SampleBatch:
    """The pieces as one batch. A single piece is returned as it is: its arrays belong
    to the chunk that produced it alone, so the copy a concatenation makes would only
    cost time (a DQN fragment of 4 steps is often one piece)."""
    return pieces[0] if len(pieces) == 1 else SampleBatch.concat_samples(pieces)


class EpisodeStats(tuple):
    """``(episode_return, length)`` of one finished episode, with its ``custom_metrics``.

    Still a 2-tuple (``ret, length = stats`` and ``stats == (ret, length)`` hold), so
    code written for plain ``(return, length)`` pairs keeps working; the episode's
    :attr:`custom_metrics` (``{name: float}`` from the callbacks, often empty) ride
    along as an attribute and survive pickling to the driver.
    """

    def __new__(cls, episode_return: float, length: int,
                custom_metrics: dict[str, float] | None = None,
                policy_rewards: dict[str, float] | None = None) -> "EpisodeStats":
        self = super().__new__(cls, (episode_return, length))
        self.custom_metrics = custom_metrics or {}
        # Multi-agent episodes: the summed reward of each policy's agents.
        self.policy_rewards = policy_rewards or {}
        return self

    @property
    def episode_return(self) -> float:
        return self[0]

    @property
    def length(self) -> int:
        return self[1]

    def __reduce__(self) -> tuple:
        return EpisodeStats, (self[0], self[1], self.custom_metrics, self.policy_rewards)

    def __repr__(self) -> str:
        extra = f", custom_metrics={self.custom_metrics!r}" if self.custom_metrics else ""
        return f"EpisodeStats({self[0]!r}, {self[1]!r}{extra})"


class EpisodeTracker:
    """Running return/length per env; finished episodes are kept until collected.

    With ``env_reports_episodes`` the env's own ``info["episode"]`` stats are used
    instead of the sampler's sums (see :func:`env_reports_episodes`). Custom metrics
    stored in ``custom_metrics[env_index]`` (by the episode callbacks) are attached to
    that env's next finished episode.
    """

    def __init__(self, num_envs: int, env_reports_episodes: bool = False):
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[EpisodeStats] = []
        self.env_reports_episodes = env_reports_episodes
        self.custom_metrics: list[dict | None] = [None] * num_envs

    def _pop_custom(self, env_index: int | None) -> dict | None:
        if env_index is None:
            return None
        custom, self.custom_metrics[env_index] = self.custom_metrics[env_index], None
        return custom

    def record_env_episode(self, stats: dict, env_index: int | None = None) -> None:
        self.finished.append(EpisodeStats(float(np.asarray(stats["r"]).item()),
                                          int(np.asarray(stats["l"]).item()),
                                          self._pop_custom(env_index)))

    def end(self, env_index: int) -> None:
        if not self.env_reports_episodes:
            self.finished.append(EpisodeStats(float(self.returns[env_index]),
                                              int(self.lengths[env_index]),
                                              self._pop_custom(env_index)))
        self.returns[env_index] = 0.0
        self.lengths[env_index] = 0

    def pop_finished(self) -> list[EpisodeStats]:
        out, self.finished = self.finished, []
        return out


class VectorSampler:
    """Steps ``envs`` in lock-step and returns postprocessed SampleBatches.

        sampler = VectorSampler(envs, policy, fragment_length=200,
                                batch_mode="truncate_episodes", seeds=[0, 1])
        batch = sampler.sample()   # count == 200 * len(envs) in truncate mode

    ``truncate_episodes``: each call returns exactly ``fragment_length`` steps per env;
    episodes cut at the end are bootstrapped by the policy.
    ``complete_episodes``: each call returns only whole episodes, at least
    ``fragment_length * len(envs)`` steps; unfinished episodes carry over to the next call.

    ``reward_scaler``: a :class:`~flowrl.workers.reward_scaling.ReturnScaler` that divides
    the batch's rewards by the running std of the discounted return
    (``normalize_rewards``); episode metrics keep the env's own rewards.

    ``callbacks``: a :class:`~flowrl.workers.callbacks.DefaultCallbacks` instance whose episode
    hooks receive ``worker``; they run only if the class overrides one of them.
    An :class:`~flowrl.workers.callbacks.Episode` spans what the results count as an episode
    (a whole Atari game across lost lives, see :func:`env_reports_episodes`).

    Row ``i`` of every policy call is env ``i``. When env ``i`` auto-resets, its recurrent
    state (if any) goes back to the initial state and the sampler calls
    ``policy.on_episode_start([i, ...])``, where a policy restarts per-row state of its
    own (DDPG's OU noise).
    """

    def __init__(self, envs: Sequence[gym.Env], policy: Any, fragment_length: int,
                 batch_mode: str = "truncate_episodes", seeds: Sequence[int | None] = (),
                 clip_actions: bool = True, explore: bool = True, episode_id_base: int = 0,
                 callbacks: DefaultCallbacks | None = None, worker: Any = None,
                 reward_scaler: ReturnScaler | None = None):
        if batch_mode not in ("truncate_episodes", "complete_episodes"):
            raise ValueError(f"batch_mode={batch_mode!r}; expected 'truncate_episodes' or "
                             "'complete_episodes'")
        self.envs = list(envs)
        self.policy = policy
        self.fragment_length = int(fragment_length)
        self.batch_mode = batch_mode
        self.explore = explore
        self.num_envs = len(self.envs)
        self.reward_scaler = reward_scaler
        space = self.envs[0].action_space
        self._clip_low = self._clip_high = None
        if clip_actions and isinstance(space, gym.spaces.Box):
            self._clip_low, self._clip_high = space.low, space.high
        # MultiDiscrete, MultiBinary, Tuple and Dict actions go through their layout.
        self._action_layout = None if isinstance(space, (gym.spaces.Box, gym.spaces.Discrete)) \
            else ActionLayout(space)
        self._clip_actions = clip_actions
        # Dict / Tuple observations are stacked into record arrays.
        self._packer = ObservationPacker(self.envs[0].observation_space)
        self._nested_obs = self._packer.nested
        self.tracker = EpisodeTracker(self.num_envs, env_reports_episodes(self.envs[0]))
        self._next_eps_id = episode_id_base
        self._unroll_id = 0
        seeds = list(seeds) or [None] * self.num_envs
        first, first_infos = [], []
        for env, seed in zip(self.envs, seeds):
            if seed is not None:
                env.action_space.seed(seed)
            obs, info = env.reset(seed=seed)
            first.append(obs)
            first_infos.append(info)
        self._obs = self._packer.pack(first)
        self._eps_ids = np.array([self._new_eps_id() for _ in range(self.num_envs)])
        # Recurrent policies: each env's state and previous action / reward, carried
        # from step to step (and across fragments), reset when its episode ends.
        self._recurrent = bool(policy.recurrent)
        if self._recurrent:
            self._initial_state = policy.get_initial_state()
            self._state = [np.repeat(part[None], self.num_envs, axis=0)
                           for part in self._initial_state]
            self._prev_actions: np.ndarray | None = None
            self._prev_rewards = np.zeros(self.num_envs, np.float32)
        self._t = np.zeros(self.num_envs, dtype=np.int64)
        # complete_episodes: per env, the unfinished piece of the current episode
        self._pending: list[SampleBatch | None] = [None] * self.num_envs
        # Episode hooks: decided once, so the default loop skips all per-step calls.
        self.callbacks = callbacks
        self.worker = worker
        self._episode_hooks = callbacks is not None and overrides_episode_hooks(callbacks)
        # Per env: the callbacks' Episode (None: not started yet / just ended).
        self._episodes: list[Episode | None] = [None] * self.num_envs
        self._first_infos: list[dict] | None = first_infos if self._episode_hooks else None

    def _new_eps_id(self) -> int:
        self._next_eps_id += 1
        return self._next_eps_id

    def sample(self) -> SampleBatch:
        if self.batch_mode == "truncate_episodes":
            return _joined(self._run_chunk(final=True))
        done_steps, episodes = 0, []
        target = self.fragment_length * self.num_envs
        while done_steps < target:
            finished = self._run_chunk(final=False)
            episodes.extend(finished)
            done_steps += sum(b.count for b in finished)
        return _joined(episodes)

    def _run_chunk(self, final: bool) -> list[SampleBatch]:
        """Steps all envs fragment_length times; returns postprocessed pieces.

        final=True: every piece is returned (cut pieces are bootstrapped).
        final=False: only finished episodes; unfinished ones are kept pending.
        """
        T, N = self.fragment_length, self.num_envs
        obs_buf = np.empty((T,) + self._obs.shape, dtype=self._obs.dtype)
        new_obs_buf = np.empty_like(obs_buf)
        rewards = np.zeros((T, N), dtype=np.float32)
        terms = np.zeros((T, N), dtype=bool)
        truncs = np.zeros((T, N), dtype=bool)
        eps_ids = np.empty((T, N), dtype=np.int64)
        ts = np.empty((T, N), dtype=np.int64)
        actions_buf = extras_buf = None
        envs, tracker = self.envs, self.tracker
        reports_episodes = tracker.env_reports_episodes
        hooks = self._episode_hooks
        if hooks and self._first_infos is not None:
            # Started here rather than in __init__, so that the callbacks see a worker
            # that is fully constructed.
            for i, info in enumerate(self._first_infos):
                self._start_episode(i, self._obs[i], info)
            self._first_infos = None
        for t in range(T):
            obs = self._obs
            if self._recurrent:
                actions, extras = self.policy.compute_actions(
                    obs, explore=self.explore, state=self._state,
                    prev_actions=self._prev_actions, prev_rewards=self._prev_rewards)
                self._state = [extras[state_out_key(i)].copy()
                               for i in range(len(self._state))]
                self._prev_actions = actions.copy()
            else:
                actions, extras = self.policy.compute_actions(obs, explore=self.explore)
            if actions_buf is None:
                actions_buf = np.empty((T,) + actions.shape, dtype=actions.dtype)
                extras_buf = {k: np.empty((T,) + v.shape, dtype=v.dtype)
                              for k, v in extras.items()}
            actions_buf[t] = actions
            for k, v in extras.items():
                extras_buf[k][t] = v
            obs_buf[t] = obs
            eps_ids[t] = self._eps_ids
            ts[t] = self._t
            if self._action_layout is not None:
                env_actions = self._action_layout.to_env_batch(actions, self._clip_actions)
            elif self._clip_low is not None:
                env_actions = np.clip(actions, self._clip_low, self._clip_high)
            elif actions.dtype.kind in "iu":
                # Python ints: gymnasium's Discrete.contains checks numpy ints slowly.
                env_actions = actions.tolist()
            else:
                env_actions = actions
            step_rewards, step_terms, step_truncs, ended = [], [], [], []
            new_obs_row = new_obs_buf[t]
            nested_new_obs = [] if self._nested_obs else None
            for i, env in enumerate(envs):
                o, r, term, trunc, info = env.step(env_actions[i])
                if nested_new_obs is None:
                    new_obs_row[i] = o
                else:
                    nested_new_obs.append(o)
                step_rewards.append(r)
                step_terms.append(term)
                step_truncs.append(trunc)
                if hooks:  # before the stats are recorded: on_episode_end sets metrics
                    self._episode_step(i, o, actions[i], r, term, trunc, info)
                if term or trunc:
                    ended.append(i)
                    if reports_episodes and "episode" in info:
                        tracker.record_env_episode(info["episode"], i)
            if nested_new_obs is not None:
                new_obs_row[:] = self._packer.pack(nested_new_obs)
            rewards[t] = step_rewards
            terms[t] = step_terms
            truncs[t] = step_truncs
            tracker.returns += rewards[t]
            tracker.lengths += 1
            self._t += 1
            next_obs = new_obs_row.copy()
            if self._recurrent:
                self._prev_rewards = rewards[t].copy()
                for i in ended:  # a new episode starts from the initial state
                    for part, initial in zip(self._state, self._initial_state):
                        part[i] = initial
                    self._prev_actions[i] = 0
                    self._prev_rewards[i] = 0.0
            for i in ended:  # auto-reset; the final obs stays in new_obs
                tracker.end(i)
                reset_obs, reset_info = envs[i].reset()
                next_obs[i] = self._packer.pack_one(reset_obs)[0] if self._nested_obs \
                    else reset_obs
                self._eps_ids[i] = self._new_eps_id()
                self._t[i] = 0
                if hooks:
                    self._episode_reset(i, reset_obs, reset_info)
            if ended:  # per-row exploration state (DDPG's OU noise) restarts too
                self.policy.on_episode_start(ended)
            self._obs = next_obs
        self._unroll_id += 1
        if self.reward_scaler is not None:  # metrics above counted the env's own rewards
            rewards = self.reward_scaler.scale(rewards, terms | truncs)
        columns = {
            SampleBatch.OBS: obs_buf, SampleBatch.NEW_OBS: new_obs_buf,
            SampleBatch.ACTIONS: actions_buf, SampleBatch.REWARDS: rewards,
            SampleBatch.TERMINATEDS: terms, SampleBatch.TRUNCATEDS: truncs,
            SampleBatch.EPS_ID: eps_ids, SampleBatch.T: ts,
            **extras_buf,
        }
        return self._cut_into_episodes(columns, final)

    # -- episode callbacks (only when the callbacks class overrides an episode hook) --
    def _start_episode(self, env_index: int, obs: Any, info: dict) -> None:
        episode = Episode(int(self._eps_ids[env_index]), env_index, obs, info)
        self._episodes[env_index] = episode
        self.callbacks.on_episode_start(worker=self.worker, episode=episode,
                                        env_index=env_index)

    def _episode_step(self, env_index: int, obs: Any, action: Any, reward: float,
                      terminated: bool, truncated: bool, info: dict) -> None:
        episode = self._episodes[env_index]
        episode.add_step(obs, action, reward, info)
        self.callbacks.on_episode_step(worker=self.worker, episode=episode,
                                       env_index=env_index)
        if not (terminated or truncated):
            return
        reports = self.tracker.env_reports_episodes
        # With info["episode"] reporting, a termination without it is a lost life:
        # the game (and the Episode) goes on after the reset.
        if reports and not truncated and "episode" not in info:
            return
        self.callbacks.on_episode_end(worker=self.worker, episode=episode,
                                      env_index=env_index)
        if not reports or "episode" in info:  # the tracker records this episode
            self.tracker.custom_metrics[env_index] = episode.custom_metrics
        self._episodes[env_index] = None

    def _episode_reset(self, env_index: int, obs: Any, info: dict) -> None:
        episode = self._episodes[env_index]
        if episode is None:
            self._start_episode(env_index, obs, info)
        else:  # a lost life: same game, new first observation
            episode.last_observation = obs

    def _cut_into_episodes(self, columns: dict, final: bool) -> list[SampleBatch]:
        T = self.fragment_length
        ended = columns[SampleBatch.TERMINATEDS] | columns[SampleBatch.TRUNCATEDS]
        pieces = []
        for i in range(self.num_envs):
            env_columns = {k: v[:, i] for k, v in columns.items()}
            env_columns[SampleBatch.UNROLL_ID] = np.full(T, self._unroll_id, dtype=np.int64)
            env_columns[SampleBatch.AGENT_INDEX] = np.zeros(T, dtype=np.int64)
            start = 0
            for end in list(np.flatnonzero(ended[:, i]) + 1) + [T]:
                if end <= start:
                    continue
                # Slices of equal-length columns: no need for SampleBatch's checks.
                piece = SampleBatch.from_arrays({k: v[start:end]
                                                 for k, v in env_columns.items()})
                episode_done = bool(ended[end - 1, i])
                if not final:
                    if self._pending[i] is not None:
                        piece = SampleBatch.concat_samples([self._pending[i], piece])
                        self._pending[i] = None
                    if not episode_done:
                        self._pending[i] = piece
                        break
                pieces.append(self.policy.postprocess_trajectory(piece))
                start = end
        return pieces

    def pop_episode_metrics(self) -> list[EpisodeStats]:
        """(return, length) of episodes finished since the last call, as EpisodeStats
        (2-tuples that also carry the episodes' ``custom_metrics``)."""
        return self.tracker.pop_finished()
