"""Errors of the serving API, each with the HTTP status the policy server answers with.

The same classes are raised by in-process :class:`~flowrl.envs.serving.ExternalEnv`
calls, so a simulator sees the same failure whether it calls the env directly or goes
through :class:`~flowrl.envs.serving.PolicyClient` (which raises
:class:`PolicyClientError` carrying the server's status and message).
"""

from __future__ import annotations


class ServingError(RuntimeError):
    """Base class; ``status`` is the HTTP status code the server replies with."""

    status: int = 500


class BadRequestError(ServingError):
    """Malformed or invalid request: bad JSON, wrong types, wrong shape or dtype."""

    status = 400


class UnauthorizedError(ServingError):
    """Missing or wrong token."""

    status = 401


class UnknownEpisodeError(ServingError):
    """No episode with this id was started (or it was forgotten long ago)."""

    status = 404


class EpisodeStateError(ServingError):
    """The call does not fit the episode's state: it already ended, the id is taken,
    a ``get_action`` for it is still in flight, or no action was taken yet."""

    status = 409


class PayloadTooLargeError(ServingError):
    """The request body is larger than the server accepts."""

    status = 413


class ProtocolError(ServingError):
    """An HTTP-level problem with its own status (411 no Content-Length, 415 not JSON)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status  # type: ignore[assignment]


class UnavailableError(ServingError):
    """The env was closed, or no policy serves it (yet)."""

    status = 503


class PolicyClientError(ServingError):
    """A request of :class:`~flowrl.envs.serving.PolicyClient` failed.

    Attributes:
        status: the server's HTTP status (None when the server could not be reached
            or did not answer with JSON).
        message: the server's ``error`` message (or the connection error).
        command: the command that failed.
    """

    def __init__(self, message: str, status: int | None = None, command: str | None = None):
        where = f"{command}: " if command else ""
        code = f"HTTP {status}: " if status is not None else ""
        super().__init__(f"{where}{code}{message}")
        self.status = status  # type: ignore[assignment]
        self.message = message
        self.command = command
