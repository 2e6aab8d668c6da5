"""ExternalEnv: an environment that runs its own loop and asks flowrl for actions.

    class MySim(ExternalEnv):
        def __init__(self, ctx):
            super().__init__(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2))

        def run(self):                      # started in a thread by the sampler
            while True:
                eid = self.start_episode()
                obs = sim.reset()
                while not sim.over():
                    action = self.get_action(eid, obs)
                    obs, reward = sim.step(action)
                    self.log_returns(eid, reward)
                self.end_episode(eid, obs)

    register_env("my_sim", lambda ctx: MySim(ctx))   # then train any algorithm on it

The RolloutWorker recognizes an ExternalEnv and samples it with
:class:`~flowrl.workers.external_sampler.ExternalEnvSampler`. All methods are
thread-safe and many episodes may run at once (one thread per simulator, or the HTTP
threads of a :class:`~flowrl.envs.serving.PolicyServer`, which drives the env from
outside; then ``run()`` may stay the default no-op).

Trajectories: the observation passed to ``get_action``/``log_action`` completes the
previous step (it is that step's ``new_obs``); rewards logged with ``log_returns``
add up into the latest step; ``end_episode(eid, obs)`` completes the last step as
terminated, or as truncated with ``truncated=True`` (the sampler then bootstraps from
the value of ``obs``, as for time limits in VectorSampler).

Actions are computed by whoever serves the env's requests: the sampler (inside
``sample()``, so all policy use stays on the worker's thread) or an inference loop
(:class:`~flowrl.envs.serving.policy_service.PolicyServiceLoop`). A ``get_action``
call blocks until then.

Recurrent policies: whoever serves the requests keeps the policy's state per episode
(:class:`~flowrl.envs.serving.policy_service.PolicyService`): each ``get_action``
continues from its episode's state, a new episode starts from the initial state, and
an episode's state is dropped when it ends. Logged actions advance it too (the
service runs the policy on their observations), so the env hands the service the
completed steps of every episode, trained on or not (:meth:`ExternalEnv.take_work`).

Spaces: any the wire format carries (:mod:`~flowrl.envs.serving.wire`): Box,
Discrete, MultiDiscrete, MultiBinary and Dict / Tuple spaces of them. A Dict
observation is passed as a ``dict`` (a Tuple one as a ``tuple``) and ``get_action``
returns actions as the simulator takes them: an ``int`` for Discrete, nested
``dict`` / ``tuple`` values for Dict / Tuple action spaces.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from flowrl.envs.serving.errors import (BadRequestError, EpisodeStateError, ServingError,
                                        UnavailableError, UnknownEpisodeError)
from flowrl.envs.serving.wire import check_space_supported, check_value

logger = logging.getLogger(__name__)

_EPISODE_ID = re.compile(r"[A-Za-z0-9_.:@+=-]{1,128}")


@dataclass
class Step:
    """One completed step of an episode, as the sampler turns it into a batch row.

    ``extras`` holds the policy's extra columns (``action_logp``, ``vf_preds``, ...)
    when the policy chose the action, None for actions logged by the simulator (the
    sampler computes them). ``action`` is the policy's batch row when it chose the
    action, and the action as the simulator took it (checked against the action
    space) when it was logged. ``obs`` / ``new_obs`` are checked values of the
    observation space (``dict`` / ``tuple`` for nested spaces). ``episode_end``
    marks the episode's last step.

    A recurrent policy's service scores logged steps as it advances their episode's
    state: it sets ``extras`` (with ``state_in_*`` / ``state_out_*``) and turns
    ``action`` into the policy's batch row, so that the step then reads like one the
    policy acted. ``training_enabled`` is False for steps of episodes that are not
    trained on (only a recurrent policy's service receives those, for the state).
    """

    eps_id: int
    t: int
    obs: Any
    action: Any
    extras: dict | None
    reward: float
    new_obs: Any
    terminated: bool
    truncated: bool
    episode_end: bool
    training_enabled: bool = True


@dataclass
class ExperiencePiece:
    """Consecutive steps of one episode acted elsewhere (a client in local mode).

    ``rewards[i]`` is the reward logged after ``actions[i]``. ``end_obs`` not None ends
    the episode after these steps (``truncated`` as in :meth:`ExternalEnv.end_episode`).
    """

    episode_id: str
    observations: Sequence[Any]
    actions: Sequence[Any]
    rewards: Sequence[float]
    training_enabled: bool = True
    end_obs: Any = None
    truncated: bool = False


class ActionRequest:
    """A pending ``get_action``: filled in by :meth:`ExternalEnv.deliver_actions`."""

    __slots__ = ("episode", "obs", "done", "env_action", "error")

    def __init__(self, episode: "_Episode", obs: Any):
        self.episode = episode
        self.obs = obs
        self.done = threading.Event()
        self.env_action: Any = None
        self.error: Exception | None = None


@dataclass
class PolicySpec:
    """What a client needs to rebuild the serving policy: the policy class, named
    ``"module:QualName"``, and the JSON config."""

    policy_class: str
    config: dict


class _OpenStep:
    """The latest action of an episode, waiting for its next observation."""

    __slots__ = ("obs", "action", "extras", "reward")

    def __init__(self, obs: Any, action: Any, extras: dict | None):
        self.obs, self.action, self.extras, self.reward = obs, action, extras, 0.0


class _Episode:
    __slots__ = ("episode_id", "eps_id", "training_enabled", "t", "open", "pending",
                 "total_reward", "last_info")

    def __init__(self, episode_id: str, eps_id: int, training_enabled: bool):
        self.episode_id = episode_id
        self.eps_id = eps_id
        self.training_enabled = training_enabled
        self.t = 0                      # steps taken so far
        self.open: _OpenStep | None = None
        self.pending: ActionRequest | None = None
        self.total_reward = 0.0
        self.last_info: dict | None = None


class ExternalEnv(gym.Env):
    """An env whose own loop calls ``start_episode`` / ``get_action`` / ``log_action`` /
    ``log_returns`` / ``end_episode``. See the module docstring.

    Args:
        observation_space, action_space: the spaces of the policy that serves it.
        max_concurrent_episodes: more running episodes are refused (EpisodeStateError),
            so that abandoned episodes cannot grow memory without bound.
        max_finished_ids: how many finished episode ids are remembered, to tell
            "finished" (409) from "unknown" (404) and to map ids to ``eps_id``.
        max_buffered_steps: completed steps waiting for the sampler; beyond this,
            calls are refused (UnavailableError) until it catches up, so an env that
            nobody samples cannot fill the memory.
    """

    def __init__(self, observation_space: gym.Space, action_space: gym.Space,
                 max_concurrent_episodes: int = 1000, max_finished_ids: int = 100_000,
                 max_buffered_steps: int = 1_000_000):
        check_space_supported(observation_space, "observation space")
        check_space_supported(action_space, "action space")
        self.observation_space = observation_space
        self.action_space = action_space
        self.max_concurrent_episodes = int(max_concurrent_episodes)
        self.max_buffered_steps = int(max_buffered_steps)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # requests, steps or close arrived
        self._episodes: dict[str, _Episode] = {}
        self._finished: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._max_finished_ids = int(max_finished_ids)
        self._action_requests: list[ActionRequest] = []
        # Weights as the serving thread last published them (taken there, never in the
        # middle of a training step); a request flags that a fresh copy is wanted.
        self._weights: tuple[dict, dict] | None = None
        self._weights_wanted = False
        self._weights_ready = threading.Event()
        self._steps: list[Step] = []
        self._episode_stats: collections.deque = collections.deque(maxlen=100_000)
        self._eps_counter = itertools.count(1)
        self._eps_id_base = 0
        # A recurrent policy's service needs every episode's steps to carry its state.
        self._keep_untrained_steps = False
        self._policy_spec: Callable[[], PolicySpec] | None = None
        self._served = threading.Event()
        self._closed = False
        self._close_callbacks: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    # -- the simulator's loop ------------------------------------------------------------
    def run(self) -> None:
        """The env's own loop, run in a daemon thread by :meth:`start`.

        Override it for an in-process simulator. The default does nothing: the env is
        driven from outside (e.g. by a PolicyServer's request threads).
        """

    def start(self) -> None:
        """Runs :meth:`run` in a daemon thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run_guarded, daemon=True,
                                            name=f"{type(self).__name__}.run")
        self._thread.start()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as error:  # reported by the sampler with its traceback
            if not self._closed:
                logger.exception("%s.run() failed", type(self).__name__)
            with self._work:
                self._thread_error = error
                self._work.notify_all()

    # -- episode API ---------------------------------------------------------------------
    def start_episode(self, episode_id: str | None = None, training_enabled: bool = True) -> str:
        """Starts an episode and returns its id (a new uuid hex when None is given).

        ``training_enabled=False``: the episode gets actions but its steps are not
        trained on (its return still counts in the episode metrics).
        Raises EpisodeStateError if the id is running or finished, or too many run.
        """
        if episode_id is not None and (not isinstance(episode_id, str)
                                       or not _EPISODE_ID.fullmatch(episode_id)):
            raise BadRequestError(f"episode_id must be 1-128 characters of [A-Za-z0-9_.:@+=-], "
                                  f"got {episode_id!r:.60}")
        if not isinstance(training_enabled, bool):
            raise BadRequestError("training_enabled must be a boolean")
        with self._lock:
            self._check_open()
            return self._start(episode_id or uuid.uuid4().hex, training_enabled).episode_id

    def get_action(self, episode_id: str, observation: Any) -> Any:
        """Records ``observation`` and returns the policy's action for it.

        Blocks until the sampler (or an inference loop) computes the action, which
        comes as the simulator takes it (see the module docstring). Box actions (and
        Box parts of nested ones) are clipped to the bounds when the config says
        ``clip_actions``.
        """
        obs = self._observation(observation, "observation")
        with self._work:
            self._check_open()
            episode = self._running(episode_id)
            self._complete_open_step(episode, obs)
            request = ActionRequest(episode, obs)
            episode.pending = request
            self._action_requests.append(request)
            self._work.notify_all()
        while not request.done.wait(0.5):
            if self._closed:
                break
        if isinstance(request.error, ServingError):  # a fresh exception per waiting thread
            raise type(request.error)(str(request.error))
        if request.error is not None:
            raise ServingError(f"computing the action failed: {request.error!r}") \
                from request.error
        if not request.done.is_set():
            raise UnavailableError("the env was closed while waiting for an action")
        return request.env_action

    def log_action(self, episode_id: str, observation: Any, action: Any) -> None:
        """Records ``observation`` and the action the simulator took for it (off-policy)."""
        obs = self._observation(observation, "observation")
        action = check_value(self.action_space, action, "action", strict_dtype=False)
        with self._work:
            self._check_open()
            episode = self._running(episode_id)
            self._log_action(episode, obs, action)

    def log_returns(self, episode_id: str, reward: float, info: dict | None = None) -> None:
        """Adds ``reward`` to the episode's latest step (after its first action)."""
        reward = self._reward(reward)
        if info is not None and not isinstance(info, dict):
            raise BadRequestError(f"info must be a dict or None, got {type(info).__name__}")
        with self._lock:
            self._check_open()
            self._log_returns(self._running(episode_id), reward, info)

    def end_episode(self, episode_id: str, observation: Any, truncated: bool = False) -> None:
        """Ends the episode; ``observation`` is the final one (the last step's ``new_obs``).

        ``truncated=True``: the episode was cut (time limit) rather than terminated, so
        the sampler bootstraps from the value of ``observation``.
        """
        obs = self._observation(observation, "observation")
        if not isinstance(truncated, bool):
            raise BadRequestError("truncated must be a boolean")
        with self._work:
            self._check_open()
            self._end(self._running(episode_id), obs, truncated)

    def log_experience(self, pieces: Sequence[ExperiencePiece]) -> int:
        """Feeds steps acted elsewhere (a local-inference client) as if acted here.

        Each piece continues its episode, starting it when the id is new. Values are
        checked first and the state of every episode before anything is applied, so
        a rejected call changes nothing. Returns the number of steps recorded.
        """
        checked = [self._check_piece(p) for p in pieces]
        ids = [p.episode_id for p in pieces]
        if len(set(ids)) != len(ids):
            raise BadRequestError("log_experience: each episode may appear once per call")
        with self._work:
            self._check_open()
            new = [p.episode_id for p in pieces if p.episode_id not in self._episodes]
            for episode_id in new:
                self._check_startable(episode_id)
            if len(self._episodes) + len(new) > self.max_concurrent_episodes:
                raise EpisodeStateError(f"{self.max_concurrent_episodes} episodes are running: "
                                        "end some before starting more")
            for piece in pieces:
                episode = self._episodes.get(piece.episode_id)
                if episode is not None and episode.pending is not None:
                    raise EpisodeStateError(f"episode {piece.episode_id!r} has a get_action "
                                            "in flight")
                if episode is not None and episode.training_enabled != piece.training_enabled:
                    raise EpisodeStateError(f"episode {piece.episode_id!r}: training_enabled "
                                            "differs from its start")
            steps = 0
            for piece, (obs, actions, end_obs) in zip(pieces, checked):
                episode = self._episodes.get(piece.episode_id) or \
                    self._start(piece.episode_id, piece.training_enabled)
                for i in range(len(actions)):
                    self._log_action(episode, obs[i], actions[i])
                    self._log_returns(episode, float(piece.rewards[i]), None)
                steps += len(actions)
                if end_obs is not None:
                    self._end(episode, end_obs, piece.truncated)
            return steps

    # -- inspection ------------------------------------------------------------------------
    def eps_id_of(self, episode_id: str) -> int:
        """The ``eps_id`` column value of a running or recently finished episode."""
        with self._lock:
            if episode_id in self._episodes:
                return self._episodes[episode_id].eps_id
            if episode_id in self._finished:
                return self._finished[episode_id]
        raise UnknownEpisodeError(f"unknown episode {episode_id!r:.60}")

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (every call then raises UnavailableError)."""
        return self._closed

    # -- for samplers and inference loops -------------------------------------------------
    def attach_policy(self, spec: Callable[[], PolicySpec], eps_id_base: int = 0,
                      keep_untrained_steps: bool = False) -> None:
        """Called by the sampler: how to describe the policy (computed on request) and
        where episode ids start. ``keep_untrained_steps``: steps of episodes started
        with ``training_enabled=False`` are queued too (marked so), for a service that
        carries a recurrent state through every episode; :meth:`drain_steps` still
        returns only the trained ones."""
        with self._lock:
            self._policy_spec = spec
            self._eps_id_base = int(eps_id_base)
            self._keep_untrained_steps = bool(keep_untrained_steps)
        self._served.set()

    def policy_spec(self, timeout_s: float = 30.0) -> PolicySpec:
        """The serving policy's spec; waits up to ``timeout_s`` for one to attach."""
        if not self._served.wait(timeout_s):
            raise UnavailableError("no policy serves this env yet")
        return self._policy_spec()  # type: ignore[misc]

    def request_weights(self) -> tuple[dict, dict]:
        """``(weights, global_vars)`` the serving policy currently acts with.

        Answered from the latest snapshot the serving thread published (the sampler
        takes one at its next round after a request, so a copy is at most one
        ``sample()`` call old); only the very first request waits for a snapshot.
        """
        with self._work:
            self._check_open()
            self._weights_wanted = True
            self._work.notify_all()
        while not self._weights_ready.wait(0.5):
            if self._closed:
                raise UnavailableError("the env was closed while waiting for weights")
        with self._lock:
            return self._weights  # type: ignore[return-value]

    @property
    def weights_wanted(self) -> bool:
        """True when a client asked for weights since the last :meth:`publish_weights`."""
        return self._weights_wanted

    def publish_weights(self, weights: dict, global_vars: dict) -> None:
        """Called by the serving thread: the weights it acts with from now on."""
        with self._lock:
            self._weights = (weights, global_vars)
            self._weights_wanted = False
        self._weights_ready.set()

    def wait_for_work(self, timeout_s: float) -> None:
        """Blocks until requests or steps are waiting, the env closed, or the timeout."""
        with self._work:
            if not (self._action_requests or self._weights_wanted or self._steps
                    or self._closed or self._thread_error):
                self._work.wait(timeout_s)

    def take_requests(self) -> list[ActionRequest]:
        """The pending ``get_action`` requests (the caller must answer all of them)."""
        with self._lock:
            requests, self._action_requests = self._action_requests, []
        return requests

    def deliver_actions(self, requests: Sequence[ActionRequest], actions: np.ndarray,
                        extras: dict[str, np.ndarray], env_actions: Sequence[Any]) -> None:
        """Answers ``requests``: request i records row i of ``actions`` / ``extras``
        (the batch columns) and gets ``env_actions[i]`` (the action as the simulator
        takes it, already clipped where the config says so)."""
        with self._lock:
            for i, request in enumerate(requests):
                episode = request.episode
                episode.open = _OpenStep(request.obs, actions[i],
                                         {k: v[i] for k, v in extras.items()})
                episode.pending = None
                request.env_action = env_actions[i]
        for request in requests:
            request.done.set()

    def fail_requests(self, requests: Sequence[ActionRequest], error: Exception) -> None:
        """Answers ``requests`` with ``error`` (the policy failed to compute actions)."""
        with self._lock:
            for request in requests:
                request.episode.pending = None
                request.error = error
        for request in requests:
            request.done.set()

    def drain_steps(self) -> list[Step]:
        """Completed steps of training episodes since the last call, in arrival order."""
        with self._lock:
            steps, self._steps = self._steps, []
        return [step for step in steps if step.training_enabled]

    def take_work(self) -> tuple[list[ActionRequest], list[Step]]:
        """The pending ``get_action`` requests (the caller must answer all of them) and
        the completed steps (see ``keep_untrained_steps`` of :meth:`attach_policy`),
        taken together: every step an episode completed before one of its requests is
        among the steps, so a service can bring the episode's state up to date first."""
        with self._lock:
            requests, self._action_requests = self._action_requests, []
            steps, self._steps = self._steps, []
        return requests, steps

    def pop_episode_stats(self) -> list[tuple[float, int]]:
        """``(return, length)`` of episodes finished since the last call."""
        with self._lock:
            stats = list(self._episode_stats)
            self._episode_stats.clear()
        return stats

    def raise_if_failed(self) -> None:
        """Re-raises a failure of :meth:`run`; raises UnavailableError once closed."""
        if self._thread_error is not None:
            raise RuntimeError(f"{type(self).__name__}.run() failed: "
                               f"{self._thread_error!r}") from self._thread_error
        if self._closed:
            raise UnavailableError(f"{type(self).__name__} was closed")

    # -- lifecycle -------------------------------------------------------------------------
    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs on :meth:`close` (a PolicyServer shuts down with its env)."""
        with self._lock:
            self._close_callbacks.append(callback)

    def close(self) -> None:
        """Refuses further calls, fails waiting requests, runs the close callbacks."""
        with self._work:
            if self._closed:
                return
            self._closed = True
            requests, self._action_requests = self._action_requests, []
            callbacks, self._close_callbacks = self._close_callbacks, []
            self._work.notify_all()
        self.fail_requests(requests, UnavailableError(f"{type(self).__name__} was closed"))
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one failing callback must not keep others from running
                logger.exception("close callback %r failed", callback)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raise TypeError(f"{type(self).__name__} is an ExternalEnv: it runs its own loop and "
                        "cannot be reset/stepped; RolloutWorker samples it with "
                        "ExternalEnvSampler (Agent.evaluate() does not support it)")

    def step(self, action: Any):
        self.reset()

    # -- internals (callers hold self._lock) --------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError(f"{type(self).__name__} was closed")
        if len(self._steps) >= self.max_buffered_steps:
            raise UnavailableError(f"{len(self._steps)} steps wait for the sampler: it is not "
                                   "sampling this env (or not keeping up)")

    def _observation(self, value: Any, what: str) -> Any:
        return check_value(self.observation_space, value, what, strict_dtype=False)

    @staticmethod
    def _reward(reward: Any) -> float:
        if isinstance(reward, (bool, np.bool_)) or not isinstance(reward, (int, float, np.number)):
            raise BadRequestError(f"reward must be a number, got {type(reward).__name__}")
        reward = float(reward)
        if not np.isfinite(reward):
            raise BadRequestError("reward must be finite")
        return reward

    def _check_startable(self, episode_id: str) -> None:
        if episode_id in self._episodes:
            raise EpisodeStateError(f"episode {episode_id!r} is already running")
        if episode_id in self._finished:
            raise EpisodeStateError(f"episode {episode_id!r} already finished")
        if len(self._episodes) + 1 > self.max_concurrent_episodes:
            raise EpisodeStateError(f"{self.max_concurrent_episodes} episodes are running: "
                                    "end some before starting more")

    def _start(self, episode_id: str, training_enabled: bool) -> _Episode:
        self._check_startable(episode_id)
        episode = _Episode(episode_id, self._eps_id_base + next(self._eps_counter),
                           training_enabled)
        self._episodes[episode_id] = episode
        return episode

    def _running(self, episode_id: Any) -> _Episode:
        if not isinstance(episode_id, str):
            raise BadRequestError(f"episode_id must be a string, got {type(episode_id).__name__}")
        episode = self._episodes.get(episode_id)
        if episode is None:
            if episode_id in self._finished:
                raise EpisodeStateError(f"episode {episode_id!r} already finished")
            raise UnknownEpisodeError(f"unknown episode {episode_id!r:.60}: call "
                                      "start_episode first")
        if episode.pending is not None:
            raise EpisodeStateError(f"episode {episode_id!r} has a get_action in flight")
        return episode

    def _complete_open_step(self, episode: _Episode, new_obs: Any, end: bool = False,
                            truncated: bool = False) -> None:
        step = episode.open
        if step is None:
            return
        episode.open = None
        if episode.training_enabled or self._keep_untrained_steps:
            self._steps.append(Step(episode.eps_id, episode.t, step.obs, step.action,
                                    step.extras, step.reward, new_obs,
                                    end and not truncated, end and truncated, end,
                                    episode.training_enabled))
            self._work.notify_all()
        episode.t += 1

    def _log_action(self, episode: _Episode, obs: Any, action: Any) -> None:
        self._complete_open_step(episode, obs)
        episode.open = _OpenStep(obs, action, None)

    def _log_returns(self, episode: _Episode, reward: float, info: dict | None) -> None:
        if episode.open is None:
            raise EpisodeStateError(f"episode {episode.episode_id!r}: log_returns before its "
                                    "first action (get_action or log_action)")
        episode.open.reward += reward
        episode.total_reward += reward
        if info is not None:
            episode.last_info = info

    def _end(self, episode: _Episode, obs: Any, truncated: bool) -> None:
        had_steps = episode.open is not None or episode.t > 0
        self._complete_open_step(episode, obs, end=True, truncated=truncated)
        del self._episodes[episode.episode_id]
        self._finished[episode.episode_id] = episode.eps_id
        while len(self._finished) > self._max_finished_ids:
            self._finished.popitem(last=False)
        if had_steps:
            self._episode_stats.append((episode.total_reward, episode.t))
        self._work.notify_all()

    def _check_piece(self, piece: ExperiencePiece) -> tuple[Any, Any, Any]:
        """Checks a piece's values; returns ``(observations, actions, end_obs)``."""
        if not isinstance(piece.episode_id, str) or not _EPISODE_ID.fullmatch(piece.episode_id):
            raise BadRequestError(f"episode_id must be 1-128 characters of [A-Za-z0-9_.:@+=-], "
                                  f"got {piece.episode_id!r:.60}")
        if not isinstance(piece.training_enabled, bool) or not isinstance(piece.truncated, bool):
            raise BadRequestError("training_enabled and truncated must be booleans")
        n = len(piece.actions)
        if len(piece.observations) != n or len(piece.rewards) != n:
            raise BadRequestError(f"episode {piece.episode_id!r}: {len(piece.observations)} "
                                  f"observations, {n} actions and {len(piece.rewards)} "
                                  "rewards; they must be equally many")
        obs = [self._observation(o, "observations") for o in piece.observations]
        actions = [check_value(self.action_space, a, "actions", strict_dtype=False)
                   for a in piece.actions]
        for r in piece.rewards:
            self._reward(r)
        end_obs = None if piece.end_obs is None else self._observation(piece.end_obs,
                                                                       "end_observation")
        return obs, actions, end_obs
