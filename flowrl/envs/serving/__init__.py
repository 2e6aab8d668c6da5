"""Serving: external simulators drive flowrl through ExternalEnv, over HTTP if needed.

* :class:`ExternalEnv`: an env that runs its own loop and calls ``start_episode`` /
  ``get_action`` / ``log_action`` / ``log_returns`` / ``end_episode``; RolloutWorker
  samples it with :class:`flowrl.workers.external_sampler.ExternalEnvSampler`.
* :class:`PolicyServer` / :class:`PolicyClient`: the same API over JSON-over-HTTP
  (never pickle), validated request by request.
* :func:`flowrl.serving.serve_checkpoint` (a layer up): a trained checkpoint behind a
  PolicyServer, inference only.

See docs/serving.md.
"""

from flowrl.envs.serving.client import PolicyClient
from flowrl.envs.serving.errors import (BadRequestError, EpisodeStateError, PolicyClientError,
                                        ServingError, UnauthorizedError, UnavailableError,
                                        UnknownEpisodeError)
from flowrl.envs.serving.external_env import ExperiencePiece, ExternalEnv
from flowrl.envs.serving.policy_service import PolicyService, PolicyServiceLoop
from flowrl.envs.serving.server import PolicyServer

__all__ = ["BadRequestError", "EpisodeStateError", "ExperiencePiece", "ExternalEnv",
           "PolicyClient", "PolicyClientError", "PolicyServer",
           "PolicyService", "PolicyServiceLoop", "ServingError", "UnauthorizedError",
           "UnavailableError", "UnknownEpisodeError"]
