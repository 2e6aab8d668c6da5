"""Sampling an :class:`~flowrl.envs.serving.ExternalEnv`: episodes that run themselves.

    sampler = ExternalEnvSampler([env], policy, fragment_length=200)
    batch = sampler.sample()        # serves get_action calls until 200 steps completed

RolloutWorker picks this sampler instead of VectorSampler when its env creator returns
an ExternalEnv (with one env per worker: the env multiplexes its episodes itself).
While ``sample()`` runs it answers the env's waiting ``get_action`` calls with one
batched forward pass per round and collects completed steps; all policy use stays on
the caller's thread, so actions never interleave with a training step. Between
``sample()`` calls, ``get_action`` waits.

Batches: each episode's new steps form one piece, postprocessed by the policy like
VectorSampler's pieces. A piece that ends its episode is terminated (value 0 after it)
or truncated (``end_episode(..., truncated=True)``: bootstrapped from ``V(new_obs)``);
a piece cut because the fragment ended is bootstrapped too. ``truncate_episodes``
returns once at least ``fragment_length`` steps completed (all completed steps at that
moment, over all episodes); ``complete_episodes`` returns only whole episodes, at least
``fragment_length`` steps, keeping unfinished ones for later calls. Episodes started
with ``training_enabled=False`` get actions and count in the episode metrics, but none
of their steps reach a batch. Steps whose action was logged by the simulator
(``log_action``, or a local-inference client) get their extra columns
(``action_logp`` of the logged action, ``vf_preds``, ...) from the policy at batching.

Recurrent policies: the :class:`~flowrl.envs.serving.policy_service.PolicyService`
keeps the state per episode (server side), so each row holds the ``state_in_*`` its
step started from and the ``state_out_*`` after it (and ``prev_actions`` /
``prev_rewards`` when the model uses them), logged steps included: the service
scores them from the episode's state as it goes. Consecutive rows of an episode
chain (row t+1's ``state_in`` is row t's ``state_out``), across fragments too, so the
batches cut into sequences and train like VectorSampler's; postprocessing
bootstraps a cut piece from its last row's ``state_out_*`` and then drops them.

Columns: ``obs`` / ``new_obs`` are packed by the policy's ``obs_packer`` (record
arrays for Dict / Tuple observation spaces); ``actions`` hold the policy's batch rows
(its ``action_layout``): its own rows for actions it chose, and logged actions
converted with ``action_layout.from_env`` (a Tuple / Dict action becomes one flat row).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from flowrl.envs.serving.external_env import ExternalEnv, Step
# logged_action_extras: also importable from here, where it lived first.
from flowrl.envs.serving.policy_service import PolicyService, logged_action_extras
from flowrl.data.sample_batch import SampleBatch
from flowrl.workers.sampler import EpisodeStats

__all__ = ["ExternalEnvSampler", "logged_action_extras"]

# How long one wait for new requests or steps lasts before the sampler checks the env.
_POLL_S = 0.2


class ExternalEnvSampler:
    """Turns an ExternalEnv's episodes into postprocessed SampleBatches.

    Takes VectorSampler's arguments so that RolloutWorker can build either one:
    ``envs`` must hold exactly one ExternalEnv; ``seeds`` do not apply (the simulator
    owns its randomness). ``episode_id_base`` offsets the ``eps_id`` column so that ids
    are unique across workers. Episode callbacks do not run for external episodes
    (``on_sample_end`` does, in RolloutWorker).
    """

    def __init__(self, envs: Sequence[ExternalEnv], policy: Any, fragment_length: int,
                 batch_mode: str = "truncate_episodes", seeds: Sequence[int | None] = (),
                 clip_actions: bool = True, explore: bool = True, episode_id_base: int = 0,
                 callbacks: Any = None, worker: Any = None, **_vector_sampler_only: Any):
        if batch_mode not in ("truncate_episodes", "complete_episodes"):
            raise ValueError(f"batch_mode={batch_mode!r}; expected 'truncate_episodes' or "
                             "'complete_episodes'")
        envs = list(envs)
        if len(envs) != 1 or not isinstance(envs[0], ExternalEnv):
            raise ValueError("ExternalEnvSampler samples exactly one ExternalEnv "
                             f"(num_envs_per_worker=1), got {len(envs)} envs")
        self.env = envs[0]
        self.envs = envs
        self.policy = policy
        self.fragment_length = int(fragment_length)
        self.batch_mode = batch_mode
        self.service = PolicyService(self.env, policy, explore=explore,
                                     clip_actions=clip_actions, eps_id_base=episode_id_base)
        # eps_id -> that episode's steps not yet in a batch (arrival order kept)
        self._open: OrderedDict[int, list[Step]] = OrderedDict()
        self._finished: list[list[Step]] = []   # complete_episodes: whole episodes
        self._num_open = 0
        self._num_finished = 0
        self._unroll_id = 0
        self.env.start()

    # -- sampling --------------------------------------------------------------------------
    def sample(self, timeout_s: float | None = None) -> SampleBatch:
        """Serves the env until a fragment is complete; returns it postprocessed.

        ``timeout_s``: return what is ready by then instead (all completed steps, or
        in ``complete_episodes`` mode all finished episodes), possibly an empty batch.
        Raises if the env's ``run()`` failed or the env was closed.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.env.raise_if_failed()
            self.service.serve_pending()
            self._absorb(self.service.drain_steps())
            if self._ready_count() >= self.fragment_length:
                return self._emit()
            wait = _POLL_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return self._emit()
            self.env.wait_for_work(wait)

    def _ready_count(self) -> int:
        return self._num_open if self.batch_mode == "truncate_episodes" else self._num_finished

    def _absorb(self, steps: list[Step]) -> None:
        for step in steps:
            self._open.setdefault(step.eps_id, []).append(step)
            self._num_open += 1
            if step.episode_end and self.batch_mode == "complete_episodes":
                episode = self._open.pop(step.eps_id)
                self._num_open -= len(episode)
                self._finished.append(episode)
                self._num_finished += len(episode)

    def _emit(self) -> SampleBatch:
        if self.batch_mode == "truncate_episodes":
            pieces, self._open, self._num_open = list(self._open.values()), OrderedDict(), 0
        else:
            pieces, self._finished, self._num_finished = self._finished, [], 0
        if not pieces:
            return SampleBatch()
        self._unroll_id += 1
        batches = self._to_batches(pieces)
        return SampleBatch.concat_samples([self.policy.postprocess_trajectory(b)
                                           for b in batches])

    def _to_batches(self, pieces: list[list[Step]]) -> list[SampleBatch]:
        """One SampleBatch per piece; extras of logged actions computed in one pass
        (a recurrent policy's logged steps come scored by the service already)."""
        rows = [step for piece in pieces for step in piece]
        packer, layout = self.policy.obs_packer, self.policy.action_layout
        obs = packer.pack([s.obs for s in rows])
        # The policy's own steps hold its batch rows; logged ones the simulator's action.
        actions = np.stack([np.asarray(s.action, dtype=layout.dtype) if s.extras is not None
                            else np.asarray(layout.from_env(s.action), dtype=layout.dtype)
                            for s in rows])
        logged = [i for i, s in enumerate(rows) if s.extras is None]
        extras: dict[str, np.ndarray] = {}
        if logged:
            computed = logged_action_extras(self.policy, obs[logged], actions[logged])
            extras = {k: np.empty((len(rows),) + v.shape[1:], dtype=v.dtype)
                      for k, v in computed.items()}
            for k, v in computed.items():
                extras[k][logged] = v
        chosen = [i for i, s in enumerate(rows) if s.extras is not None]
        if chosen:
            first = rows[chosen[0]].extras
            for k, v in first.items():
                column = extras.get(k)
                if column is None:
                    column = extras[k] = np.empty((len(rows),) + np.shape(v),
                                                  dtype=np.asarray(v).dtype)
                column[chosen] = np.stack([rows[i].extras[k] for i in chosen])
        columns = {
            SampleBatch.OBS: obs,
            SampleBatch.NEW_OBS: packer.pack([s.new_obs for s in rows]),
            SampleBatch.ACTIONS: actions,
            SampleBatch.REWARDS: np.array([s.reward for s in rows], dtype=np.float32),
            SampleBatch.TERMINATEDS: np.array([s.terminated for s in rows], dtype=bool),
            SampleBatch.TRUNCATEDS: np.array([s.truncated for s in rows], dtype=bool),
            SampleBatch.EPS_ID: np.array([s.eps_id for s in rows], dtype=np.int64),
            SampleBatch.T: np.array([s.t for s in rows], dtype=np.int64),
            SampleBatch.UNROLL_ID: np.full(len(rows), self._unroll_id, dtype=np.int64),
            SampleBatch.AGENT_INDEX: np.zeros(len(rows), dtype=np.int64),
            **extras,
        }
        batches, start = [], 0
        for piece in pieces:
            end = start + len(piece)
            batches.append(SampleBatch({k: v[start:end] for k, v in columns.items()}))
            start = end
        return batches

    # -- metrics ----------------------------------------------------------------------------
    def pop_episode_metrics(self) -> list[EpisodeStats]:
        """(return, length) of episodes finished since the last call, as EpisodeStats."""
        return [EpisodeStats(r, n) for r, n in self.env.pop_episode_stats()]
