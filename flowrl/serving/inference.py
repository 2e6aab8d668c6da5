"""Serving a trained checkpoint for inference only: no training, no sampler.

    server = serve_checkpoint("~/ray_results/.../checkpoint_000010", port=9900,
                              token="s3cret")
    print(server.url)          # clients: PolicyClient(server.url, token="s3cret")
    ...
    server.shutdown()

The policy is rebuilt from the checkpoint (``params.json`` + the policy's state, loaded
with ``torch.load(weights_only=True)``), a plain ExternalEnv is put behind a
PolicyServer, and a :class:`~flowrl.envs.serving.policy_service.PolicyServiceLoop`
answers ``get_action`` (greedy unless ``explore=True``) and ``get_weights`` requests,
so clients in ``local`` inference mode work too. Logged steps are dropped.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from flowrl.envs.serving.external_env import ExternalEnv
from flowrl.envs.serving.policy_service import PolicyServiceLoop
from flowrl.envs.serving.server import DEFAULT_MAX_BODY_BYTES, PolicyServer


class InferenceServer:
    """A PolicyServer answering with a fixed policy; :meth:`shutdown` stops it all."""

    def __init__(self, policy: Any, observation_space: gym.Space, action_space: gym.Space,
                 address: str = "127.0.0.1", port: int = 9900, token: str | None = None,
                 explore: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.policy = policy
        self.env = ExternalEnv(observation_space, action_space)
        self.loop = PolicyServiceLoop(self.env, policy, explore=explore,
                                      clip_actions=bool(policy.config.get("clip_actions", True)))
        self.server = PolicyServer(self.env, address=address, port=port, token=token,
                                   max_body_bytes=max_body_bytes)

    def start(self) -> "InferenceServer":
        """Starts the serving loop, then the HTTP server; returns self."""
        self.loop.start()
        self.server.start()
        return self

    @property
    def port(self) -> int:
        """The bound port."""
        return self.server.port

    @property
    def url(self) -> str:
        """``http://address:port`` for PolicyClient."""
        return self.server.url

    def shutdown(self) -> None:
        """Closes the env (failing waiting requests), the server and the loop."""
        self.env.close()
        self.loop.stop()

    def __enter__(self) -> "InferenceServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def load_policy(checkpoint_path: str, observation_space: gym.Space | None = None,
                action_space: gym.Space | None = None) -> Any:
    """The default policy of a checkpoint, rebuilt without an Agent or workers.

    The spaces default to those of the checkpoint's env (built once and closed); pass
    them for envs this process cannot build (e.g. an ExternalEnv registered only in the
    training script).
    """
    from flowrl.algorithms.checkpoint import read_manifest, read_params, read_policy_states
    from flowrl.envs.registry import EnvContext, make_env_creator
    from flowrl.algorithms.registry import get_agent_class
    from flowrl.data.sample_batch import DEFAULT_POLICY_ID
    manifest = read_manifest(checkpoint_path)
    params = {k: v for k, v in read_params(checkpoint_path).items() if k != "callbacks"}
    if observation_space is None or action_space is None:
        env = make_env_creator(params["env"])(EnvContext(params.get("env_config", {})))
        try:
            observation_space = observation_space or env.observation_space
            action_space = action_space or env.action_space
        finally:
            env.close()
    config = {**params, "num_workers": 0, "worker_index": 0, "num_gpus": 0}
    policy_cls = get_agent_class(manifest["algorithm"]).get_policy_class(config)
    policy = policy_cls(observation_space, action_space, config)
    policy.set_state(read_policy_states(checkpoint_path, manifest)[DEFAULT_POLICY_ID])
    return policy


def serve_checkpoint(checkpoint_path: str, address: str = "127.0.0.1", port: int = 9900,
                     token: str | None = None, explore: bool = False,
                     observation_space: gym.Space | None = None,
                     action_space: gym.Space | None = None) -> InferenceServer:
    """Serves a checkpoint's policy for inference only; returns the started server.

    See :func:`load_policy` for the spaces. ``port=0`` picks a free port
    (``server.port``).
    """
    policy = load_policy(checkpoint_path, observation_space, action_space)
    return InferenceServer(policy, policy.observation_space, policy.action_space,
                           address=address, port=port, token=token, explore=explore).start()
