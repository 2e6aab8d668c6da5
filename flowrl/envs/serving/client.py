"""PolicyClient: the ExternalEnv episode API for a simulator in another process.

    client = PolicyClient("http://127.0.0.1:9900", token="s3cret")
    eid = client.start_episode()
    obs, _ = env.reset()
    while True:
        action = client.get_action(eid, obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        client.log_returns(eid, reward)
        if terminated or truncated:
            client.end_episode(eid, obs, truncated=truncated and not terminated)
            break

``inference_mode="remote"`` (default): every call is one HTTP request; the server's
policy computes the actions. ``inference_mode="local"``: the client rebuilds the
server's policy from its spec (algorithm name + JSON config), refreshes its weights
every ``update_interval_s`` seconds, computes actions itself and ships the steps in
``log_experience`` requests (at the end of each episode and every
``max_piece_steps`` steps), which the server feeds to its sampler as if acted there.

Recurrent policies: the state lives where the actions are computed. In remote mode
the server keeps it per episode. In local mode the client does: each episode starts
from the initial state, every ``get_action`` continues from its episode's state (and
previous action / reward), and a ``log_action`` advances it by running the local
policy on the logged observation (the logged action becomes the previous action).
The shipped steps carry no state: the server recomputes it from the episode's start
with its own policy, as for any logged action.

Observations and actions of Dict / Tuple spaces are passed as ``dict`` / ``tuple``
values (any mapping or sequence with the right parts) and actions come back that way
(an ``int`` for Discrete parts, arrays for the others).

Failures raise :class:`~flowrl.envs.serving.errors.PolicyClientError` with the
server's status and message. The client is thread-safe: each thread gets its own
keep-alive connection.
"""

from __future__ import annotations

import collections
import http.client
import importlib
import json
import socket
import threading
import time
import urllib.parse
import uuid
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.data.sequences import state_out_key
from flowrl.envs.serving.errors import (BadRequestError, EpisodeStateError, PolicyClientError,
                                        UnknownEpisodeError)
from flowrl.envs.serving.wire import (decode_array, decode_reply_value, encode_batch,
                                      encode_value, space_from_json)

#: Replies larger than this are refused (a weights reply of a big model fits easily).
MAX_REPLY_BYTES = 1 << 30


def _parse_address(address: str) -> tuple[str, int]:
    url = address if "://" in address else f"http://{address}"
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
        raise ValueError(f"address must look like 'http://host:port' (or 'host:port'), "
                         f"got {address!r}")
    return parsed.hostname, parsed.port


