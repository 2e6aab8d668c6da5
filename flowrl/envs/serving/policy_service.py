"""Answering an ExternalEnv's requests with a policy, on the thread that owns the policy.

    service = PolicyService(env, policy, explore=True)
    service.serve_pending()          # one batched forward pass for all waiting get_action

:class:`~flowrl.workers.external_sampler.ExternalEnvSampler` calls it inside
``sample()``. :class:`PolicyServiceLoop` runs it in a thread for inference-only serving
(no training loop), e.g. :func:`flowrl.serving.serve_checkpoint`.

A recurrent policy's state is kept here, per episode (on the server's side of a
PolicyServer): every ``get_action`` continues from its episode's state and previous
action / reward, a new episode starts from the initial state and zeros, and an
episode's entry is dropped when its last step arrives. Actions the simulator logged
(``log_action``, or a local-inference client's ``log_experience``) advance the state
as well: the policy runs on the logged observation from the episode's current state,
and the step gets that call's extra columns (``state_in_*``, ``state_out_*``, the
``action_logp`` of the logged action, ...), as a step the policy acted would.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from typing import Any, Sequence

import numpy as np
import torch

from flowrl.data.sample_batch import SampleBatch
from flowrl.data.sequences import state_out_key
from flowrl.envs.serving.external_env import ExternalEnv, PolicySpec, Step
from flowrl.envs.serving.wire import config_to_json

logger = logging.getLogger(__name__)

#: Config keys never sent to clients: the env's settings may hold secrets (the server's
#: token, credentials of a simulator) and a client's policy does not need them.
PRIVATE_CONFIG_KEYS = frozenset({"env", "env_config", "evaluation_config", "callbacks",
                                 "multiagent"})


def logged_action_extras(policy: Any, obs: Any, actions: np.ndarray,
                         state: list[np.ndarray] | None = None,
                         prev_actions: np.ndarray | None = None,
                         prev_rewards: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The policy's extra columns for ``actions`` it did not choose itself.

    Runs the policy on ``obs`` (a batch array: records for nested observations) for
    its per-observation columns (``vf_preds``, ``q_values``, ``action_dist_inputs``;
    a recurrent policy's from ``state`` and the previous actions / rewards given, with
    ``state_in_*`` / ``state_out_*``) and replaces ``action_logp`` with the
    log-probability of the logged actions (batch rows of the policy's
    ``action_layout``) under that distribution.
    """
    if policy.recurrent:
        _, extras = policy.compute_actions(obs, explore=False, state=state,
                                           prev_actions=prev_actions, prev_rewards=prev_rewards)
    else:
        _, extras = policy.compute_actions(obs, explore=False)
    if SampleBatch.ACTION_LOGP in extras and SampleBatch.ACTION_DIST_INPUTS in extras:
        dist = policy.dist_class(torch.as_tensor(extras[SampleBatch.ACTION_DIST_INPUTS]))
        acts = torch.as_tensor(np.asarray(actions))
        acts = acts.long() if acts.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                             torch.uint8) else acts.float()
        with torch.inference_mode():
            logp = dist.logp(acts)
        extras[SampleBatch.ACTION_LOGP] = logp.cpu().numpy().astype(
            extras[SampleBatch.ACTION_LOGP].dtype, copy=False)
    return extras


