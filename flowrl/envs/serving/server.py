"""PolicyServer: an ExternalEnv over HTTP, with JSON bodies and a validated protocol.

    env = ExternalEnv(obs_space, action_space)
    server = PolicyServer(env, port=9900, token="s3cret").start()   # 127.0.0.1 only
    ...
    server.shutdown()             # also done by env.close()

Protocol: ``POST /`` with ``Content-Type: application/json`` and a JSON object
``{"command": ..., <fields>}``; with a token, ``Authorization: Bearer <token>``.
Replies are JSON: the command's result with status 200, or ``{"error": message}``
with a 4xx status (5xx only for failures of the server itself). See docs/serving.md
for the commands and their fields.

Safety: bodies are parsed with ``json`` only (never pickle); a body larger than
``max_body_bytes`` is refused from its Content-Length before it is parsed (the refused
body is drained, up to ``MAX_DRAIN_BYTES`` and ``LINGER_TIMEOUT_S``, so that the client
reads the 413 instead of a connection reset); tokens are
compared in constant time; every field is type-checked and observations and actions are
checked against the env's spaces before they reach the sampler. A bad request costs
its sender an error reply and nothing else: the server keeps serving.

The server carries a recurrent policy's state per episode (the env's serving
:class:`~flowrl.envs.serving.policy_service.PolicyService` keeps it): clients send
observations only, each ``get_action`` continues its episode's state, and ending the
episode frees it.

Observations and actions of Dict / Tuple spaces travel as JSON objects / lists of
their parts (see :mod:`~flowrl.envs.serving.wire`); an error names the part's path,
e.g. ``observation['pos']: shape [3] does not match ...``.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from flowrl.envs.serving.errors import (BadRequestError, PayloadTooLargeError, ProtocolError,
                                        ServingError, UnauthorizedError)
from flowrl.envs.serving.external_env import ExperiencePiece, ExternalEnv
from flowrl.envs.serving.wire import (decode_value, encode_array, encode_value, is_int,
                                      is_number, json_type, space_to_json, unbatch_value)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
#: A refused request's unread body is discarded up to this many bytes, so the client,
#: which reads the reply only after sending its body, sees the error reply; beyond it
#: the connection is closed (and the client sees a reset).
MAX_DRAIN_BYTES = 64 << 20
#: Discarding a refused body stops after this long: a slow client cannot hold a thread.
LINGER_TIMEOUT_S = 5.0


class _Fields:
    """Typed access to a request's fields; unknown fields are an error (typo guard)."""

    def __init__(self, request: dict, command: str, allowed: set[str]):
        unknown = sorted(set(request) - allowed - {"command"})
        if unknown:
            raise BadRequestError(f"{command}: unknown field(s) {unknown!r:.120}; "
                                  f"expected {sorted(allowed)}")
        self.request = request
        self.command = command

    def get(self, key: str, check: Callable[[Any], bool], kind: str, default: Any = ...,
            ) -> Any:
        if key not in self.request:
            if default is ...:
                raise BadRequestError(f"{self.command}: missing field {key!r}")
            return default
        value = self.request[key]
        if not check(value):
            raise BadRequestError(f"{self.command}: field {key!r} must be {kind}, "
                                  f"got {json_type(value)}")
        return value

    def episode_id(self) -> str:
        return self.get("episode_id", lambda v: isinstance(v, str), "a string")

    def flag(self, key: str, default: bool) -> bool:
        return self.get(key, lambda v: isinstance(v, bool), "a boolean", default)

    def raw(self, key: str) -> Any:
        return self.get(key, lambda v: True, "present")