class _NoDelayConnection(http.client.HTTPConnection):
    """http.client sends headers and body in separate writes; NODELAY keeps Nagle's
    algorithm from holding the body back until the server's delayed ACK (~40 ms)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Transport:
    """POSTs JSON commands to one server over one keep-alive connection per thread."""

    def __init__(self, address: str, token: str | None, timeout_s: float):
        self.host, self.port = _parse_address(address)
        self.headers = {"Content-Type": "application/json"}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _NoDelayConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
            return conn, False
        return conn, conn.sock is not None

    def call(self, command: str, **fields: Any) -> dict:
        """Runs ``command``; returns the reply object or raises PolicyClientError."""
        try:
            body = json.dumps({"command": command, **fields}, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise PolicyClientError(f"cannot send as JSON: {error}", command=command) from None
        for attempt in range(2):
            conn, reused = self._connection()
            try:
                status, data = self._post(conn, body)
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as error:
                conn.close()
                # A kept-alive connection the server closed while idle: send again once.
                if reused and attempt == 0:
                    continue
                raise PolicyClientError(f"connection to {self.host}:{self.port} failed: "
                                        f"{error!r}", command=command) from None
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                raise PolicyClientError(f"cannot reach the policy server at {self.host}:"
                                        f"{self.port}: {error!r}", command=command) from None
        try:
            reply = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise PolicyClientError(f"the server answered {len(data)} bytes that are not "
                                    "JSON", status, command) from None
        if status != 200:
            message = reply.get("error") if isinstance(reply, dict) else None
            raise PolicyClientError(str(message or reply), status, command)
        if not isinstance(reply, dict):
            raise PolicyClientError("the reply is not a JSON object", status, command)
        return reply

    def _post(self, conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
        try:
            conn.request("POST", "/", body=body, headers=self.headers)
        except (BrokenPipeError, ConnectionResetError) as send_error:
            # The server may have refused the request (e.g. 413) and stopped reading:
            # its reply is still worth reading.
            try:
                return self._read_reply(conn)
            except (ConnectionResetError, BrokenPipeError):  # RemoteDisconnected too
                # Still a ConnectionResetError: a stale keep-alive connection is retried.
                raise ConnectionResetError(
                    f"the server closed the connection while the {len(body)}-byte request "
                    f"was being sent and left no readable reply ({send_error!r})") from None
        return self._read_reply(conn)

    @staticmethod
    def _read_reply(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_REPLY_BYTES:
            conn.close()
            raise PolicyClientError(f"reply without a usable Content-Length ({length!r})",
                                    response.status)
        data = response.read()
        if response.will_close:
            conn.close()
        return response.status, data

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


#: Local inference builds only flowrl's own policy classes: a server names the class,
#: and importing whatever it names would let a server run code on the client.
LOCAL_POLICY_MODULE_PREFIX = "flowrl.policies."


def flowrl_policy_class(path: Any) -> type:
    """The class named ``"flowrl.policies.<module>:<Class>"`` by a server's policy spec."""
    module_name, _, class_name = str(path).partition(":")
    if not isinstance(path, str) or not module_name.startswith(LOCAL_POLICY_MODULE_PREFIX) \
            or not class_name.isidentifier():
        raise PolicyClientError(
            f"the server's policy class {path!r} is not one of flowrl's policies "
            f"({LOCAL_POLICY_MODULE_PREFIX}*): use inference_mode='remote'",
            command="get_policy_spec")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise PolicyClientError(f"the server's policy class {path!r} does not exist in this "
                                f"flowrl ({error}); are client and server the same version?",
                                command="get_policy_spec") from error
    if not isinstance(cls, type):
        raise PolicyClientError(f"the server's policy class {path!r} is not a class",
                                command="get_policy_spec")
    return cls


class _LocalPolicy:
    """The client's copy of the server's policy (local inference mode)."""

    def __init__(self, transport: _Transport, update_interval_s: float):
        self.transport = transport
        self.update_interval_s = float(update_interval_s)
        spec = transport.call("get_policy_spec")
        self.observation_space = space_from_json(spec["observation_space"])
        self.action_space = space_from_json(spec["action_space"])
        config = {**spec["config"], "num_gpus": 0}
        policy_cls = flowrl_policy_class(spec.get("policy_class"))
        self.policy = policy_cls(self.observation_space, self.action_space, config)
        self.explore = bool(config.get("explore", True))
        self.clip = bool(config.get("clip_actions", True))
        self.lock = threading.Lock()
        self.num_updates = 0
        self.last_update = 0.0
        self.global_vars: dict = {}
        self.refresh()

    def refresh(self) -> None:
        """Fetches the server's current weights (and timestep) into the local copy."""
        reply = self.transport.call("get_weights")
        weights = {k: decode_array(v, f"weights[{k!r}]") for k, v in reply["weights"].items()}
        with self.lock:
            self.policy.set_weights(weights)
            self.global_vars = dict(reply.get("global_vars", {}))
            self.policy.on_global_var_update(self.global_vars)
            self.num_updates += 1
            self.last_update = time.monotonic()

    def maybe_refresh(self) -> None:
        if time.monotonic() - self.last_update >= self.update_interval_s:
            self.refresh()

    def act(self, obs: Any, episode: "_LocalEpisode") -> tuple[Any, Any]:
        """``(action as recorded, action for the simulator)`` for one observation of
        ``episode`` (a recurrent policy continues from the episode's state, which it
        then advances).

        Both are in the simulator's form (nested for Dict / Tuple action spaces); the
        recorded one is unclipped, so that the server scores the action the policy
        sampled, while the simulator gets Box parts clipped (``clip_actions``).
        """
        with self.lock:
            batch = self.policy.obs_packer.pack_one(obs)
            if self.policy.recurrent:
                actions, extras = self.policy.compute_actions(
                    batch, explore=self.explore, **episode.recurrent_inputs())
                episode.advance(extras, actions[0])
            else:
                actions, _ = self.policy.compute_actions(batch, explore=self.explore)
        layout = self.policy.action_layout
        return layout.to_env(actions[0], clip=False), layout.to_env(actions[0], clip=self.clip)

    def advance(self, obs: Any, action: Any, episode: "_LocalEpisode") -> None:
        """A recurrent policy's state after ``episode`` logged ``action`` (as the
        simulator took it) for ``obs``: the policy runs on ``obs`` from the episode's
        state. Nothing to do for other policies."""
        if not self.policy.recurrent:
            return
        with self.lock:
            batch = self.policy.obs_packer.pack_one(obs)
            _, extras = self.policy.compute_actions(batch, explore=False,
                                                    **episode.recurrent_inputs())
            layout = self.policy.action_layout
            episode.advance(extras, np.asarray(layout.from_env(action), dtype=layout.dtype))


