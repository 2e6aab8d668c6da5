"""DDPG (Lillicrap et al. 2016) and TD3 (Fujimoto et al. 2018) for ``Box`` action spaces.

The actor works in *normalized* action units: for every bounded dimension of
the action space it outputs ``u = tanh(.)`` in ``[-1, 1]``, mapped to the env as
``a = center + half_range * u`` (``center = (high + low) / 2``,
``half_range = (high - low) / 2``). Dimensions with an infinite bound are not
squashed (``a = u``). The critic sees ``concat(obs, u)``; exploration noise and
target smoothing noise are added in normalized units, so one noise scale fits
every action range.

Per train batch (after n-step postprocessing, :func:`flowrl.policies.dqn.adjust_nstep`)::

    u'         = actor_target(s')
    u'         = clip(u' + clip(N(0, target_noise), -c, c), -1, 1)   if smooth_target_policy
    q'         = min_k Q_target_k(s', u')  (twin_q)   else  Q_target_1(s', u')
    target     = r + gammas * (1 - terminated) * q'
    td_k       = Q_k(s, u) - stop_grad(target)
    critic_loss = mean(weights * sum_k l(td_k))      l = td^2 / 2 (MSE) or huber(td)
    actor_loss  = -mean(Q_1(s, actor(s)))            every policy_delay critic updates

``td_error`` (for prioritized replay) is ``|td_1|``. Target nets move by
:meth:`DDPGTorchPolicy.update_target`: ``target <- tau * online + (1 - tau) * target``.
In the DQN plan, ``UpdateTargetNetwork`` calls it every
``target_network_update_freq`` sampled steps; ``0`` means after every train step,
which is the usual DDPG/TD3 setting (one soft update per gradient step). It blends
on every call, independently of ``policy_delay`` (TD3 moves the targets only with
the delayed actor step; here the plan alone sets the frequency, and
``tau / policy_delay`` gives about the same target lag as TD3's delayed updates).

Exploration (``exploration_config``), in normalized units, clipped to the bounds:

* ``global timestep < random_timesteps``: uniform random actions (``N(0, 1)`` on
  unbounded dimensions);
* ``"gaussian"``: ``u + scale * s(t) * N(0, 1)``;
* ``"ou"``: ``u + ou_base_scale * s(t) * x_t`` with the discretised
  Ornstein-Uhlenbeck process ``x_{t+1} = x_t - ou_theta * x_t + ou_sigma * N(0, 1)``
  kept per row of the action batch (its stationary variance is
  ``ou_sigma^2 / (ou_theta * (2 - ou_theta))``; a new state is drawn from that
  distribution when the batch size changes, and for a row whose env starts a new
  episode: the sampler calls :meth:`DDPGTorchPolicy.on_episode_start`);
* ``s(t)`` goes linearly from ``initial_scale`` to ``final_scale`` over
  ``scale_timesteps`` steps after ``random_timesteps``. With
  ``per_worker_exploration`` (APEX_DDPG), remote worker ``i`` of ``N`` instead
  uses the constant Ape-X factor ``s = 0.4 ** (1 + 7 (i - 1) / (N - 1))``
  (:func:`flowrl.policies.dqn.per_worker_epsilon`); the learner keeps the schedule.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.policies.dqn import GAMMAS, TD_ERROR, adjust_nstep, huber_loss, per_worker_epsilon
from flowrl.policies.ddpg_networks import (_DEFAULT_EXPLORATION, ActionNormalizer, Actor,
                                           CriticEnsemble, DDPGModel, _adam, _ExportedActor,
                                           ddpg_td_target, linear_scale,
                                           ou_stationary_variance)
from flowrl.policies.filters import RunningStat
from flowrl.policies.policy import Policy, TensorDict, _to_cpu_copy
from flowrl.data.sample_batch import SampleBatch
from flowrl.data.spaces import action_mask_keys

__all__ = [
    "DDPGTorchPolicy",
    "DDPGModel",
    "Actor",
    "CriticEnsemble",
    "ActionNormalizer",
    "ddpg_td_target",
    "linear_scale",
    "ou_stationary_variance",
]


class DDPGTorchPolicy(Policy):
    """DDPG / TD3 policy for ``Box`` action spaces; a drop-in for the DQN and Ape-X plans.

    Config keys (fallbacks in :attr:`DEFAULT_CONFIG`; the algorithm config wins):

    * ``gamma`` (0.99), ``n_step`` (1): n-step returns via :func:`adjust_nstep`;
    * ``actor_hiddens`` ([256, 256]), ``actor_hidden_activation`` ("relu"),
      ``critic_hiddens`` ([256, 256]), ``critic_hidden_activation`` ("relu");
    * ``actor_lr`` (1e-3), ``critic_lr`` (1e-3): two Adam optimizers;
      ``l2_reg`` (1e-6): Adam weight decay (an L2 penalty ``l2_reg/2 ||theta||^2``)
      on both nets; ``grad_clip`` (None): max global grad norm, per net;
    * ``tau`` (0.005): soft target update of :meth:`update_target`;
    * ``twin_q`` (False), ``policy_delay`` (1), ``smooth_target_policy`` (False),
      ``target_noise`` (0.2), ``target_noise_clip`` (0.5): the TD3 options;
    * ``use_huber`` (False; MSE ``td^2/2``), ``huber_threshold`` (1.0);
    * ``exploration_config`` (see the module docstring; partial dicts are merged
      over the defaults), ``per_worker_exploration`` (False);
    * ``worker_side_prioritization`` (False): ``postprocess_trajectory`` adds ``td_error``;
    * ``worker_index`` / ``num_workers`` (set by the rollout worker), ``num_gpus``, ``seed``;
    * ``model``: ``conv_filters`` / ``conv_activation`` for image leaves; observations
      go through the catalog's :class:`~flowrl.policies.models.ObservationEncoder` (any
      Box, Discrete, MultiDiscrete, MultiBinary, Dict or Tuple); a ``custom_model`` is
      rejected rather than silently ignored.

    Learning uses the base class's SGD loop (:meth:`Policy.learn_on_batch`) with
    :meth:`sgd_step`: every minibatch is one critic update; the actor is updated
    after every ``policy_delay``-th critic update, with the just-updated critic.
    Stats (averaged over the last epoch's minibatches): ``critic_loss``,
    ``mean_q`` / ``max_q`` / ``min_q`` (of ``Q_1(s, a)`` for the batch's actions),
    ``mean_td_error``, ``critic_grad_gnorm`` (before clipping); ``actor_loss`` /
    ``actor_grad_gnorm`` of the most recent actor update (NaN before the first);
    ``cur_lr`` (critic) and ``cur_actor_lr``; ``num_critic_updates`` /
    ``num_actor_updates`` (totals); and ``td_error`` (a :attr:`per_row_stats`
    entry, ``np.ndarray [B]``): ``|td_1|`` of every row, in batch order, from the
    last epoch -- for the replay buffer's priority update. Target nets are not
    updated by learning; the plan calls :meth:`update_target`.

    :meth:`get_weights` / :meth:`set_weights` carry the online actor and critic(s);
    :meth:`get_state` adds target nets, both optimizers and the counters.
    ``self.optimizer`` is the critic's Adam (``self.critic_optimizer``), the
    actor's is ``self.actor_optimizer``.
    """

    DEFAULT_CONFIG: dict[str, Any] = {
        **Policy.DEFAULT_CONFIG,
        "gamma": 0.99,
        "n_step": 1,
        "actor_hiddens": [256, 256],
        "actor_hidden_activation": "relu",
        "critic_hiddens": [256, 256],
        "critic_hidden_activation": "relu",
        "actor_lr": 1e-3,
        "critic_lr": 1e-3,
        "tau": 0.005,
        "twin_q": False,
        "policy_delay": 1,
        "smooth_target_policy": False,
        "target_noise": 0.2,
        "target_noise_clip": 0.5,
        "use_huber": False,
        "huber_threshold": 1.0,
        "l2_reg": 1e-6,
        "grad_clip": None,
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
    #: ``|td_1|`` of every row, returned by learn_on_batch for priority updates.
    per_row_stats: tuple[str, ...] = (TD_ERROR,)

    def __init__(
        self, observation_space: gym.Space, action_space: gym.Space, config: dict[str, Any]
    ) -> None:
        if not isinstance(action_space, gym.spaces.Box):
            raise ValueError(
                f"DDPG, TD3 and APEX_DDPG support Box action spaces only, got "
                f"{action_space!r}; for Discrete actions use DQN, APEX or PPO, for "
                "MultiDiscrete, MultiBinary, Tuple or Dict actions PPO, A2C, A3C, PG, "
                "IMPALA or ES"
            )
        if action_mask_keys(observation_space) is not None:
            raise ValueError(
                f"DDPG, TD3 and APEX_DDPG take Box actions, which an action_mask cannot "
                f"mask; the observation space {observation_space!r} has one. Use "
                "PPO or DQN for masked Discrete actions")
        model_config = (config or {}).get("model") or {}
        if model_config.get("custom_model") is not None:
            raise ValueError(
                "DDPGTorchPolicy builds its own actor and critic MLPs (actor_hiddens, "
                f"critic_hiddens); model.custom_model={model_config['custom_model']!r} "
                "is not supported"
            )
        self.normalizer = ActionNormalizer(action_space)
        if ((config or {}).get("model") or {}).get("use_lstm"):
            raise ValueError(
                "DDPG, TD3 and APEX_DDPG replay single transitions and have no recurrent replay; "
                "model.use_lstm is for the on-policy algorithms PPO, A2C, A3C, PG and "
                "IMPALA")
        # Made after the model (below); optimizer_lrs() runs during the base __init__.
        self.actor_optimizer: torch.optim.Optimizer | None = None
        super().__init__(observation_space, action_space, config)
        cfg = self.config
        self.act_dim = int(np.prod(action_space.shape))
        self.gamma = float(cfg["gamma"])
        self.n_step = int(cfg["n_step"])
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.n_step}")
        self.tau = float(cfg["tau"])
        self.twin_q = bool(cfg["twin_q"])
        self.policy_delay = int(cfg["policy_delay"])
        if self.policy_delay < 1:
            raise ValueError(f"policy_delay must be >= 1, got {self.policy_delay}")
        self.smooth_target_policy = bool(cfg["smooth_target_policy"])
        self.target_noise = float(cfg["target_noise"])
        self.target_noise_clip = float(cfg["target_noise_clip"])
        self.use_huber = bool(cfg["use_huber"])
        self.huber_threshold = float(cfg["huber_threshold"])

        self.exploration_config = {**_DEFAULT_EXPLORATION, **(cfg.get("exploration_config") or {})}
        self.exploration_type = str(self.exploration_config["type"]).lower()
        if self.exploration_type not in ("gaussian", "ou"):
            raise ValueError(
                f"exploration_config['type']={self.exploration_config['type']!r}; "
                "expected 'gaussian' or 'ou'"
            )
        self.worker_index = int(cfg.get("worker_index") or 0)
        self.num_workers = int(cfg.get("num_workers") or 0)
        # APEX_DDPG: a fixed noise factor on remote workers; the learner keeps the schedule.
        self._fixed_scale: float | None = None
        if cfg.get("per_worker_exploration") and self.worker_index > 0:
            self._fixed_scale = per_worker_epsilon(self.worker_index, max(self.num_workers, 1))
        seed = cfg.get("seed")
        if seed is not None:
            # Distinct exploration streams per worker even though they share config["seed"].
            self._rng = np.random.default_rng(int(seed) + 1000 * self.worker_index)
        self._ou_state: np.ndarray | None = None

        self.critic_optimizer = self.optimizer
        self.actor_optimizer = _adam(
            list(self.model.actor.parameters()), float(cfg["actor_lr"]), float(cfg["l2_reg"])
        )
        self.apply_hyperparameters()  # lr_schedule, if any, for the actor too
        self._actor_params = list(self.model.actor.parameters())
        self._critic_params = list(self.model.critic.parameters())
        self.target_model: DDPGModel = copy.deepcopy(self.model)
        self.target_model.requires_grad_(False)
        self._target_params = list(self.target_model.parameters())
        self._online_params = list(self.model.parameters())
        self.num_critic_updates = 0
        self.num_actor_updates = 0
        self._last_actor_loss = torch.tensor(float("nan"), device=self.device)
        self._last_actor_gnorm = torch.tensor(float("nan"), device=self.device)

    # ------------------------------------------------------------ construction
    def optimizer_lrs(self) -> list[tuple[torch.optim.Optimizer, float]]:
        """The critic's optimizer with ``critic_lr`` and the actor's with ``actor_lr``
        (an ``lr_schedule`` sets both to its value)."""
        pairs = [(self.optimizer, float(self.config["critic_lr"]))]
        if self.actor_optimizer is not None:
            pairs.append((self.actor_optimizer, float(self.config["actor_lr"])))
        return pairs

    def make_model(self) -> nn.Module:
        """The online :class:`DDPGModel` (the target nets are a copy of it)."""
        return DDPGModel(self.obs_packer.kept_space, self.action_space, self.config,
                         self.normalizer)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The critic's Adam (``critic_lr``, weight decay ``l2_reg``); the actor's comes later."""
        return _adam(
            list(self.model.critic.parameters()),
            float(self.config["critic_lr"]),
            float(self.config["l2_reg"]),
        )

    # ------------------------------------------------------------- exploration
    @property
    def exploration_scale(self) -> float:
        """Noise multiplier ``s(t)``: the per-worker constant, else the linear schedule."""
        if self._fixed_scale is not None:
            return self._fixed_scale
        cfg = self.exploration_config
        return linear_scale(
            self.global_timestep,
            float(cfg["initial_scale"]),
            float(cfg["final_scale"]),
            int(cfg["random_timesteps"]),
            int(cfg["scale_timesteps"]),
        )

    @property
    def noise_stddev(self) -> float:
        """Current std of the exploration noise in normalized units (OU: stationary std)."""
        cfg = self.exploration_config
        if self.exploration_type == "gaussian":
            return float(cfg["scale"]) * self.exploration_scale
        var = ou_stationary_variance(float(cfg["ou_theta"]), float(cfg["ou_sigma"]))
        return float(cfg["ou_base_scale"]) * self.exploration_scale * float(np.sqrt(var))

    def _stationary_ou_draw(self, rows: int) -> np.ndarray:
        """Fresh OU states ``[rows, act_dim]`` from the process's stationary distribution.

        A fresh state starts there rather than at 0, so the noise has its long-run
        variance from an episode's first step."""
        cfg = self.exploration_config
        std = np.sqrt(ou_stationary_variance(float(cfg["ou_theta"]), float(cfg["ou_sigma"])))
        return self._rng.normal(0.0, std, size=(rows, self.act_dim))

    def _ou_step(self, batch_size: int) -> np.ndarray:
        """Advance the per-row OU state ``[B, act_dim]`` one step and return it."""
        cfg = self.exploration_config
        theta, sigma = float(cfg["ou_theta"]), float(cfg["ou_sigma"])
        shape = (batch_size, self.act_dim)
        if self._ou_state is None or self._ou_state.shape != shape:
            self._ou_state = self._stationary_ou_draw(batch_size)
        self._ou_state += -theta * self._ou_state + sigma * self._rng.standard_normal(shape)
        return self._ou_state

    def on_episode_start(self, rows: Sequence[int]) -> None:
        """The sampler's batch ``rows`` began new episodes: their OU state is redrawn
        from the stationary distribution, independent of the episode that ended.

        The other rows keep theirs. Nothing to do for Gaussian noise, before the
        first OU step, or for a row beyond the current state (a batch of another
        size redraws every row at its first step anyway)."""
        if self._ou_state is None:
            return
        rows = [row for row in rows if row < len(self._ou_state)]
        if rows:
            self._ou_state[rows] = self._stationary_ou_draw(len(rows))

    # ------------------------------------------------------------------ acting
    def compute_actions(
        self, obs_batch: np.ndarray, explore: bool = True
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Actions ``float32 [B, *action_shape]`` within the bounds, and no extra columns.

        ``explore=False``: the deterministic actor output. ``explore=True``: uniform
        random actions before ``random_timesteps``, then actor + Gaussian / OU
        noise in normalized units (see the module docstring), clipped to the bounds.
        """
        obs = self._obs_to_tensor(obs_batch)
        with torch.inference_mode():
            u = self.model.actor(obs).float().cpu().numpy()
        if explore:
            u = self._explore(u)
        actions = self.normalizer.to_env(u)
        return actions.reshape((actions.shape[0], *self._action_shape)), {}

    def _explore(self, u: np.ndarray) -> np.ndarray:
        cfg = self.exploration_config
        shape = u.shape
        if self.global_timestep < int(cfg["random_timesteps"]):
            uniform = self._rng.uniform(-1.0, 1.0, size=shape)
            if self.normalizer.all_bounded:
                return uniform.astype(np.float32)
            return np.where(
                self.normalizer.bounded, uniform, self._rng.standard_normal(shape)
            ).astype(np.float32)
        if self.exploration_type == "gaussian":
            stddev = float(cfg["scale"]) * self.exploration_scale
            noise = stddev * self._rng.standard_normal(shape)
        else:
            noise = (float(cfg["ou_base_scale"]) * self.exploration_scale) * self._ou_step(shape[0])
        return self.normalizer.clip_normalized(u + noise).astype(np.float32)

    def value(self, obs_batch: np.ndarray) -> np.ndarray:
        """``Q_1(obs, actor(obs))`` from the online nets, shape ``[B]`` float32."""
        obs = self._obs_to_tensor(obs_batch)
        with torch.inference_mode():
            return self.model.critic(obs, self.model.actor(obs), num=1)[0].float().cpu().numpy()

    # ---------------------------------------------------------- postprocessing
    def postprocess_trajectory(self, batch: SampleBatch) -> SampleBatch:
        """n-step transitions (:func:`adjust_nstep`, adds ``gammas``) plus optional priorities.

        With ``worker_side_prioritization`` also adds ``td_error`` = ``|TD error|``
        of the first critic per row (float32) under this policy's current nets
        (the replay buffer adds ``prioritized_replay_eps``).
        """
        adjust_nstep(batch, self.n_step, self.gamma)
        if self.config.get("worker_side_prioritization"):
            if batch.count:
                batch[TD_ERROR] = self.compute_td_error(batch)
            else:
                batch[TD_ERROR] = np.zeros(0, dtype=np.float32)
        return batch

    # ---------------------------------------------------------------- learning
    def _loss_array(self, column: str, arr: np.ndarray) -> np.ndarray:
        """Actions become normalized units (see :class:`ActionNormalizer`)."""
        if column == SampleBatch.ACTIONS:
            return self.normalizer.to_normalized(arr.reshape(arr.shape[0], -1))
        return super()._loss_array(column, arr)

    def _clip_unit(self, u: torch.Tensor) -> torch.Tensor:
        """Clip normalized actions to ``[-1, 1]`` on the bounded dimensions."""
        norm = self.normalizer
        if norm.all_bounded:
            return u.clamp(-1.0, 1.0)
        if norm.none_bounded:
            return u
        return torch.where(self.model.actor.bounded, u.clamp(-1.0, 1.0), u)

    def _td_target(self, tensors: TensorDict, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Critic target ``[B]`` from the target nets (no grad); see the module docstring.

        ``noise``: standard-normal draws ``[B, act_dim]`` for target policy
        smoothing (drawn here from torch's RNG when None; unused without smoothing).
        """
        new_obs = tensors[SampleBatch.NEW_OBS]
        rewards = tensors[SampleBatch.REWARDS]
        with torch.no_grad():
            u_next = self.target_model.actor(new_obs)
            if self.smooth_target_policy:
                eps = torch.randn_like(u_next) if noise is None else noise.to(u_next)
                clip = self.target_noise_clip
                eps = (eps * self.target_noise).clamp(-clip, clip)
                u_next = self._clip_unit(u_next + eps)
            q_next = self.target_model.critic(new_obs, u_next)
            gammas = tensors.get(GAMMAS)
            if gammas is None:
                # No gammas column: rewards are assumed n-step sums with a full horizon.
                gammas = torch.full_like(rewards, self.gamma**self.n_step)
            return ddpg_td_target(rewards, tensors[SampleBatch.TERMINATEDS], gammas, q_next)

    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        """Critic loss on one minibatch (weighted, summed over critics) and its stats,
        ``|td_error|`` of the first critic per row included (:attr:`per_row_stats`)."""
        target = self._td_target(train_batch)
        q = self.model.critic(train_batch[SampleBatch.OBS], train_batch[SampleBatch.ACTIONS])
        td = q - target  # [K, B]
        if self.use_huber:
            per_row = huber_loss(td, self.huber_threshold).sum(dim=0)
        else:
            per_row = 0.5 * td.square().sum(dim=0)
        weights = train_batch.get(SampleBatch.WEIGHTS)
        loss = (per_row * weights).mean() if weights is not None else per_row.mean()
        abs_td = td[0].detach().abs()
        q1 = q[0].detach()
        stats: TensorDict = {
            "critic_loss": loss.detach(),
            "mean_q": q1.mean(),
            "max_q": q1.max(),
            "min_q": q1.min(),
            "mean_td_error": abs_td.mean(),
            TD_ERROR: abs_td,  # per row: see per_row_stats
        }
        return loss, stats

    def actor_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """``-mean(Q_1(s, actor(s)))`` (grads reach the actor through the critic)."""
        return -self.model.critic(obs, self.model.actor(obs), num=1).mean()

    def _clip_grads(self, params: list[nn.Parameter]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        clip = self.config.get("grad_clip")
        if clip is not None:
            return nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], float(clip), foreach=True
            )
        return nn.utils.get_total_norm(grads, foreach=True)

    def _critic_backward(self, minibatch: TensorDict) -> TensorDict:
        loss, stats = self.loss(minibatch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["critic_grad_gnorm"] = self._clip_grads(self._critic_params).detach()
        return stats

    def _actor_backward(self, obs: torch.Tensor) -> None:
        loss = self.actor_loss(obs)
        # autograd.grad w.r.t. the actor only: no critic weight grads are built or touched.
        grads = torch.autograd.grad(loss, self._actor_params)
        for param, grad in zip(self._actor_params, grads):
            param.grad = grad
        self._last_actor_gnorm = self._clip_grads(self._actor_params).detach()
        self._last_actor_loss = loss.detach()

    def sgd_step(self, minibatch: TensorDict) -> TensorDict:
        """One critic step; one actor step every ``policy_delay`` critic steps (TD3 order).

        The actor step uses the just-updated critic. This is the update of the base
        class's SGD loop (:meth:`Policy.learn_on_batch`)."""
        stats = self._critic_backward(minibatch)
        self.critic_optimizer.step()
        self.num_critic_updates += 1
        if self.num_critic_updates % self.policy_delay == 0:
            self._actor_backward(minibatch[SampleBatch.OBS])
            self.actor_optimizer.step()
            self.num_actor_updates += 1
        return stats

    def _latest_learn_stats(self) -> TensorDict:
        """The most recent actor update's loss and grad norm (NaN before the first)."""
        return {"actor_loss": self._last_actor_loss, "actor_grad_gnorm": self._last_actor_gnorm}

    def _extra_learn_stats(self) -> dict[str, Any]:
        return {
            "cur_actor_lr": float(self.actor_optimizer.param_groups[0]["lr"]),
            "num_critic_updates": self.num_critic_updates,
            "num_actor_updates": self.num_actor_updates,
        }

    def evaluate_loss(self, batch: SampleBatch) -> dict[str, float]:
        """Critic and actor loss stats on the whole ``batch`` without updating anything."""
        tensors = self._batch_to_tensors(batch)
        with torch.no_grad():
            _, stats = self.loss(tensors)
            stats["actor_loss"] = self.actor_loss(tensors[SampleBatch.OBS])
        return {k: float(v) for k, v in stats.items() if k not in self.per_row_stats}

    def compute_gradients(self, batch: SampleBatch) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Critic and actor gradients on the whole ``batch`` (after ``grad_clip``), as numpy.

        Ordered like ``model.parameters()`` (actor first, then critic). The actor
        gradient uses the current critic and is always computed;
        :meth:`apply_gradients` decides (``policy_delay``) whether to use it.
        Stats as in :meth:`learn_on_batch`. Nothing is updated.
        """
        tensors = self._batch_to_tensors(batch)
        stats = self._critic_backward(tensors)
        self._actor_backward(tensors[SampleBatch.OBS])
        per_row = self._whole_batch_per_row(stats, batch.count)
        grads = [
            p.grad.detach().cpu().numpy().copy()
            if p.grad is not None
            else np.zeros(tuple(p.shape), dtype=np.float32)
            for p in self._online_params
        ]
        return grads, self._summarize([stats], per_row)

    def apply_gradients(self, grads: list[np.ndarray],
                        obs_stats: RunningStat | None = None) -> None:
        """Apply :meth:`compute_gradients` output: a critic step, and an actor step
        every ``policy_delay``-th call (the same counter as :meth:`learn_on_batch`);
        then ``obs_stats`` into the observation filter (see :meth:`Policy.apply_gradients`)."""
        self._set_grads(self._online_params, grads)
        self.critic_optimizer.step()
        self.num_critic_updates += 1
        if self.num_critic_updates % self.policy_delay == 0:
            self.actor_optimizer.step()
            self.num_actor_updates += 1
        self.merge_observation_stats(obs_stats)

    def compute_td_error(self, batch: SampleBatch) -> np.ndarray:
        """``|td_1|`` ``[B]`` (float32) of ``batch`` under the current nets; no update.

        The target is the one the critic loss uses (smoothing noise included).
        """
        tensors = self._batch_to_tensors(batch)
        with torch.inference_mode():
            target = self._td_target(tensors)
            q1 = self.model.critic(tensors[SampleBatch.OBS], tensors[SampleBatch.ACTIONS], num=1)[0]
        return (q1 - target).abs().float().cpu().numpy()

    def compute_td_target(self, batch: SampleBatch, noise: np.ndarray | None = None) -> np.ndarray:
        """The critic target ``[B]`` (float32) for ``batch`` from the target nets.

        ``noise``: standard-normal draws ``[B, act_dim]`` for target policy
        smoothing (default: fresh draws from torch's RNG).
        """
        tensors = self._batch_to_tensors(batch)
        noise_t = None if noise is None else torch.as_tensor(np.asarray(noise, dtype=np.float32))
        return self._td_target(tensors, noise_t).float().cpu().numpy()

    def update_target(self, tau: float | None = None) -> None:
        """Soft update ``target <- tau * online + (1 - tau) * target`` (``tau`` default config).

        ``tau >= 1`` copies the online nets. The plan decides how often this runs
        (``target_network_update_freq``; 0 = after every train step).
        """
        tau = self.tau if tau is None else float(tau)
        with torch.no_grad():
            if tau >= 1.0:
                torch._foreach_copy_(self._target_params, self._online_params)
            else:
                torch._foreach_lerp_(self._target_params, self._online_params, tau)

    # ------------------------------------------------------- weights and state
    def set_weights(self, weights: dict[str, Any]) -> None:
        """Load online actor + critic weights (numpy arrays or tensors).

        A remote worker (``worker_index > 0``) never receives target weights;
        with ``worker_side_prioritization`` its target nets copy the online ones,
        so the initial priorities are not computed against random target nets.
        """
        super().set_weights(weights)
        if self.worker_index > 0 and self.config.get("worker_side_prioritization"):
            self.update_target(tau=1.0)

    def get_state(self) -> dict[str, Any]:
        """Online + target weights, both optimizers, timestep and update counters.

        Tensors and ints only: loads with ``torch.load(..., weights_only=True)``.
        """
        return {
            "weights": self._weights_state(),  # the observation filter's statistics too
            "target_weights": {
                k: v.detach().cpu().clone() for k, v in self.target_model.state_dict().items()
            },
            "critic_optimizer": _to_cpu_copy(self.critic_optimizer.state_dict()),
            "actor_optimizer": _to_cpu_copy(self.actor_optimizer.state_dict()),
            "global_timestep": int(self.global_timestep),
            "num_critic_updates": int(self.num_critic_updates),
            "num_actor_updates": int(self.num_actor_updates),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` (no ``target_weights``: the targets copy the online nets)."""
        self.set_weights(state["weights"])
        target = state.get("target_weights")
        if target is None:
            self.update_target(tau=1.0)
        else:
            self.target_model.load_state_dict(
                {
                    k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v, copy=True))
                    for k, v in target.items()
                }
            )
        # load_state_dict moves optimizer state onto the parameters' device.
        if state.get("critic_optimizer") is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if state.get("actor_optimizer") is not None:
            self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.global_timestep = int(state.get("global_timestep", 0))
        self.apply_hyperparameters()  # this policy's actor / critic lrs, not the saved ones
        self.num_critic_updates = int(state.get("num_critic_updates", 0))
        self.num_actor_updates = int(state.get("num_actor_updates", 0))

    def export(self, export_dir: str) -> str:
        """TorchScript of :class:`DDPGModel`: raw obs ``[B, ...]`` -> env actions ``[B, A]``."""
        return super().export(export_dir)

    def export_module(self) -> nn.Module:
        """An eager CPU module ``raw obs batch -> deterministic env actions [B, *shape]``.

        A copy of the online actor behind the current observation normalization,
        mapped from normalized units to the action bounds and clipped as
        :meth:`compute_actions` does with ``explore=False``.
        """
        return self.with_obs_normalization(_ExportedActor(
            copy.deepcopy(self.model.actor).cpu().eval(), self.normalizer, self.action_space))