class CommandDispatcher:
    """Runs one decoded request against an ExternalEnv; returns the reply object.

    Every command validates its fields and raises a ServingError (mapped to a 4xx
    status) for anything it cannot accept.
    """

    def __init__(self, env: ExternalEnv):
        self.env = env
        self.commands: dict[str, Callable[[dict], dict]] = {
            "start_episode": self.start_episode,
            "get_action": self.get_action,
            "log_action": self.log_action,
            "log_returns": self.log_returns,
            "end_episode": self.end_episode,
            "log_experience": self.log_experience,
            "get_policy_spec": self.get_policy_spec,
            "get_weights": self.get_weights,
        }

    def __call__(self, request: Any) -> dict:
        if not isinstance(request, dict):
            raise BadRequestError(f"the body must be a JSON object, got {json_type(request)}")
        command = request.get("command")
        if not isinstance(command, str):
            raise BadRequestError("missing 'command' (a string)")
        handler = self.commands.get(command)
        if handler is None:
            raise BadRequestError(f"unknown command {command!r:.60}; expected one of "
                                  f"{', '.join(self.commands)}")
        return handler(request)

    def _obs(self, value: Any, what: str = "observation") -> Any:
        return decode_value(self.env.observation_space, value, what)

    def start_episode(self, request: dict) -> dict:
        f = _Fields(request, "start_episode", {"episode_id", "training_enabled"})
        episode_id = f.get("episode_id", lambda v: v is None or isinstance(v, str),
                           "a string or null", None)
        eid = self.env.start_episode(episode_id, f.flag("training_enabled", True))
        return {"episode_id": eid}

    def get_action(self, request: dict) -> dict:
        f = _Fields(request, "get_action", {"episode_id", "observation"})
        eid, obs = f.episode_id(), self._obs(f.raw("observation"))
        action = self.env.get_action(eid, obs)  # nested for Dict / Tuple action spaces
        return {"action": encode_value(self.env.action_space, action, "action")}

    def log_action(self, request: dict) -> dict:
        f = _Fields(request, "log_action", {"episode_id", "observation", "action"})
        eid, obs = f.episode_id(), self._obs(f.raw("observation"))
        action = decode_value(self.env.action_space, f.raw("action"), "action")
        self.env.log_action(eid, obs, action)
        return {}

    def log_returns(self, request: dict) -> dict:
        f = _Fields(request, "log_returns", {"episode_id", "reward", "info"})
        eid = f.episode_id()
        reward = f.get("reward", is_number, "a finite number")
        info = f.get("info", lambda v: v is None or isinstance(v, dict), "an object or null",
                     None)
        self.env.log_returns(eid, reward, info)
        return {}

    def end_episode(self, request: dict) -> dict:
        f = _Fields(request, "end_episode", {"episode_id", "observation", "truncated"})
        eid, obs = f.episode_id(), self._obs(f.raw("observation"))
        self.env.end_episode(eid, obs, f.flag("truncated", False))
        return {}

    def log_experience(self, request: dict) -> dict:
        f = _Fields(request, "log_experience", {"episodes"})
        episodes = f.get("episodes", lambda v: isinstance(v, list), "a list")
        pieces = [self._piece(e, i) for i, e in enumerate(episodes)]
        return {"steps": self.env.log_experience(pieces)}

    def _piece(self, obj: Any, index: int) -> ExperiencePiece:
        what = f"log_experience: episodes[{index}]"
        if not isinstance(obj, dict):
            raise BadRequestError(f"{what} must be an object, got {json_type(obj)}")
        f = _Fields(obj, what, {"episode_id", "observations", "actions", "rewards",
                                "training_enabled", "end_observation", "truncated"})
        obs = decode_value(self.env.observation_space, f.raw("observations"),
                           f"{what}.observations", batched=True)
        actions = decode_value(self.env.action_space, f.raw("actions"), f"{what}.actions",
                               batched=True)
        rewards = f.get("rewards", lambda v: isinstance(v, list) and all(map(is_number, v)),
                        "a list of finite numbers")
        end = f.get("end_observation", lambda v: True, "", None)
        return ExperiencePiece(
            episode_id=f.episode_id(), observations=unbatch_value(self.env.observation_space, obs),
            actions=unbatch_value(self.env.action_space, actions),
            rewards=rewards, training_enabled=f.flag("training_enabled", True),
            end_obs=None if end is None else self._obs(end, f"{what}.end_observation"),
            truncated=f.flag("truncated", False))

    def get_policy_spec(self, request: dict) -> dict:
        _Fields(request, "get_policy_spec", set())
        spec = self.env.policy_spec()
        return {"observation_space": space_to_json(self.env.observation_space),
                "action_space": space_to_json(self.env.action_space),
                "policy_class": spec.policy_class, "config": spec.config}

    def get_weights(self, request: dict) -> dict:
        _Fields(request, "get_weights", set())
        weights, global_vars = self.env.request_weights()
        return {"weights": {k: encode_array(v) for k, v in weights.items()},
                "global_vars": {k: v for k, v in global_vars.items() if is_int(v)}}