class _LocalEpisode:
    """Steps of one episode acted locally and not shipped yet, and (for a recurrent
    policy) what its next step starts from."""

    __slots__ = ("episode_id", "training_enabled", "observations", "actions", "rewards",
                 "state", "prev_action")

    def __init__(self, episode_id: str, training_enabled: bool, policy: Any = None):
        self.episode_id = episode_id
        self.training_enabled = training_enabled
        self.observations: list = []
        self.actions: list = []
        self.rewards: list[float] = []
        recurrent = policy is not None and policy.recurrent
        self.state: list[np.ndarray] = policy.get_initial_state() if recurrent else []
        self.prev_action: np.ndarray | None = None
        if recurrent:
            layout = policy.action_layout
            self.prev_action = np.zeros(layout.shape, layout.dtype)

    def recurrent_inputs(self) -> dict[str, Any]:
        """``compute_actions`` keywords for the episode's next step (a batch of one).
        The previous reward is the latest step's, complete once a new step comes (the
        latest step stays in the lists when earlier ones are shipped)."""
        prev_reward = self.rewards[-1] if self.rewards else 0.0
        return {"state": [part[None] for part in self.state],
                "prev_actions": self.prev_action[None],
                "prev_rewards": np.array([prev_reward], np.float32)}

    def advance(self, extras: dict[str, np.ndarray], action_row: np.ndarray) -> None:
        """Moves the state to the one after the step just computed (row 0 of extras)."""
        self.state = [np.array(extras[state_out_key(p)][0]) for p in range(len(self.state))]
        self.prev_action = np.array(action_row)

    def piece(self, observation_space: gym.Space, action_space: gym.Space,
              end_obs: Any = None, truncated: bool = False) -> dict:
        """This episode's unshipped steps as a ``log_experience`` entry (then cleared)."""
        entry = {
            "episode_id": self.episode_id,
            "training_enabled": self.training_enabled,
            "observations": encode_batch(observation_space, self.observations, "observations"),
            "actions": encode_batch(action_space, self.actions, "actions"),
            "rewards": [float(r) for r in self.rewards],
        }
        if end_obs is not None:
            entry["end_observation"] = encode_value(observation_space, end_obs,
                                                    "end_observation")
            entry["truncated"] = bool(truncated)
        self.observations, self.actions, self.rewards = [], [], []
        return entry