class _Memory:
    """What a recurrent policy's next step of one episode starts from."""

    __slots__ = ("state", "prev_action", "prev_reward")

    def __init__(self, state: list[np.ndarray], prev_action: np.ndarray, prev_reward: float):
        self.state, self.prev_action, self.prev_reward = state, prev_action, prev_reward


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

    Completed steps pass through the service (it takes them from the env together
    with the requests, see :meth:`ExternalEnv.take_work`): collect the trained ones
    with :meth:`drain_steps`. A recurrent policy's state is kept per episode, as the
    module docstring says.
    """

    def __init__(self, env: ExternalEnv, policy: Any, explore: bool = True,
                 clip_actions: bool = True, eps_id_base: int = 0):
        self.env = env
        self.policy = policy
        self.explore = explore
        self.clip_actions = bool(clip_actions)
        self._spec: PolicySpec | None = None
        self._spec_lock = threading.Lock()
        self.recurrent = bool(policy.recurrent)
        self._memory: dict[int, _Memory] = {}   # eps_id -> the episode's recurrent inputs
        self._steps: list[Step] = []            # completed training steps, not drained yet
        self.publish_weights()  # on the policy's own thread, before any training
        env.attach_policy(self.spec, eps_id_base=eps_id_base,
                          keep_untrained_steps=self.recurrent)

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

        Also refreshes the env's weights snapshot when a client asked for weights, and
        takes the completed steps (a recurrent policy's episodes are brought up to date
        with them before their requests are answered).
        """
        if self.env.weights_wanted:
            self.publish_weights()
        requests, steps = self.env.take_work()
        try:
            if self.recurrent and steps:
                self._advance(steps)
            self._steps.extend(step for step in steps if step.training_enabled)
            if requests:
                obs = self.policy.obs_packer.pack([r.obs for r in requests])
                if self.recurrent:
                    memories = [self._memory_of(r.episode.eps_id) for r in requests]
                    actions, extras = self.policy.compute_actions(
                        obs, explore=self.explore, **self._inputs(memories))
                else:
                    actions, extras = self.policy.compute_actions(obs, explore=self.explore)
                env_actions = self.policy.action_layout.to_env_batch(actions,
                                                                     self.clip_actions)
        except Exception as error:
            self.env.fail_requests(requests, error)
            raise
        if requests:
            if self.recurrent:
                self._remember([r.episode.eps_id for r in requests], actions, extras)
            self.env.deliver_actions(requests, actions, extras, env_actions)
        return len(requests)

    def drain_steps(self) -> list[Step]:
        """Completed steps of training episodes taken since the last call, in arrival
        order (a recurrent policy's logged steps already scored, see :class:`Step`)."""
        steps, self._steps = self._steps, []
        return steps

    @property
    def num_episode_states(self) -> int:
        """How many episodes have a recurrent state kept here (0 for other policies)."""
        return len(self._memory)

    # -- recurrent policies: the state per episode ---------------------------------------------
    def _memory_of(self, eps_id: int) -> _Memory:
        """The episode's recurrent inputs; a fresh episode's are the initial state and
        zeros (stored only once a step used them, so failed calls leave nothing)."""
        memory = self._memory.get(eps_id)
        if memory is None:
            layout = self.policy.action_layout
            memory = _Memory(self.policy.get_initial_state(),
                             np.zeros(layout.shape, layout.dtype), 0.0)
        return memory

    def _inputs(self, memories: Sequence[_Memory]) -> dict[str, Any]:
        """``compute_actions`` keywords for a batch of episodes' next steps."""
        return {"state": [np.stack(parts) for parts in zip(*(m.state for m in memories))],
                "prev_actions": np.stack([m.prev_action for m in memories]),
                "prev_rewards": np.array([m.prev_reward for m in memories], np.float32)}

    def _remember(self, eps_ids: Sequence[int], actions: np.ndarray,
                  extras: dict[str, np.ndarray]) -> None:
        """Stores each episode's state after the step just computed (row i of extras)."""
        num_parts = len(self.policy.get_initial_state())
        for i, eps_id in enumerate(eps_ids):
            memory = self._memory_of(eps_id)
            memory.state = [np.array(extras[state_out_key(p)][i]) for p in range(num_parts)]
            memory.prev_action = np.array(actions[i])
            self._memory[eps_id] = memory

    def _advance(self, steps: Sequence[Step]) -> None:
        """Carries each episode's state through its completed steps, in order.

        A step the policy acted already moved the state when its action was computed;
        it only brings its reward (the next step's previous reward). A logged step is
        scored: the policy runs on its observation from the episode's state, one
        batched call per round over the episodes that have a logged step next.
        """
        queues: OrderedDict[int, deque[Step]] = OrderedDict()
        for step in steps:
            queues.setdefault(step.eps_id, deque()).append(step)
        while queues:
            logged: list[Step] = []
            for eps_id in list(queues):
                queue = queues[eps_id]
                while queue and queue[0].extras is not None:
                    self._close_step(queue.popleft())
                if queue:
                    logged.append(queue.popleft())
                else:
                    del queues[eps_id]
            if logged:
                self._score_logged(logged)

    def _score_logged(self, steps: Sequence[Step]) -> None:
        """Scores logged steps of distinct episodes from their episodes' states."""
        layout = self.policy.action_layout
        rows = np.stack([np.asarray(layout.from_env(s.action), dtype=layout.dtype)
                         for s in steps])
        obs = self.policy.obs_packer.pack([s.obs for s in steps])
        memories = [self._memory_of(s.eps_id) for s in steps]
        extras = logged_action_extras(self.policy, obs, rows, **self._inputs(memories))
        self._remember([s.eps_id for s in steps], rows, extras)
        for i, step in enumerate(steps):
            step.action = rows[i]
            step.extras = {k: v[i] for k, v in extras.items()}
            self._close_step(step)

    def _close_step(self, step: Step) -> None:
        """The step's reward becomes its episode's previous reward; the episode's last
        step frees its state."""
        if step.episode_end:
            self._memory.pop(step.eps_id, None)
            return
        memory = self._memory_of(step.eps_id)
        memory.prev_reward = float(step.reward)
        self._memory[step.eps_id] = memory


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
            self.service.drain_steps()
            self.episode_stats = (self.episode_stats + self.env.pop_episode_stats())[-1000:]
            self.env.wait_for_work(0.2)

    def stop(self) -> None:
        """Stops the serving thread (waiting requests stay until the env closes)."""
        self._stop.set()
        self._thread.join(timeout=5)