def _reject_constant(name: str) -> Any:
    raise BadRequestError(f"{name} is not valid JSON here: numbers must be finite")


class _RequestHandler(BaseHTTPRequestHandler):
    """One connection (HTTP/1.1 keep-alive). Every reply is JSON with a Content-Length."""

    protocol_version = "HTTP/1.1"
    # Requests without a version are answered as HTTP/1.x (with a status line).
    default_request_version = "HTTP/1.0"
    server_version = "flowrl-policy-server"
    sys_version = ""
    server: "_HTTPServer"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s  # a stalled client frees its thread
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, Nagle's algorithm
        # and the peer's delayed ACK add ~40 ms to every reply.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        logger.debug("%s %s", self.address_string(), format % args)

    # Anything but POST: 405 (unknown methods too, via send_error's 501).
    def do_GET(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code == HTTPStatus.NOT_IMPLEMENTED or code == HTTPStatus.METHOD_NOT_ALLOWED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, \
                f"method {self.command!s:.20} is not allowed: send POST / with a JSON body"
        elif code >= 500:  # e.g. 505 for "HTTP/9.9": the client's fault, not the server's
            code = HTTPStatus.BAD_REQUEST
        self._reply(int(code), {"error": message or HTTPStatus(code).phrase}, close=True)
        self._linger()

    def do_POST(self) -> None:
        body_read = False
        try:
            if self.path.split("?", 1)[0] != "/":
                raise ProtocolError(404, f"no such path {self.path!r:.60}: POST to /")
            self._check_token()
            body = self._read_body()
            body_read = True
            reply = self.server.dispatcher(self._parse(body))
        except ServingError as error:
            self._reply(error.status, {"error": str(error)}, close=not body_read)
            if not body_read:
                self._linger(self._declared_body_length())
            return
        except Exception:  # a bug: log it, keep the details off the wire
            logger.exception("policy server request failed")
            self._reply(500, {"error": "internal server error (see the server's log)"},
                        close=not body_read)
            if not body_read:
                self._linger(self._declared_body_length())
            return
        self._reply(200, reply)

    def _linger(self, body_length: int | None = None) -> None:
        """Sends the reply and discards the unread body before the socket closes.

        Closing with unread input makes the kernel reset the connection, which destroys
        the error reply before a client that is still sending its body reads it. Reads
        ``body_length`` bytes (until the client's EOF when None), at most
        ``MAX_DRAIN_BYTES`` and for at most ``LINGER_TIMEOUT_S``.
        """
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the reply is complete: send it now
            if body_length is not None and body_length > MAX_DRAIN_BYTES:
                return  # not worth reading: the client gets a reset either way
            remaining = MAX_DRAIN_BYTES if body_length is None else body_length
            deadline = time.monotonic() + LINGER_TIMEOUT_S
            while remaining > 0:
                time_left = deadline - time.monotonic()
                if time_left <= 0:
                    return
                self.connection.settimeout(time_left)
                # rfile, not the socket: its buffer may hold the body's first bytes
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    return
                remaining -= len(chunk)
        except OSError:
            pass  # the client went away or stalled: nothing more to drain

    def _check_token(self) -> None:
        token = self.server.token
        if token is None:
            return
        got = self.headers.get("Authorization")
        if got is None:
            raise UnauthorizedError("missing token: send 'Authorization: Bearer <token>'")
        expected = f"Bearer {token}".encode("utf-8")
        if not hmac.compare_digest(got.encode("latin-1", "replace"), expected):
            raise UnauthorizedError("wrong token")

    def _declared_body_length(self) -> int | None:
        """The body size the headers state unambiguously: one well-formed
        Content-Length and no Transfer-Encoding; None otherwise."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None or len(lengths) != 1:
            return None
        length = lengths[0].strip()
        return int(length) if length.isascii() and length.isdigit() else None

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            raise ProtocolError(411, "chunked bodies are not accepted: send a Content-Length")
        if self.headers.get("Content-Length") is None:
            raise ProtocolError(411, "missing Content-Length")
        length = self._declared_body_length()
        if length is None:
            raise BadRequestError("malformed Content-Length")
        limit = self.server.max_body_bytes
        if length > limit:
            raise PayloadTooLargeError(f"request body of {length} bytes (Content-Length) "
                                       f"exceeds the server's limit of {limit} bytes "
                                       "(max_body_bytes)")
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            raise ProtocolError(415, "Content-Type must be application/json, got "
                                     f"{content_type or 'none'!r:.60}")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise BadRequestError("the body ended before Content-Length bytes")
        return body

    @staticmethod
    def _parse(body: bytes) -> Any:
        try:
            return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise BadRequestError("the body is not UTF-8 text") from None
        except RecursionError:
            raise BadRequestError("the JSON is nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, or an integer too long to convert
            raise BadRequestError(f"malformed JSON: {error}") from None

    def _reply(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj, allow_nan=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client went away; nothing to answer
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # shutdown must not wait for clients blocked in get_action

    def __init__(self, address: tuple[str, int], dispatcher: CommandDispatcher,
                 token: str | None, max_body_bytes: int, request_timeout_s: float):
        self.dispatcher = dispatcher
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        super().__init__(address, _RequestHandler)


class PolicyServer:
    """Serves an ExternalEnv over HTTP from a daemon thread.

    Args:
        external_env: the env whose episode API the server exposes.
        address: interface to bind; loopback unless you name another one.
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        token: shared secret clients send as ``Authorization: Bearer <token>``;
            None accepts every request (only sensible on loopback).
        max_body_bytes: larger requests are refused (413) before their body is parsed.
        request_timeout_s: a connection idle or stalled this long is closed.
    """

    def __init__(self, external_env: ExternalEnv, address: str = "127.0.0.1", port: int = 9900,
                 token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout_s: float = 60.0):
        if not isinstance(external_env, ExternalEnv):
            raise TypeError("PolicyServer serves an ExternalEnv, got "
                            f"{type(external_env).__name__}")
        if token is not None and (not isinstance(token, str) or not token
                                  or not token.isascii() or not token.isprintable()
                                  or " " in token):
            raise ValueError("token must be a non-empty printable ASCII string without spaces")
        self.env = external_env
        self._httpd = _HTTPServer((address, int(port)), CommandDispatcher(external_env),
                                  token, int(max_body_bytes), float(request_timeout_s))
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        """The bound interface."""
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        """The bound port (the chosen one when created with ``port=0``)."""
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """``http://address:port`` for PolicyClient."""
        return f"http://{self.address}:{self.port}"

    def start(self) -> "PolicyServer":
        """Serves in a daemon thread; the server shuts down when its env closes."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            kwargs={"poll_interval": 0.2}, daemon=True,
                                            name=f"PolicyServer:{self.port}")
            self._thread.start()
            self.env.add_close_callback(self.shutdown)
            logger.info("PolicyServer listening on %s", self.url)
        return self

    def shutdown(self) -> None:
        """Stops serving and closes the socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"PolicyServer({self.url})"
