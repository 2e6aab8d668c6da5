"""Deep Q-Networks (Mnih et al. 2015) with the usual Rainbow-lite options.

Per train batch (after n-step postprocessing, see :func:`adjust_nstep`)::

    q_t        = Q_online(s)[a]
    a*         = argmax_a Q_online(s', a)   if double_q (van Hasselt et al. 2016)
               = argmax_a Q_target(s', a)   otherwise
    target     = r + gammas * (1 - terminated) * Q_target(s', a*)
    td_error   = q_t - stop_grad(target)
    loss       = mean(weights * huber(td_error))            # weights: PER importance weights

``gammas`` is ``gamma ** m`` per row, where ``m`` is the number of rewards folded
into ``r`` (``m < n_step`` near the end of a fragment), so cut and truncated
fragments bootstrap with the right discount and terminated ones don't bootstrap.

The Q network (:class:`QNetwork`) is a feature trunk (the catalog's choice of
MLP / Nature CNN / custom model) followed by a Q head of ``hiddens`` ReLU
layers, optionally dueling (Wang et al. 2016): ``Q = V + A - mean_a A``.

Exploration is epsilon-greedy: a linear schedule over the global timestep
(``on_global_var_update``), or -- Ape-X (Horgan et al. 2018) -- a fixed epsilon
per rollout worker ``0.4 ** (1 + 7 i / (N - 1))``.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.spaces import action_mask_keys
from flowrl.policies.dqn_networks import QNetwork
from flowrl.policies.models import ActionMaskedModel
from flowrl.policies.policy import Policy, TensorDict
from flowrl.data.sample_batch import SampleBatch

__all__ = [
    "GAMMAS",
    "TD_ERROR",
    "Q_VALUES",
    "adjust_nstep",
    "nstep_last_rows",
    "huber_loss",
    "dqn_td_target",
    "per_worker_epsilon",
    "linear_epsilon",
    "QNetwork",
    "DQNTorchPolicy",
]

#: Column set by :func:`adjust_nstep`: discount of the bootstrap value per row.
GAMMAS = "gammas"
#: Column set by worker-side prioritization: ``|TD error|`` per row (initial priorities).
TD_ERROR = "td_error"
#: Extra column from :meth:`DQNTorchPolicy.compute_actions`.
Q_VALUES = "q_values"

_DEFAULT_EXPLORATION: dict[str, Any] = {
    "initial_epsilon": 1.0,
    "final_epsilon": 0.02,
    "epsilon_timesteps": 10000,
}


# --------------------------------------------------------------------- n-step
def _segment_ends(batch: SampleBatch) -> np.ndarray:
    """Per row, the index of the last row of its episode segment.

    A segment ends at a terminated or truncated row, where ``eps_id`` changes,
    or at the end of the batch -- so a batch holding several episode pieces is
    handled in one vectorised pass.
    """
    count = batch.count
    boundary = np.zeros(count, dtype=bool)
    boundary[-1] = True
    for column in (SampleBatch.TERMINATEDS, SampleBatch.TRUNCATEDS):
        if column in batch:
            boundary |= np.asarray(batch[column], dtype=bool)
    if SampleBatch.EPS_ID in batch:
        eps_ids = np.asarray(batch[SampleBatch.EPS_ID])
        boundary[:-1] |= eps_ids[1:] != eps_ids[:-1]
    ends = np.flatnonzero(boundary)
    return ends[np.searchsorted(ends, np.arange(count))]


def nstep_last_rows(batch: SampleBatch, n_step: int) -> np.ndarray:
    """Per row ``t``, the index ``t + m - 1`` of the last step :func:`adjust_nstep`
    folds into it (``m = min(n_step, rows left in t's episode segment)``)."""
    rows = np.arange(batch.count)
    return np.minimum(rows + int(n_step) - 1, _segment_ends(batch))


def adjust_nstep(batch: SampleBatch, n_step: int, gamma: float) -> SampleBatch:
    """Rewrite ``batch`` into n-step transitions (returns ``batch``, columns replaced).

    For each row ``t`` with ``m = min(n_step, rows left in t's episode segment)``::

        rewards[t]     <- sum_{k < m} gamma**k * rewards[t + k]
        new_obs[t]     <- new_obs[t + m - 1]
        terminateds[t] <- terminateds[t + m - 1]     (truncateds likewise)
        gammas[t]      =  gamma**m                   (float32, new column)

    The bootstrap term is then ``gammas * (1 - terminateds) * V(new_obs)``.
    Segments end at terminated/truncated rows and at ``eps_id`` changes, so
    returns never leak across episodes. Columns are replaced by new arrays
    (the input arrays, often views of sampler buffers, are not written to).
    Apply it once per fragment: applying it twice compounds the returns.
    """
    n_step = int(n_step)
    if n_step < 1:
        raise ValueError(f"n_step must be >= 1, got {n_step}")
    count = batch.count
    if count == 0:
        batch[GAMMAS] = np.zeros(0, dtype=np.float32)
        return batch
    if n_step == 1:  # every m == 1: gamma per row, nothing else changes
        batch[GAMMAS] = np.full(count, float(gamma), dtype=np.float32)
        return batch
    rewards = np.asarray(batch[SampleBatch.REWARDS])
    rows = np.arange(count)
    last = nstep_last_rows(batch, n_step)
    horizon = last - rows + 1
    batch[GAMMAS] = np.power(float(gamma), horizon).astype(np.float32)

    rewards64 = rewards.astype(np.float64)
    padded = np.concatenate([rewards64, np.zeros(n_step - 1)])
    returns = rewards64.copy()
    for k in range(1, n_step):  # loop over the (short) horizon, never over rows
        returns += np.where(k < horizon, gamma**k * padded[k : k + count], 0.0)
    out_dtype = rewards.dtype if np.issubdtype(rewards.dtype, np.floating) else np.float32
    batch[SampleBatch.REWARDS] = returns.astype(out_dtype)
    for column in (SampleBatch.NEW_OBS, SampleBatch.TERMINATEDS, SampleBatch.TRUNCATEDS):
        if column in batch:
            batch[column] = np.asarray(batch[column])[last]
    return batch


# ----------------------------------------------------------------- loss terms
def huber_loss(x: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Elementwise Huber loss: ``x^2 / 2`` if ``|x| <= delta``, else ``delta (|x| - delta / 2)``."""
    return nn.functional.huber_loss(x, torch.zeros_like(x), reduction="none", delta=delta)


def dqn_td_target(
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    gammas: torch.Tensor,
    q_tp1_target: torch.Tensor,
    q_tp1_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """``r + gammas * (1 - terminated) * Q_target(s', a*)``, shape ``[B]``.

    ``a* = argmax Q_online(s')`` when ``q_tp1_online`` is given (double Q),
    else ``argmax Q_target(s')`` (i.e. the max of the target net).
    """
    if q_tp1_online is None:
        q_next = q_tp1_target.max(dim=1).values
    else:
        best = q_tp1_online.argmax(dim=1, keepdim=True)
        q_next = q_tp1_target.gather(1, best).squeeze(1)
    not_done = 1.0 - terminateds.to(q_next.dtype)
    return rewards + gammas * not_done * q_next


# ----------------------------------------------------------------- exploration
def linear_epsilon(timestep: int, initial: float, final: float, timesteps: int) -> float:
    """Linear decay from ``initial`` to ``final`` over ``timesteps``, then constant."""
    if timesteps <= 0:
        return float(final)
    frac = min(1.0, max(0.0, timestep / float(timesteps)))
    return float(initial + frac * (final - initial))


def per_worker_epsilon(worker_index: int, num_workers: int) -> float:
    """Ape-X epsilon of remote worker ``worker_index`` (1..N) out of ``num_workers`` = N.

    ``0.4 ** (1 + 7 i / (N - 1))`` with ``i = worker_index - 1``; ``0.4`` when N == 1.
    """
    if num_workers < 1 or not 1 <= worker_index <= num_workers:
        raise ValueError(
            f"per-worker epsilon needs 1 <= worker_index <= num_workers, "
            f"got worker_index={worker_index}, num_workers={num_workers}"
        )
    if num_workers == 1:
        return 0.4
    return float(0.4 ** (1.0 + 7.0 * (worker_index - 1) / (num_workers - 1)))


class DQNTorchPolicy(Policy):
    """DQN / double DQN / dueling DQN / Ape-X policy for ``Discrete`` action spaces.

    Config keys (fallbacks in :attr:`DEFAULT_CONFIG`; the algorithm config wins):
    ``gamma``, ``lr``, ``model`` (trunk, see :class:`QNetwork`), ``hiddens``,
    ``dueling``, ``double_q``, ``n_step``, ``adam_epsilon``, ``grad_clip``,
    ``num_gpus``, ``seed``, ``exploration_config`` (``initial_epsilon``,
    ``final_epsilon``, ``epsilon_timesteps``; partial dicts are merged over the
    defaults), ``per_worker_exploration``, ``worker_side_prioritization``, and
    the rollout worker's ``worker_index`` / ``num_workers`` (Ape-X epsilons,
    per-worker exploration seed ``seed + 1000 * worker_index``).

    Learning uses the base class's SGD loop (:meth:`Policy.learn_on_batch`). Its
    stats (averaged over the last epoch's minibatches): ``loss``, ``total_loss``
    (same value), ``mean_q`` / ``min_q`` / ``max_q`` (of ``Q(s, a)`` for the batch's
    actions), ``mean_td_error`` (mean absolute TD error), ``grad_gnorm`` (before
    clipping), ``cur_lr``; and ``td_error`` (a :attr:`per_row_stats` entry,
    ``np.ndarray [B]``): the absolute TD error of every row, in batch order,
    computed right before the update that used the row (last epoch) -- feed it to
    the replay buffer's priority update (which adds ``prioritized_replay_eps``).
    :meth:`compute_gradients` reports the same stats. The target net is not
    updated by learning; call :meth:`update_target`.

    Weights: :meth:`get_weights` / :meth:`set_weights` carry the online net only
    (what rollout workers act with); :meth:`get_state` adds the target net, the
    optimizer and the timestep of the epsilon schedule. The exported
    TorchScript module (:meth:`export`) maps raw obs to Q-values ``[B, A]``.
    """

    DEFAULT_CONFIG: dict[str, Any] = {
        **Policy.DEFAULT_CONFIG,
        "lr": 5e-4,
        "hiddens": [256],
        "dueling": True,
        "double_q": True,
        "n_step": 1,
        "adam_epsilon": 1e-8,
        "grad_clip": 40.0,
        "exploration_config": dict(_DEFAULT_EXPLORATION),
        "per_worker_exploration": False,
        "worker_side_prioritization": False,
        "worker_index": 0,
        "num_workers": 0,
    }

    #: Columns every train batch needs; ``gammas`` and ``weights`` are optional.
    loss_columns: tuple[str, ...] = (
        SampleBatch.OBS,
        SampleBatch.ACTIONS,
        SampleBatch.REWARDS,
        SampleBatch.NEW_OBS,
        SampleBatch.TERMINATEDS,
    )
    optional_loss_columns: tuple[str, ...] = (GAMMAS, SampleBatch.WEIGHTS)
    #: ``|TD error|`` of every row, returned by learn_on_batch for priority updates.
    per_row_stats: tuple[str, ...] = (TD_ERROR,)

    def __init__(
        self, observation_space: gym.Space, action_space: gym.Space, config: dict[str, Any]
    ) -> None:
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(
                f"DQN and APEX support Discrete action spaces only, got {action_space!r}; "
                "for MultiDiscrete, MultiBinary, Tuple or Dict actions use PPO, A2C, A3C, "
                "PG, IMPALA or ES, for Box actions DDPG, TD3 or APEX_DDPG"
            )
        if ((config or {}).get("model") or {}).get("use_lstm"):
            raise ValueError(
                "DQN and APEX replay single transitions and have no recurrent replay; "
                "model.use_lstm is for the on-policy algorithms PPO, A2C, A3C, PG and "
                "IMPALA")
        super().__init__(observation_space, action_space, config)
        cfg = self.config
        self.num_actions = int(action_space.n)
        self.gamma = float(cfg["gamma"])
        self.n_step = int(cfg["n_step"])
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.n_step}")
        self.double_q = bool(cfg["double_q"])
        self.exploration_config = {**_DEFAULT_EXPLORATION, **(cfg.get("exploration_config") or {})}
        self.worker_index = int(cfg.get("worker_index") or 0)
        self.num_workers = int(cfg.get("num_workers") or 0)
        # Ape-X: a fixed epsilon on remote workers; the learner (index 0) keeps the schedule.
        self._fixed_epsilon: float | None = None
        if cfg.get("per_worker_exploration") and self.worker_index > 0:
            self._fixed_epsilon = per_worker_epsilon(self.worker_index, max(self.num_workers, 1))
        seed = cfg.get("seed")
        if seed is not None:
            # Distinct exploration streams per worker even though they share config["seed"].
            self._rng = np.random.default_rng(int(seed) + 1000 * self.worker_index)

        self.target_model: nn.Module = copy.deepcopy(self.model)
        self.target_model.requires_grad_(False)
        self.target_model.eval()

    # ------------------------------------------------------------ construction
    def make_model(self) -> nn.Module:
        """The online :class:`QNetwork` (the target net is a copy of it).

        A masked observation space (a Dict of ``action_mask`` and ``observations``)
        gets the Q network of its ``observations`` part inside an
        :class:`~flowrl.policies.models.ActionMaskedModel`: masked actions get the
        lowest Q value, so neither the greedy action nor the bootstrap target's max
        ever takes them.
        """
        space = self.obs_packer.kept_space
        mask_keys = action_mask_keys(space)
        obs_space = space if mask_keys is None else space[mask_keys[1]]
        q_network = QNetwork(
            obs_space,
            self.action_space,
            self.config["model"],
            list(self.config.get("hiddens") or []),
            bool(self.config.get("dueling", True)),
        )
        if mask_keys is None:
            return q_network
        return ActionMaskedModel(q_network, mask_keys[1], space[mask_keys[0]],
                                 int(self.action_space.n))

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam with ``lr`` and ``adam_epsilon`` (fused kernel where available)."""
        lr = float(self.config["lr"])
        eps = float(self.config.get("adam_epsilon", 1e-8))
        try:
            return torch.optim.Adam(self._params, lr=lr, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.Adam(self._params, lr=lr, eps=eps)

    # ------------------------------------------------------------- exploration
    @property
    def epsilon(self) -> float:
        """Current epsilon: the Ape-X per-worker constant, else the linear schedule."""
        if self._fixed_epsilon is not None:
            return self._fixed_epsilon
        cfg = self.exploration_config
        return linear_epsilon(
            self.global_timestep,
            float(cfg["initial_epsilon"]),
            float(cfg["final_epsilon"]),
            int(cfg["epsilon_timesteps"]),
        )

    # ------------------------------------------------------------------ acting
    def compute_actions(
        self, obs_batch: np.ndarray, explore: bool = True
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Epsilon-greedy (``explore``) or greedy actions.

        Returns ``(actions int64 [B], {"q_values": float32 [B, A]})``.

        With probability epsilon a row's action is drawn uniformly from all
        actions (the greedy one included), one vectorised draw per batch. With an
        action mask in the observation, both the greedy and the random action are
        legal ones (a row whose mask allows nothing is treated as unmasked).
        """
        if self.obs_packer.nested:
            obs_batch = self.obs_packer.as_batch(obs_batch)
        obs = self._obs_to_tensor(obs_batch)
        with torch.inference_mode():
            q_values = self.model(obs).float().cpu().numpy()
        actions = q_values.argmax(axis=1).astype(np.int64, copy=False)
        if explore:
            epsilon = self.epsilon
            if epsilon > 0.0:
                random_rows = self._rng.random(actions.shape[0]) < epsilon
                num_random = int(np.count_nonzero(random_rows))
                if num_random:
                    actions[random_rows] = self._random_actions(obs_batch, random_rows,
                                                                num_random)
        return actions, {Q_VALUES: q_values}

    def _random_actions(self, obs_batch: Any, rows: np.ndarray, count: int) -> np.ndarray:
        """Uniform random actions for ``rows`` of the batch: legal ones under a mask."""
        mask_keys = action_mask_keys(self.obs_packer.kept_space)
        if mask_keys is None:
            return self._rng.integers(self.num_actions, size=count)
        mask = np.asarray(obs_batch[mask_keys[0]])[rows].reshape(count, -1) != 0
        mask[~mask.any(axis=1)] = True
        # The argmax of uniform scores over the legal entries: a uniform legal action.
        scores = np.where(mask, self._rng.random(mask.shape), -1.0)
        return scores.argmax(axis=1)

    def value(self, obs_batch: np.ndarray) -> np.ndarray:
        """``max_a Q(obs, a)`` from the online net, shape ``[B]`` float32."""
        obs = self._obs_to_tensor(obs_batch)
        with torch.inference_mode():
            return self.model(obs).max(dim=1).values.float().cpu().numpy()

    # ---------------------------------------------------------- postprocessing
    def postprocess_trajectory(self, batch: SampleBatch) -> SampleBatch:
        """n-step transitions (:func:`adjust_nstep`) plus, optionally, initial priorities.

        Adds ``gammas`` (float32). With ``worker_side_prioritization`` also
        adds ``td_error`` = ``|TD error|`` per row (float32): on a remote worker from
        the Q values it acted on, else with this policy's current nets. Like the
        ``td_error`` stat of
        :meth:`learn_on_batch` it is the raw absolute error: the replay buffer
        adds ``prioritized_replay_eps`` when it turns it into priorities.
        """
        prioritize = bool(self.config.get("worker_side_prioritization"))
        # A remote worker reuses the Q values it acted on (see _td_error_from_acting_q):
        # Q(s_t) for every row and Q(s_t+n) for all but the rows whose n-step window
        # reaches the end of their piece, which saves three network passes per row.
        reuse_acting_q = (prioritize and batch.count > 0 and self._target_follows_online
                          and Q_VALUES in batch)
        if reuse_acting_q:  # before adjust_nstep rewrites terminateds and new_obs
            last = nstep_last_rows(batch, self.n_step)
            bootstraps_inside = last < _segment_ends(batch)
        adjust_nstep(batch, self.n_step, self.gamma)
        if not prioritize:
            return batch
        if batch.count == 0:
            batch[TD_ERROR] = np.zeros(0, dtype=np.float32)
        elif reuse_acting_q:
            batch[TD_ERROR] = self._td_error_from_acting_q(batch, last, bootstraps_inside)
        else:
            batch[TD_ERROR] = self.compute_td_error(batch)
        return batch

    @property
    def _target_follows_online(self) -> bool:
        """True on remote workers with worker-side priorities (see :meth:`set_weights`)."""
        return self.worker_index > 0 and bool(self.config.get("worker_side_prioritization"))

    def _td_error_from_acting_q(self, batch: SampleBatch, last: np.ndarray,
                                bootstraps_inside: np.ndarray) -> np.ndarray:
        """``|TD error|`` of the n-step rows of ``batch`` from its ``q_values`` column.

        Row ``t`` bootstraps from the observation of row ``last[t] + 1`` when that row
        is in the same episode segment (``bootstraps_inside``), whose acting Q values
        are in the batch; the other rows that are not terminated (truncated, or cut at
        the end of the fragment) get one forward pass over their distinct ``new_obs``.
        With the target net equal to the online net, double Q's target is the plain
        max. The values equal :meth:`compute_td_error` when the weights did not change
        between acting and postprocessing.
        """
        q_values = np.asarray(batch[Q_VALUES], dtype=np.float32)
        rows = np.arange(batch.count)
        actions = np.asarray(batch[SampleBatch.ACTIONS]).astype(np.int64, copy=False)
        q_selected = q_values[rows, actions]
        next_value = np.zeros(batch.count, dtype=np.float32)
        next_value[bootstraps_inside] = q_values[last[bootstraps_inside] + 1].max(axis=1)
        terminated = np.asarray(batch[SampleBatch.TERMINATEDS], dtype=bool)
        needs_pass = ~bootstraps_inside & ~terminated
        if needs_pass.any():
            # The rows of one window end share their new_obs: one pass per window end.
            _, first_rows, row_to_end = np.unique(
                last[needs_pass], return_index=True, return_inverse=True)
            new_obs = batch[SampleBatch.NEW_OBS][np.flatnonzero(needs_pass)[first_rows]]
            with torch.inference_mode():
                q_next = self.model(self._obs_to_tensor(new_obs)).float().cpu().numpy()
            next_value[needs_pass] = q_next.max(axis=1)[row_to_end]
        target = (np.asarray(batch[SampleBatch.REWARDS], dtype=np.float32)
                  + np.asarray(batch[GAMMAS], dtype=np.float32) * ~terminated * next_value)
        return np.abs(q_selected - target).astype(np.float32, copy=False)

    # ---------------------------------------------------------------- learning
    def _td_error(self, tensors: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_t_selected [B], td_error [B])`` (signed); grads flow through ``q_t`` only."""
        q_selected, target = self._q_and_target(tensors)
        return q_selected, q_selected - target

    def _q_and_target(self, tensors: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_t_selected [B], td_target [B])``; the target carries no gradient."""
        q_t = self.model(tensors[SampleBatch.OBS])
        q_selected = q_t.gather(1, tensors[SampleBatch.ACTIONS].view(-1, 1)).squeeze(1)
        new_obs = tensors[SampleBatch.NEW_OBS]
        with torch.no_grad():
            q_tp1_target = self.target_model(new_obs)
            q_tp1_online = self.model(new_obs) if self.double_q else None
            gammas = tensors.get(GAMMAS)
            if gammas is None:
                # No gammas column: rewards are assumed n-step sums with a full horizon.
                gammas = torch.full_like(q_selected, self.gamma**self.n_step)
            target = dqn_td_target(
                tensors[SampleBatch.REWARDS],
                tensors[SampleBatch.TERMINATEDS],
                gammas,
                q_tp1_target,
                q_tp1_online,
            )
        return q_selected, target

    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        """Importance-weighted Huber TD loss; stats include ``|td_error|`` per row."""
        q_selected, target = self._q_and_target(train_batch)
        td_error = q_selected - target
        # huber(q - target) straight from the pair: the same values as
        # huber_loss(td_error), without a zeros tensor to compare against.
        per_row = nn.functional.huber_loss(q_selected, target, reduction="none")
        weights = train_batch.get(SampleBatch.WEIGHTS)
        loss = (per_row * weights).mean() if weights is not None else per_row.mean()
        abs_td = td_error.detach().abs()
        q_detached = q_selected.detach()
        min_q, max_q = torch.aminmax(q_detached)
        stats: TensorDict = {
            "loss": loss.detach(),
            "mean_q": q_detached.mean(),
            "min_q": min_q,
            "max_q": max_q,
            "mean_td_error": abs_td.mean(),
            TD_ERROR: abs_td,  # per row: see per_row_stats
        }
        return loss, stats

    def compute_td_error(self, batch: SampleBatch) -> np.ndarray:
        """Absolute TD errors ``[B]`` (float32) of ``batch`` under the current nets; no update."""
        tensors = self._batch_to_tensors(batch)
        with torch.inference_mode():
            _, td_error = self._td_error(tensors)
        return td_error.abs().float().cpu().numpy()

    def update_target(self) -> None:
        """Copy the online net's weights into the target net."""
        self.target_model.load_state_dict(self.model.state_dict())

    # ------------------------------------------------------- weights and state
    def set_weights(self, weights: dict[str, Any]) -> None:
        """Load online-net weights (numpy arrays or tensors).

        A remote worker (``worker_index > 0``) never receives target weights;
        with ``worker_side_prioritization`` its target net follows the online
        net, so the initial priorities are not computed against the random
        initial target.
        """
        super().set_weights(weights)
        if self._target_follows_online:
            self.update_target()

    def get_state(self) -> dict[str, Any]:
        """Online + target weights, optimizer state, timestep (tensors and ints only)."""
        state = super().get_state()
        state["target_weights"] = {
            k: v.detach().cpu().clone() for k, v in self.target_model.state_dict().items()
        }
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` (no ``target_weights``: the target copies the online net)."""
        super().set_state(state)
        target = state.get("target_weights")
        if target is None:
            self.update_target()
        else:
            self.target_model.load_state_dict(
                {
                    k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v, copy=True))
                    for k, v in target.items()
                }
            )

    def export_module(self) -> nn.Module:
        """An eager CPU module ``raw obs batch -> argmax_a Q(obs, a)`` (int64 ``[B]``).

        A copy of the online Q network (dueling or plain) behind the current observation
        normalization: the greedy action of ``compute_actions(obs, explore=False)``.
        """
        from flowrl.policies.export import ArgmaxHead
        return self.with_obs_normalization(ArgmaxHead(copy.deepcopy(self.model).cpu().eval()))
