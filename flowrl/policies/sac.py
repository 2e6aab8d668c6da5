"""Soft Actor-Critic (Haarnoja et al. 2018, with automatic entropy tuning) for ``Box``
actions, and its discrete-action variant (Christodoulou 2019) for ``Discrete`` ones.

Per train batch (after n-step postprocessing, :func:`flowrl.policies.dqn.adjust_nstep`),
with ``alpha = exp(log_alpha)`` held fixed within one update::

    Box (u: normalized actions, see flowrl.policies.sac_networks)
      u', logp'   ~ pi(s')                          reparameterized, tanh-squashed
      target      = r + gammas (1 - terminated) (min_k Q_target_k(s', u') - alpha logp')
      critic_loss = mean(weights * sum_k (Q_k(s, u) - target)^2 / 2)
      u~, logp    ~ pi(s)                           (after the critic step)
      actor_loss  = mean(alpha logp - min_k Q_k(s, u~))
      alpha_loss  = -mean(log_alpha (logp + target_entropy))        logp held constant

    Discrete (expectations over the n actions instead of samples)
      V(s')       = sum_a pi(a|s') (min_k Q_target_k(s', a) - alpha log pi(a|s'))
      target      = r + gammas (1 - terminated) V(s')
      critic_loss = mean(weights * sum_k (Q_k(s, a) - target)^2 / 2)
      actor_loss  = mean(sum_a pi(a|s) (alpha log pi(a|s) - min_k Q_k(s, a)))
      alpha_loss  = -mean(log_alpha (target_entropy - H(pi(.|s))))

The soft target uses the entropy of the bootstrap state only: with ``n_step > 1`` the
rewards in between carry no entropy bonus. Each minibatch is one critic step, then one
actor step (against the just-updated critics; grads reach the actor only), then one
temperature step. Target critics move by :meth:`SACTorchPolicy.update_target`
(``target <- tau * online + (1 - tau) * target``), which the DQN plan calls after
every train step by default (``target_network_update_freq: 0``).

Target entropy (``target_entropy``: a number, or None / ``"auto"``):

* ``Box``: ``-dim(A)``, the usual choice (in normalized units, so the bounds do not
  change it);
* ``Discrete``: ``DISCRETE_TARGET_ENTROPY_FRACTION * log(n)`` = ``0.5 log(n)``, half
  the entropy of the uniform policy. The discrete SAC paper's ``0.98 log(n)`` sits so
  close to the maximum that the temperature keeps growing until the policy is nearly
  uniform; half lets the policy commit (for two actions: about 90% on the preferred
  one) and still keeps it stochastic.

Exploration: the sampled policy itself; before the global timestep reaches
``exploration_config["random_timesteps"]``, uniform random actions (uniform in the
bounds on bounded Box dimensions, ``N(0, 1)`` on unbounded ones). Remote workers draw
their noise from ``seed + 1000 * worker_index``. ``explore=False``: the greedy action,
``squash(mean)`` scaled to the bounds, or the argmax of the logits.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.sample_batch import SampleBatch
from flowrl.data.spaces import action_mask_keys
from flowrl.policies.ddpg_networks import ActionNormalizer, _adam, _ExportedActor
from flowrl.policies.dqn import GAMMAS, TD_ERROR, adjust_nstep
from flowrl.policies.export import ArgmaxHead
from flowrl.policies.filters import RunningStat
from flowrl.policies.nested import num_rows
from flowrl.policies.policy import Policy, TensorDict, _to_cpu_copy, _total_norm_and_clip
from flowrl.policies.sac_networks import (GreedyUnitAction, SACModel, discrete_sac_td_target,
                                          sac_td_target)

__all__ = ["SACTorchPolicy", "resolve_target_entropy", "DISCRETE_TARGET_ENTROPY_FRACTION"]

#: ``target_entropy: "auto"`` for ``Discrete(n)`` is this fraction of ``log(n)``.
DISCRETE_TARGET_ENTROPY_FRACTION = 0.5

_DEFAULT_EXPLORATION: dict[str, Any] = {"random_timesteps": 0}


def resolve_target_entropy(value: Any, action_space: gym.Space) -> float:
    """The target entropy for ``action_space``: ``value`` itself when it is a number;
    for None or ``"auto"``, ``-dim(A)`` (Box) or ``0.5 log(n)`` (Discrete)."""
    if value is None or value == "auto":
        if isinstance(action_space, gym.spaces.Discrete):
            return DISCRETE_TARGET_ENTROPY_FRACTION * math.log(int(action_space.n))
        return -float(np.prod(action_space.shape))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"target_entropy={value!r}; expected a number, 'auto' or None")
    return float(value)


def check_sac_spaces(observation_space: gym.Space, action_space: gym.Space,
                     config: dict[str, Any]) -> None:
    """Raises ``ValueError`` for what SAC cannot learn, naming the alternatives."""
    if not isinstance(action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise ValueError(
            f"SAC supports Box and Discrete action spaces only, got {action_space!r}; for "
            "MultiDiscrete, MultiBinary, Tuple or Dict actions use PPO, A2C, A3C, PG, "
            "IMPALA or ES")
    if action_mask_keys(observation_space) is not None:
        raise ValueError(
            f"SAC does not mask actions; the observation space {observation_space!r} has "
            "an action_mask. Use PPO or DQN for masked Discrete actions")
    model_config = (config or {}).get("model") or {}
    if model_config.get("use_lstm"):
        raise ValueError(
            "SAC replays single transitions and has no recurrent replay; model.use_lstm "
            "is for the on-policy algorithms PPO, A2C, A3C, PG and IMPALA")
    if model_config.get("custom_model") is not None:
        raise ValueError(
            "SAC builds its own actor and critic MLPs (actor_hiddens, critic_hiddens); "
            f"model.custom_model={model_config['custom_model']!r} is not supported")


class SACTorchPolicy(Policy):
    """SAC for ``Box`` (squashed Gaussian) and ``Discrete`` (categorical) actions; a
    drop-in for the DQN replay plan.

    Config keys (fallbacks in :attr:`DEFAULT_CONFIG`; the algorithm config wins):

    * ``gamma`` (0.99), ``n_step`` (1): n-step returns via :func:`adjust_nstep`;
    * ``actor_hiddens`` / ``critic_hiddens`` ([256, 256]), ``actor_hidden_activation`` /
      ``critic_hidden_activation`` ("relu"); ``twin_q`` (True): two critics, the
      minimum in targets and in the actor loss;
    * ``actor_lr``, ``critic_lr``, ``alpha_lr`` (3e-4 each): three Adam optimizers
      (``alpha_lr: 0`` keeps alpha at ``initial_alpha``); ``l2_reg`` (0): Adam weight
      decay on the actor and critics; ``grad_clip`` (None): max global grad norm, per
      net; an ``lr_schedule`` sets the actor's and critics' lrs, not alpha's;
    * ``tau`` (0.005): soft target update of :meth:`update_target`;
    * ``initial_alpha`` (1.0), ``target_entropy`` (None = "auto"; see the module doc);
    * ``exploration_config``: ``{"random_timesteps": 0}``;
    * ``worker_index`` / ``num_workers`` (set by the rollout worker), ``num_gpus``,
      ``seed``, ``observation_filter``;
    * ``model``: ``conv_filters`` / ``conv_activation`` for image leaves; observations of
      any space go through the catalog's :class:`~flowrl.policies.models.ObservationEncoder`.
      ``use_lstm``, ``custom_model`` and ``action_mask`` observations are rejected.

    Learning uses the base class's SGD loop (:meth:`Policy.learn_on_batch`) with
    :meth:`sgd_step`. Stats (averaged over the last epoch's minibatches):
    ``critic_loss``, ``actor_loss``, ``alpha_loss``, ``alpha`` (used in the update),
    ``entropy`` (``-logp`` of the actor's samples; the categorical entropy for
    Discrete), ``mean_q`` / ``min_q`` / ``max_q`` (``Q_1`` of the batch's actions),
    ``mean_td_error``, ``critic_grad_gnorm``, ``actor_grad_gnorm`` (before clipping);
    ``cur_lr`` (critic), ``cur_actor_lr``, ``cur_alpha_lr``, ``target_entropy``,
    ``num_updates``; and ``td_error`` (:attr:`per_row_stats`, ``np.ndarray [B]``):
    ``|Q_1 - target|`` per row, in batch order, for prioritized replay.

    :meth:`get_weights` / :meth:`set_weights` carry the online actor and critics (and
    the observation filter); :meth:`get_state` adds the target critics, the three
    optimizers, ``log_alpha`` and the counters. ``self.optimizer`` is the critics'
    Adam (also ``self.critic_optimizer``); ``self.actor_optimizer`` and
    ``self.alpha_optimizer`` are the others.
    """

    DEFAULT_CONFIG: dict[str, Any] = {
        **Policy.DEFAULT_CONFIG,
        "gamma": 0.99,
        "n_step": 1,
        "actor_hiddens": [256, 256],
        "actor_hidden_activation": "relu",
        "critic_hiddens": [256, 256],
        "critic_hidden_activation": "relu",
        "actor_lr": 3e-4,
        "critic_lr": 3e-4,
        "alpha_lr": 3e-4,
        "tau": 0.005,
        "twin_q": True,
        "initial_alpha": 1.0,
        "target_entropy": None,
        "l2_reg": 0.0,
        "grad_clip": None,
        "exploration_config": dict(_DEFAULT_EXPLORATION),
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
    IN_PLACE_KEYS = Policy.IN_PLACE_KEYS | {"alpha_lr"}

    def __init__(
        self, observation_space: gym.Space, action_space: gym.Space, config: dict[str, Any]
    ) -> None:
        check_sac_spaces(observation_space, action_space, config)
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.normalizer = None if self.discrete else ActionNormalizer(action_space)
        # Made after the model (below); optimizer_lrs() runs during the base __init__.
        self.actor_optimizer: torch.optim.Optimizer | None = None
        self.alpha_optimizer: torch.optim.Optimizer | None = None
        super().__init__(observation_space, action_space, config)
        cfg = self.config
        self.n_step = int(cfg["n_step"])
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.n_step}")
        initial_alpha = float(cfg["initial_alpha"])
        if initial_alpha <= 0:
            raise ValueError(f"initial_alpha must be > 0, got {initial_alpha}")
        self.target_entropy = resolve_target_entropy(cfg["target_entropy"], action_space)
        self.exploration_config = {**_DEFAULT_EXPLORATION, **(cfg.get("exploration_config") or {})}
        self.worker_index = int(cfg.get("worker_index") or 0)
        seed = cfg.get("seed")
        if seed is not None:
            # Distinct exploration streams per worker even though they share config["seed"].
            self._rng = np.random.default_rng(int(seed) + 1000 * self.worker_index)

        self.critic_optimizer = self.optimizer
        self._actor_params = list(self.model.actor.parameters())
        self._critic_params = list(self.model.critic.parameters())
        self.actor_optimizer = _adam(self._actor_params, float(cfg["actor_lr"]),
                                     float(cfg["l2_reg"]))
        self.log_alpha = torch.tensor(math.log(initial_alpha), dtype=torch.float32,
                                      device=self.device, requires_grad=True)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=float(cfg["alpha_lr"]))
        self.apply_hyperparameters()  # lr_schedule, if any, for the actor too
        self.target_critic: nn.Module = copy.deepcopy(self.model.critic)
        self.target_critic.requires_grad_(False)
        self._target_params = list(self.target_critic.parameters())
        self.num_updates = 0

    # ------------------------------------------------------------ construction
    def make_model(self) -> nn.Module:
        """The online :class:`~flowrl.policies.sac_networks.SACModel` (actor + critics)."""
        return SACModel(self.obs_packer.kept_space, self.action_space, self.config,
                        self.normalizer)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The critics' Adam (``critic_lr``, weight decay ``l2_reg``); the actor's and the
        temperature's come later."""
        return _adam(list(self.model.critic.parameters()), float(self.config["critic_lr"]),
                     float(self.config["l2_reg"]))

    def optimizer_lrs(self) -> list[tuple[torch.optim.Optimizer, float]]:
        """The critics' optimizer with ``critic_lr`` and the actor's with ``actor_lr``
        (an ``lr_schedule`` sets both); the temperature's follows ``alpha_lr`` alone
        (:meth:`apply_hyperparameters`)."""
        pairs = [(self.optimizer, float(self.config["critic_lr"]))]
        if self.actor_optimizer is not None:
            pairs.append((self.actor_optimizer, float(self.config["actor_lr"])))
        return pairs

    def apply_hyperparameters(self) -> None:
        """The base class's lrs and schedules, then ``alpha_lr`` for the temperature."""
        super().apply_hyperparameters()
        if self.alpha_optimizer is not None:
            for group in self.alpha_optimizer.param_groups:
                group["lr"] = float(self.config["alpha_lr"])

    @property
    def alpha(self) -> torch.Tensor:
        """The current temperature ``exp(log_alpha)`` (a detached scalar tensor)."""
        return self.log_alpha.detach().exp()

    # ------------------------------------------------------------------ acting
    def compute_actions(
        self, obs_batch: Any, explore: bool = True
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Sampled (``explore``) or greedy actions, and no extra columns.

        Box: float32 ``[B, *action_shape]`` within the bounds; Discrete: int64 ``[B]``.
        The noise comes from this policy's numpy RNG (per worker), not torch's.
        """
        obs = self._obs_to_tensor(obs_batch)
        random_steps = int(self.exploration_config["random_timesteps"])
        if explore and self.global_timestep < random_steps:
            return self._random_actions(num_rows(obs)), {}
        with torch.inference_mode():
            if self.discrete:
                logits = self.model.actor(obs).float().cpu().numpy()
                if explore:  # Gumbel-max: one categorical draw per row
                    logits = logits + self._rng.gumbel(size=logits.shape)
                return logits.argmax(axis=1).astype(np.int64), {}
            mean, log_std = self.model.actor(obs)
            x = mean
            if explore:
                eps = torch.from_numpy(
                    self._rng.standard_normal(mean.shape).astype(np.float32)).to(mean.device)
                x = mean + torch.exp(log_std) * eps
            u = self.model.actor.squash(x).float().cpu().numpy()
        actions = self.normalizer.to_env(u)
        return actions.reshape((actions.shape[0], *self._action_shape)), {}

    def _random_actions(self, count: int) -> np.ndarray:
        """Uniform random actions (``N(0, 1)`` on unbounded Box dimensions)."""
        if self.discrete:
            return self._rng.integers(int(self.action_space.n), size=count).astype(np.int64)
        shape = (count, int(np.prod(self._action_shape)))
        u = self._rng.uniform(-1.0, 1.0, size=shape)
        if not self.normalizer.all_bounded:
            u = np.where(self.normalizer.bounded, u, self._rng.standard_normal(shape))
        actions = self.normalizer.to_env(u.astype(np.float32))
        return actions.reshape((count, *self._action_shape))

    def value(self, obs_batch: Any) -> np.ndarray:
        """``min_k Q_k(obs, greedy action)`` from the online nets, ``[B]`` float32."""
        obs = self._obs_to_tensor(obs_batch)
        with torch.inference_mode():
            if self.discrete:
                q = self.model.critic(obs).min(dim=0).values
                best = self.model.actor(obs).argmax(dim=1, keepdim=True)
                return q.gather(1, best).squeeze(1).float().cpu().numpy()
            u = self.model.actor.deterministic(obs)
            return self.model.critic(obs, u).min(dim=0).values.float().cpu().numpy()

    # ---------------------------------------------------------- postprocessing
    def postprocess_trajectory(self, batch: SampleBatch) -> SampleBatch:
        """n-step transitions (:func:`adjust_nstep`; adds ``gammas``)."""
        return adjust_nstep(batch, self.n_step, float(self.config["gamma"]))

    # ---------------------------------------------------------------- learning
    def _loss_array(self, column: str, arr: np.ndarray) -> np.ndarray:
        """Box actions become normalized units, Discrete ones a flat int64 column."""
        if column == SampleBatch.ACTIONS:
            return (arr.reshape(-1).astype(np.int64, copy=False) if self.discrete
                    else self.normalizer.to_normalized(arr.reshape(arr.shape[0], -1)))
        return super()._loss_array(column, arr)

    def critic_target(self, tensors: TensorDict, noise: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The soft TD target ``[B]`` (no grad); see the module docstring.

        ``noise``: standard-normal draws ``[B, A]`` for the Box actor's sample at
        ``s'`` (fresh ones from torch's RNG when None; unused for Discrete).
        """
        new_obs = tensors[SampleBatch.NEW_OBS]
        rewards = tensors[SampleBatch.REWARDS]
        alpha = self.alpha
        with torch.no_grad():
            gammas = tensors.get(GAMMAS)
            if gammas is None:
                # No gammas column: rewards are assumed n-step sums with a full horizon.
                gammas = torch.full_like(rewards, float(self.config["gamma"]) ** self.n_step)
            terminateds = tensors[SampleBatch.TERMINATEDS]
            if self.discrete:
                return discrete_sac_td_target(rewards, terminateds, gammas,
                                              self.target_critic(new_obs),
                                              self.model.actor(new_obs), alpha)
            u_next, logp_next = self.model.actor.sample(new_obs, noise)
            q_next = self.target_critic(new_obs, u_next)
            return sac_td_target(rewards, terminateds, gammas, q_next, logp_next, alpha)

    def _q_taken(self, tensors: TensorDict) -> torch.Tensor:
        """``Q_k(s, a)`` ``[K, B]`` of the batch's actions from the online critics."""
        obs, actions = tensors[SampleBatch.OBS], tensors[SampleBatch.ACTIONS]
        if self.discrete:
            q = self.model.critic(obs)  # [K, B, n]
            index = actions.view(1, -1, 1).expand(q.shape[0], -1, 1)
            return q.gather(2, index).squeeze(2)
        return self.model.critic(obs, actions)

    def loss(self, train_batch: TensorDict, noise: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, TensorDict]:
        """The critic loss on one minibatch (weighted, summed over critics) and its stats,
        ``|td_1|`` per row included (:attr:`per_row_stats`). ``noise`` as in
        :meth:`critic_target`."""
        target = self.critic_target(train_batch, noise)
        q = self._q_taken(train_batch)
        td = q - target  # [K, B]
        per_row = 0.5 * td.square().sum(dim=0)
        weights = train_batch.get(SampleBatch.WEIGHTS)
        loss = (per_row * weights).mean() if weights is not None else per_row.mean()
        abs_td = td[0].detach().abs()
        q1 = q[0].detach()
        min_q, max_q = torch.aminmax(q1)
        stats: TensorDict = {
            "critic_loss": loss.detach(),
            "mean_q": q1.mean(),
            "min_q": min_q,
            "max_q": max_q,
            "mean_td_error": abs_td.mean(),
            TD_ERROR: abs_td,  # per row: see per_row_stats
        }
        return loss, stats

    def actor_loss(self, obs: Any, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(actor_loss, logp [B])``: the loss with the current alpha and critics, and the
        per-row log-probability it used, detached, for :meth:`alpha_loss` (Discrete:
        ``E_pi[log pi] = -entropy`` per row). ``noise``: standard-normal ``[B, A]`` for
        the Box sample (fresh when None)."""
        alpha = self.alpha
        if self.discrete:
            logp = torch.log_softmax(self.model.actor(obs), dim=-1)
            probs = logp.exp()
            with torch.no_grad():  # the critics are constants here
                q = self.model.critic(obs)
                q_min = q[0] if q.shape[0] == 1 else q.min(dim=0).values
            loss = (probs * (alpha * logp - q_min)).sum(dim=-1).mean()
            return loss, (probs * logp).sum(dim=-1).detach()
        u, logp = self.model.actor.sample(obs, noise)
        q = self.model.critic(obs, u)
        q_min = q[0] if q.shape[0] == 1 else q.min(dim=0).values
        return (alpha * logp - q_min).mean(), logp.detach()

    def alpha_loss(self, logp: torch.Tensor) -> torch.Tensor:
        """``-mean(log_alpha * (logp + target_entropy))`` with ``logp`` ``[B]`` constant:
        alpha falls while the policy's entropy ``-logp`` is above the target."""
        return -(self.log_alpha * (logp + self.target_entropy)).mean()

    def _clip(self, params: list[torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        clip = self.config.get("grad_clip")
        return _total_norm_and_clip(grads, None if clip is None else float(clip))

    def _critic_backward(self, minibatch: TensorDict) -> TensorDict:
        loss, stats = self.loss(minibatch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats["critic_grad_gnorm"] = self._clip(self._critic_params).detach()
        return stats

    def _actor_backward(self, obs: Any, stats: TensorDict) -> torch.Tensor:
        """Actor grads (the actor's parameters only) into ``.grad``; returns ``logp``."""
        loss, logp = self.actor_loss(obs)
        # autograd.grad w.r.t. the actor only: no critic weight grads are built or touched.
        grads = torch.autograd.grad(loss, self._actor_params)
        for param, grad in zip(self._actor_params, grads):
            param.grad = grad
        stats["actor_loss"] = loss.detach()
        stats["actor_grad_gnorm"] = self._clip(self._actor_params).detach()
        stats["entropy"] = -logp.mean()
        return logp

    def _alpha_backward(self, logp: torch.Tensor, stats: TensorDict) -> None:
        loss = self.alpha_loss(logp)
        self.log_alpha.grad = torch.autograd.grad(loss, [self.log_alpha])[0]
        stats["alpha_loss"] = loss.detach()
        stats["alpha"] = self.alpha

    def sgd_step(self, minibatch: TensorDict) -> TensorDict:
        """One critic step, then one actor step (with the just-updated critics), then one
        temperature step: the update of the base class's SGD loop."""
        stats = self._critic_backward(minibatch)
        self.critic_optimizer.step()
        logp = self._actor_backward(minibatch[SampleBatch.OBS], stats)
        self.actor_optimizer.step()
        self._alpha_backward(logp, stats)
        self.alpha_optimizer.step()
        self.num_updates += 1
        return stats

    def _extra_learn_stats(self) -> dict[str, Any]:
        return {
            "cur_actor_lr": float(self.actor_optimizer.param_groups[0]["lr"]),
            "cur_alpha_lr": float(self.alpha_optimizer.param_groups[0]["lr"]),
            "target_entropy": self.target_entropy,
            "num_updates": self.num_updates,
        }

    def evaluate_loss(self, batch: SampleBatch, target_noise: np.ndarray | None = None,
                      actor_noise: np.ndarray | None = None) -> dict[str, float]:
        """Critic, actor and alpha losses (and the critic stats) on the whole ``batch``;
        nothing is updated. ``target_noise`` / ``actor_noise``: standard-normal
        ``[B, A]`` draws for the Box samples at ``s'`` / ``s`` (fresh when None)."""
        tensors = self._batch_to_tensors(batch)

        def as_tensor(noise: np.ndarray | None) -> torch.Tensor | None:
            return None if noise is None else torch.as_tensor(
                np.asarray(noise, dtype=np.float32), device=self.device)

        with torch.no_grad():
            _, stats = self.loss(tensors, as_tensor(target_noise))
            actor_loss, logp = self.actor_loss(tensors[SampleBatch.OBS], as_tensor(actor_noise))
            stats["actor_loss"] = actor_loss
            stats["alpha_loss"] = self.alpha_loss(logp)
            stats["entropy"] = -logp.mean()
            stats["alpha"] = self.alpha
        return {k: float(v) for k, v in stats.items() if k not in self.per_row_stats}

    def compute_critic_target(self, batch: SampleBatch, noise: np.ndarray | None = None
                              ) -> np.ndarray:
        """:meth:`critic_target` of ``batch`` as float32 ``[B]``."""
        tensors = self._batch_to_tensors(batch)
        noise_t = None if noise is None else torch.as_tensor(
            np.asarray(noise, dtype=np.float32), device=self.device)
        return self.critic_target(tensors, noise_t).float().cpu().numpy()

    def compute_td_error(self, batch: SampleBatch) -> np.ndarray:
        """``|Q_1(s, a) - target|`` ``[B]`` (float32) under the current nets; no update."""
        tensors = self._batch_to_tensors(batch)
        with torch.no_grad():
            target = self.critic_target(tensors)
            q1 = self._q_taken(tensors)[0]
        return (q1 - target).abs().float().cpu().numpy()

    def gradient_params(self) -> list[torch.Tensor]:
        """What :meth:`compute_gradients` returns grads for, in order: the model's
        parameters (actor, then critics), then ``log_alpha``."""
        return [*self.model.parameters(), self.log_alpha]

    def compute_gradients(self, batch: SampleBatch) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Critic, actor and temperature gradients on the whole ``batch`` (after
        ``grad_clip``), as numpy, ordered like :meth:`gradient_params`. The actor's use the
        current critics (no step happens in between). Stats as in :meth:`learn_on_batch`."""
        tensors = self._batch_to_tensors(batch)
        stats = self._critic_backward(tensors)
        logp = self._actor_backward(tensors[SampleBatch.OBS], stats)
        self._alpha_backward(logp, stats)
        per_row = self._whole_batch_per_row(stats, batch.count)
        grads = [p.grad.detach().cpu().numpy().copy() if p.grad is not None
                 else np.zeros(tuple(p.shape), dtype=np.float32) for p in self.gradient_params()]
        return grads, self._summarize([stats], per_row)

    def apply_gradients(self, grads: list[np.ndarray],
                        obs_stats: RunningStat | None = None) -> None:
        """One step of each optimizer with :meth:`compute_gradients` output, then
        ``obs_stats`` into the observation filter."""
        self._set_grads(self.gradient_params(), grads)
        self.critic_optimizer.step()
        self.actor_optimizer.step()
        self.alpha_optimizer.step()
        self.num_updates += 1
        self.merge_observation_stats(obs_stats)

    def update_target(self, tau: float | None = None) -> None:
        """``target <- tau * online + (1 - tau) * target`` for the critics (``tau``
        default: the config's); ``tau >= 1`` copies."""
        tau = float(self.config["tau"]) if tau is None else float(tau)
        with torch.no_grad():
            if tau >= 1.0:
                torch._foreach_copy_(self._target_params, self._critic_params)
            else:
                torch._foreach_lerp_(self._target_params, self._critic_params, tau)

    # ------------------------------------------------------- weights and state
    def get_state(self) -> dict[str, Any]:
        """Online and target weights, the three optimizers, ``log_alpha``, timestep and
        update counter; tensors and ints only (``torch.load(..., weights_only=True)``)."""
        return {
            "weights": self._weights_state(),  # the observation filter's statistics too
            "target_weights": {k: v.detach().cpu().clone()
                               for k, v in self.target_critic.state_dict().items()},
            "critic_optimizer": _to_cpu_copy(self.critic_optimizer.state_dict()),
            "actor_optimizer": _to_cpu_copy(self.actor_optimizer.state_dict()),
            "alpha_optimizer": _to_cpu_copy(self.alpha_optimizer.state_dict()),
            "log_alpha": self.log_alpha.detach().cpu().clone(),
            "global_timestep": int(self.global_timestep),
            "num_updates": int(self.num_updates),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` (without ``target_weights`` the targets copy the
        online critics). The lrs stay this policy's own config's, not the saved ones."""
        self.set_weights(state["weights"])
        target = state.get("target_weights")
        if target is None:
            self.update_target(tau=1.0)
        else:
            self.target_critic.load_state_dict({
                k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v, copy=True))
                for k, v in target.items()})
        optimizers = {"critic_optimizer": self.critic_optimizer,
                      "actor_optimizer": self.actor_optimizer,
                      "alpha_optimizer": self.alpha_optimizer}
        for name, optimizer in optimizers.items():
            if state.get(name) is not None:
                # load_state_dict moves optimizer state onto the parameters' device.
                optimizer.load_state_dict(state[name])
        if state.get("log_alpha") is not None:
            with torch.no_grad():
                self.log_alpha.copy_(torch.as_tensor(state["log_alpha"]))
        self.global_timestep = int(state.get("global_timestep", 0))
        self.num_updates = int(state.get("num_updates", 0))
        self.apply_hyperparameters()

    def export(self, export_dir: str) -> str:
        """TorchScript of :class:`~flowrl.policies.sac_networks.SACModel`: raw obs
        ``[B, ...]`` -> greedy actions (env units for Box, unclipped; argmax for Discrete)."""
        return super().export(export_dir)

    def export_module(self) -> nn.Module:
        """An eager CPU module ``raw obs batch -> greedy actions``: ``squash(mean)`` mapped
        to the bounds and clipped, ``[B, *shape]`` (Box), or the argmax of the logits,
        int64 ``[B]`` (Discrete); the current observation normalization included. The
        same actions as ``compute_actions(obs, explore=False)``."""
        actor = copy.deepcopy(self.model.actor).cpu().eval()
        if self.discrete:
            return self.with_obs_normalization(ArgmaxHead(actor))
        return self.with_obs_normalization(
            _ExportedActor(GreedyUnitAction(actor), self.normalizer, self.action_space))
