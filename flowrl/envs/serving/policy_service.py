"""Answering an ExternalEnv's requests with a policy, on the thread that owns the policy.

    service = PolicyService(env, policy, explore=True)
    service.serve_pending()          # one batched forward pass for all waiting get_action

:class:`~flowrl.workers.external_sampler.ExternalEnvSampler` calls it inside
``sample()``. :class:`PolicyServiceLoop` runs it in a thread for inference-only serving
(no training loop), e.g. :func:`flowrl.serving.serve_checkpoint`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flowrl.envs.serving.external_env import ExternalEnv, PolicySpec
from flowrl.envs.serving.wire import config_to_json

logger = logging.getLogger(__name__)

#: Config keys never sent to clients: the env's settings may hold secrets (the server's
#: token, credentials of a simulator) and a client's policy does not need them.
PRIVATE_CONFIG_KEYS = frozenset({"env", "env_config", "evaluation_config", "callbacks",
                                 "multiagent"})


def policy_class_path(policy: Any) -> str:
    """``"module:QualName"`` of the policy's class (what a local-mode client builds)."""
    cls = type(policy)
    return f"{cls.__module__}:{cls.__qualname__}"


class PolicyService:
    """Serves ``env``'s pending ``get_action`` and ``get_weights`` requests with ``policy``.

    Build it and call :meth:`serve_pending` on the one thread that uses the policy
    (the sampler's), so that actions and weight snapshots never interleave with a
    training step.

    Observations are batched with the policy's ``obs_packer`` (record arrays for
    Dict / Tuple spaces) and actions go back to the simulator through its
    ``action_layout`` (``int`` for Discrete, nested for Dict / Tuple; Box parts
    clipped to their bounds with ``clip_actions``).
    """

    def __init__(self, env: ExternalEnv, policy: Any, explore: bool = True,
                 clip_actions: bool = True, eps_id_base: int = 0):
        self.env = env
        self.policy = policy
        self.explore = explore
        self.clip_actions = bool(clip_actions)
        self._spec: PolicySpec | None = None
        self._spec_lock = threading.Lock()
        self.publish_weights()  # on the policy's own thread, before any training
        env.attach_policy(self.spec, eps_id_base=eps_id_base)

    def spec(self) -> PolicySpec:
        """Policy class path and JSON config of the policy (computed once, on request)."""
        with self._spec_lock:
            if self._spec is None:
                config = {k: v for k, v in self.policy.config.items()
                          if k not in PRIVATE_CONFIG_KEYS}
                self._spec = PolicySpec(policy_class_path(self.policy), config_to_json(config))
            return self._spec

    def publish_weights(self) -> None:
        """Hands the env a snapshot of the weights acted with from now on."""
        timestep = int(getattr(self.policy, "global_timestep", 0))
        self.env.publish_weights(self.policy.get_weights(), {"timestep": timestep})

    def serve_pending(self) -> int:
        """Answers every waiting request; returns how many actions were computed.

        Also refreshes the env's weights snapshot when a client asked for weights.
        """
        if self.env.weights_wanted:
            self.publish_weights()
        requests = self.env.take_requests()
        if requests:
            try:
                obs = self.policy.obs_packer.pack([r.obs for r in requests])
                actions, extras = self.policy.compute_actions(obs, explore=self.explore)
                env_actions = self.policy.action_layout.to_env_batch(actions,
                                                                     self.clip_actions)
            except Exception as error:
                self.env.fail_requests(requests, error)
                raise
            self.env.deliver_actions(requests, actions, extras, env_actions)
        return len(requests)


class PolicyServiceLoop:
    """A daemon thread that serves ``env`` with ``policy`` and trains on nothing.

        loop = PolicyServiceLoop(env, policy, explore=False).start()
        ...
        loop.stop()

    Completed steps are dropped; finished episodes' ``(return, length)`` are kept in
    :attr:`episode_stats` (the latest 1000).
    """

    def __init__(self, env: ExternalEnv, policy: Any, explore: bool = False,
                 clip_actions: bool = True):
        self.env = env
        self.service = PolicyService(env, policy, explore=explore, clip_actions=clip_actions)
        self.episode_stats: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="PolicyServiceLoop")

    def start(self) -> "PolicyServiceLoop":
        """Starts the env's own loop and the serving thread; returns self."""
        self.env.start()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set() and not self.env.closed:
            try:
                self.service.serve_pending()
            except Exception:  # the clients got the error; keep serving the others
                logger.exception("computing actions failed")
            self.env.drain_steps()
            self.episode_stats = (self.episode_stats + self.env.pop_episode_stats())[-1000:]
            self.env.wait_for_work(0.2)

    def stop(self) -> None:
        """Stops the serving thread (waiting requests stay until the env closes)."""
        self._stop.set()
        self._thread.join(timeout=5)