class PolicyClient:
    """Talks to a :class:`~flowrl.envs.serving.PolicyServer`; see the module docstring.

    Args:
        address: ``"http://host:port"`` (or ``"host:port"``) of the server.
        token: the server's shared token, sent as ``Authorization: Bearer <token>``.
        inference_mode: ``"remote"`` (the server computes actions) or ``"local"``.
        update_interval_s: local mode: how often the policy's weights are refreshed
            (checked on each ``get_action``).
        timeout_s: socket timeout of each request (a ``get_action`` waits while the
            server trains, so keep it above a training iteration's duration).
        max_piece_steps: local mode: ship an episode's steps once this many piled up.
    """

    def __init__(self, address: str, token: str | None = None, inference_mode: str = "remote",
                 update_interval_s: float = 10.0, timeout_s: float = 600.0,
                 max_piece_steps: int = 100):
        if inference_mode not in ("remote", "local"):
            raise ValueError(f"inference_mode={inference_mode!r}; expected 'remote' or 'local'")
        self.address = address
        self.inference_mode = inference_mode
        self.max_piece_steps = int(max_piece_steps)
        self._transport = _Transport(address, token, timeout_s)
        self._spaces: tuple[gym.Space, gym.Space] | None = None
        self._lock = threading.Lock()
        self._local: _LocalPolicy | None = None
        self._episodes: dict[str, _LocalEpisode] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        if inference_mode == "local":
            self._local = _LocalPolicy(self._transport, update_interval_s)
            self._spaces = (self._local.observation_space, self._local.action_space)

    # -- the episode API ---------------------------------------------------------------------
    def start_episode(self, episode_id: str | None = None, training_enabled: bool = True) -> str:
        """Starts an episode; returns its id (generated when None)."""
        if self._local is None:
            reply = self._transport.call("start_episode", episode_id=episode_id,
                                         training_enabled=training_enabled)
            return reply["episode_id"]
        episode_id = episode_id or uuid.uuid4().hex
        with self._lock:
            if episode_id in self._episodes or episode_id in self._finished:
                raise EpisodeStateError(f"episode {episode_id!r} was already started")
            self._episodes[episode_id] = _LocalEpisode(episode_id, bool(training_enabled),
                                                       self._local.policy)
        return episode_id

    def get_action(self, episode_id: str, observation: Any) -> Any:
        """The action for ``observation`` as the simulator takes it (an ``int`` for
        Discrete action spaces, a ``dict`` / ``tuple`` for Dict / Tuple ones)."""
        if self._local is None:
            reply = self._transport.call("get_action", episode_id=episode_id,
                                         observation=self._encode_obs(observation))
            return decode_reply_value(self._action_space(), reply["action"])
        self._local.maybe_refresh()
        with self._lock:
            episode = self._episode(episode_id)
        action, env_action = self._local.act(observation, episode)
        self._record(episode_id, observation, action)
        return env_action

    def log_action(self, episode_id: str, observation: Any, action: Any) -> None:
        """Records an action the simulator chose itself for ``observation`` (local mode,
        recurrent policy: the episode's state advances by running the policy on it)."""
        if self._local is None:
            self._transport.call("log_action", episode_id=episode_id,
                                 observation=self._encode_obs(observation),
                                 action=self._encode(self._action_space(), action, "action"))
            return
        with self._lock:
            episode = self._episode(episode_id)
        self._local.advance(observation, action, episode)
        self._record(episode_id, observation, action)

    def log_returns(self, episode_id: str, reward: float, info: dict | None = None) -> None:
        """Adds ``reward`` to the latest step (``info`` must be JSON; local mode drops it)."""
        if self._local is None:
            self._transport.call("log_returns", episode_id=episode_id, reward=float(reward),
                                 info=info)
            return
        with self._lock:
            episode = self._episode(episode_id)
            if not episode.actions:  # steps are shipped only when a later one exists
                raise EpisodeStateError(f"episode {episode_id!r}: log_returns before its "
                                        "first action")
            episode.rewards[-1] += float(reward)

    def end_episode(self, episode_id: str, observation: Any, truncated: bool = False) -> None:
        """Ends the episode with its final ``observation``."""
        if self._local is None:
            self._transport.call("end_episode", episode_id=episode_id,
                                 observation=self._encode_obs(observation),
                                 truncated=bool(truncated))
            return
        with self._lock:
            episode = self._episode(episode_id)
            del self._episodes[episode_id]
            self._finished[episode_id] = None
            while len(self._finished) > 100_000:
                self._finished.popitem(last=False)
            entry = episode.piece(*self._spaces, end_obs=observation, truncated=truncated)
        self._transport.call("log_experience", episodes=[entry])

    # -- local mode ---------------------------------------------------------------------------
    def update_policy_weights(self) -> None:
        """Local mode: fetch the server's weights now."""
        if self._local is None:
            raise RuntimeError("update_policy_weights() needs inference_mode='local'")
        self._local.refresh()

    @property
    def num_weight_updates(self) -> int:
        """Local mode: how many times weights were fetched (0 in remote mode)."""
        return 0 if self._local is None else self._local.num_updates

    def episode_state(self, episode_id: str) -> list[np.ndarray]:
        """Local mode: copies of the recurrent state the episode's next step starts from
        (the initial state before its first step; empty for other policies)."""
        if self._local is None:
            raise RuntimeError("episode_state() needs inference_mode='local': in remote mode "
                               "the server keeps the state")
        with self._lock:
            return [part.copy() for part in self._episode(episode_id).state]

    @property
    def policy(self) -> Any:
        """Local mode: the local copy of the policy (None in remote mode)."""
        return None if self._local is None else self._local.policy

    def flush(self) -> None:
        """Local mode: ships every episode's completed steps now."""
        with self._lock:
            entries = []
            for episode in self._episodes.values():
                if len(episode.actions) > 1:
                    last = (episode.observations[-1], episode.actions[-1], episode.rewards[-1])
                    del episode.observations[-1], episode.actions[-1], episode.rewards[-1]
                    entries.append(episode.piece(*self._spaces))
                    episode.observations, episode.actions, episode.rewards = \
                        [last[0]], [last[1]], [last[2]]
        if entries:
            self._transport.call("log_experience", episodes=entries)

    # -- server info ----------------------------------------------------------------------------
    def get_policy_spec(self) -> dict:
        """The server's spaces (JSON), algorithm name and JSON config."""
        return self._transport.call("get_policy_spec")

    def get_weights(self) -> tuple[dict[str, np.ndarray], dict]:
        """The server policy's current ``(weights, global_vars)``."""
        reply = self._transport.call("get_weights")
        return ({k: decode_array(v, k) for k, v in reply["weights"].items()},
                reply.get("global_vars", {}))

    def close(self) -> None:
        """Closes this thread's connection."""
        self._transport.close()

    # -- internals --------------------------------------------------------------------------------
    def _spaces_from_server(self) -> tuple[gym.Space, gym.Space]:
        with self._lock:
            if self._spaces is None:
                spec = self._transport.call("get_policy_spec")
                self._spaces = (space_from_json(spec["observation_space"]),
                                space_from_json(spec["action_space"]))
            return self._spaces

    def _action_space(self) -> gym.Space:
        return self._spaces_from_server()[1]

    def _encode_obs(self, observation: Any) -> Any:
        return self._encode(self._spaces_from_server()[0], observation, "observation")

    @staticmethod
    def _encode(space: gym.Space, value: Any, what: str) -> Any:
        """JSON for ``value`` in ``space``'s dtype (so float64 lists become float32)."""
        try:
            return encode_value(space, value, what)
        except ValueError as error:  # its message names the part (``what['pos']: ...``)
            raise BadRequestError(str(error)) from None

    def _episode(self, episode_id: str) -> _LocalEpisode:
        episode = self._episodes.get(episode_id)
        if episode is None:
            if episode_id in self._finished:
                raise EpisodeStateError(f"episode {episode_id!r} already finished")
            raise UnknownEpisodeError(f"unknown episode {episode_id!r}: call start_episode first")
        return episode

    def _record(self, episode_id: str, observation: Any, action: Any) -> None:
        """Appends a step; ships the episode's earlier steps once enough piled up."""
        entry = None
        with self._lock:
            episode = self._episode(episode_id)
            if len(episode.actions) >= self.max_piece_steps:
                entry = episode.piece(*self._spaces)
            episode.observations.append(observation)  # encoded per part when shipped
            episode.actions.append(action)
            episode.rewards.append(0.0)
        if entry is not None:
            self._transport.call("log_experience", episodes=[entry])
