"""SAC networks and their math: the squashed Gaussian and categorical actors, the
discrete-action critic ensemble, the tanh log-prob correction and the soft TD targets.
The policy (losses, optimizers, temperature, checkpoints) is :mod:`flowrl.policies.sac`.

Box actions live in *normalized* units, as in DDPG (:class:`ActionNormalizer`): on a
bounded dimension the actor's sample is ``u = tanh(x)`` with ``x ~ N(mean, std)``, and
the env gets ``center + half_range * u``; an unbounded dimension is not squashed
(``u = x``). Log-probabilities are those of ``u`` (not of the env action), so the
default target entropy ``-dim(A)`` does not depend on the action bounds.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.policies.ddpg_networks import ActionNormalizer, CriticEnsemble, _squash
from flowrl.policies.models import ObservationEncoder, _activation, _activation_fn, _linear, _mlp

__all__ = [
    "LOG_STD_MIN",
    "LOG_STD_MAX",
    "tanh_log_det_jacobian",
    "squashed_gaussian_logp",
    "sac_td_target",
    "discrete_sac_td_target",
    "SquashedGaussianActor",
    "CategoricalActor",
    "DiscreteCriticEnsemble",
    "SACModel",
]

#: Bounds of the actor's log standard deviation: below, the Gaussian is numerically a
#: point; above, ``tanh`` of a sample is +-1 almost always.
LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0

_LOG_2 = math.log(2.0)


# --------------------------------------------------------------------- math
def tanh_log_det_jacobian(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(x)^2)`` elementwise, computed as ``2 (log 2 - x - softplus(-2x))``
    so that it stays finite where ``tanh(x)`` rounds to +-1."""
    return 2.0 * (_LOG_2 - x - nn.functional.softplus(-2.0 * x))


def squashed_gaussian_logp(
    x: torch.Tensor,
    mean: torch.Tensor,
    log_std: torch.Tensor,
    bounded: torch.Tensor | None = None,
    all_bounded: bool = True,
) -> torch.Tensor:
    """``log pi(u)`` ``[B]`` of ``u = squash(x)`` for pre-squash samples ``x [B, A]``.

    The Gaussian log-density of ``x`` summed over dimensions, minus
    ``log(1 - tanh(x)^2)`` on every squashed dimension (the change of variables of
    ``u = tanh(x)``). ``bounded`` (a bool mask ``[A]``) selects the squashed
    dimensions when only some are; ``all_bounded`` says all are (``bounded`` unused);
    neither: no dimension is squashed.
    """
    z = (x - mean) * torch.exp(-log_std)
    logp = (-0.5 * z.square() - log_std - 0.5 * math.log(2.0 * math.pi)).sum(dim=-1)
    if all_bounded:
        return logp - tanh_log_det_jacobian(x).sum(dim=-1)
    if bounded is None:
        return logp
    return logp - (tanh_log_det_jacobian(x) * bounded.to(x.dtype)).sum(dim=-1)


def sac_td_target(
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    gammas: torch.Tensor,
    q_next: torch.Tensor,
    logp_next: torch.Tensor,
    alpha: torch.Tensor | float,
) -> torch.Tensor:
    """Soft TD target ``[B]``: ``r + gammas (1 - terminated) (min_k q_next[k] - alpha logp_next)``.

    ``q_next`` ``[K, B]``: the target critics at ``(s', u')`` for ``u' ~ pi(s')``;
    ``logp_next`` ``[B]``: ``log pi(u' | s')``.
    """
    q_min = q_next[0] if q_next.shape[0] == 1 else q_next.min(dim=0).values
    soft_value = q_min - alpha * logp_next
    return rewards + gammas * (1.0 - terminateds.to(soft_value.dtype)) * soft_value


def discrete_sac_td_target(
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    gammas: torch.Tensor,
    q_next: torch.Tensor,
    logits_next: torch.Tensor,
    alpha: torch.Tensor | float,
) -> torch.Tensor:
    """Discrete soft TD target ``[B]``: the soft value of ``s'`` is an expectation over
    the actions, ``V(s') = sum_a pi(a|s') (min_k q_next[k, :, a] - alpha log pi(a|s'))``.

    ``q_next`` ``[K, B, n]``: the target critics at ``s'``; ``logits_next`` ``[B, n]``:
    the actor's logits at ``s'``.
    """
    q_min = q_next[0] if q_next.shape[0] == 1 else q_next.min(dim=0).values
    logp = torch.log_softmax(logits_next, dim=-1)
    soft_value = (logp.exp() * (q_min - alpha * logp)).sum(dim=-1)
    return rewards + gammas * (1.0 - terminateds.to(soft_value.dtype)) * soft_value


# -------------------------------------------------------------------- actors
class SquashedGaussianActor(nn.Module):
    """``obs -> (mean [B, A], log_std [B, A])`` of the pre-squash Gaussian.

    :class:`ObservationEncoder` -> MLP of ``hiddens`` -> one linear head of ``2 A``
    outputs (gain 0.01, so the first policy has mean ~0 and std ~1), ``log_std``
    clamped to ``[LOG_STD_MIN, LOG_STD_MAX]``. ``model_config`` is read only for the
    conv stacks of image observations.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        act_dim: int,
        hiddens: list[int],
        activation: str,
        normalizer: ActionNormalizer,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.act_dim = int(act_dim)
        self.encoder = ObservationEncoder(obs_space, model_config)
        body, size = _mlp(self.encoder.size, [int(h) for h in hiddens], _activation(activation))
        self.net = nn.Sequential(*body, _linear(size, 2 * self.act_dim, gain=0.01))
        self.all_bounded = normalizer.all_bounded
        mask = None if normalizer.all_bounded or normalizer.none_bounded else torch.from_numpy(
            normalizer.bounded.copy())
        # Constant, so not part of the weights or the state.
        self.register_buffer("bounded", mask, persistent=False)

    def forward(self, obs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(self.encoder(obs))
        mean, log_std = out[:, : self.act_dim], out[:, self.act_dim :]
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        """``tanh`` on the bounded dimensions (normalized actions ``u``)."""
        return _squash(x, self.bounded, self.all_bounded)

    def sample(self, obs: Any, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized ``(u [B, A], log pi(u) [B])``; ``noise``: standard-normal draws
        ``[B, A]`` (fresh ones from torch's RNG when None)."""
        mean, log_std = self(obs)
        eps = torch.randn_like(mean) if noise is None else noise.to(mean)
        x = mean + torch.exp(log_std) * eps
        logp = squashed_gaussian_logp(x, mean, log_std, self.bounded, self.all_bounded)
        return self.squash(x), logp

    def deterministic(self, obs: Any) -> torch.Tensor:
        """The greedy normalized action ``squash(mean)``."""
        return self.squash(self(obs)[0])


class CategoricalActor(nn.Module):
    """``obs -> logits [B, n]``: :class:`ObservationEncoder` -> MLP -> linear head
    (gain 0.01: a near-uniform first policy)."""

    def __init__(
        self,
        obs_space: gym.Space,
        num_actions: int,
        hiddens: list[int],
        activation: str,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = ObservationEncoder(obs_space, model_config)
        body, size = _mlp(self.encoder.size, [int(h) for h in hiddens], _activation(activation))
        self.net = nn.Sequential(*body, _linear(size, int(num_actions), gain=0.01))

    def forward(self, obs: Any) -> torch.Tensor:
        return self.net(self.encoder(obs))


# ------------------------------------------------------------------- critics
class DiscreteCriticEnsemble(nn.Module):
    """``K`` Q-networks ``Q_k(s, .)`` with one output per action, ``[K, B, n]``.

    The discrete counterpart of :class:`~flowrl.policies.ddpg_networks.CriticEnsemble`:
    one shared :class:`ObservationEncoder`, then per critic an MLP of ``hiddens``
    whose layer ``i`` is ``weight_i [K, in, out]`` / ``bias_i [K, 1, out]`` (orthogonal
    init per critic: gain sqrt(2) hidden, 1 head), evaluated as one batched matmul per
    layer for all critics.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        num_actions: int,
        hiddens: list[int],
        activation: str,
        num_critics: int,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = ObservationEncoder(obs_space, model_config)
        self.num_critics = int(num_critics)
        self.activation_fn = _activation_fn(activation)
        sizes = [self.encoder.size, *(int(h) for h in hiddens), int(num_actions)]
        self._layer_names: list[tuple[str, str]] = []
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            gain = 1.0 if index == len(sizes) - 2 else float(np.sqrt(2.0))
            weight = torch.empty(self.num_critics, fan_in, fan_out)
            for k in range(self.num_critics):
                block = torch.empty(fan_out, fan_in)
                nn.init.orthogonal_(block, gain=gain)
                weight[k] = block.t()
            self.register_parameter(f"weight_{index}", nn.Parameter(weight))
            self.register_parameter(
                f"bias_{index}", nn.Parameter(torch.zeros(self.num_critics, 1, fan_out)))
            self._layer_names.append((f"weight_{index}", f"bias_{index}"))

    def forward(self, obs: Any) -> torch.Tensor:
        """``Q [K, B, n]`` of every action."""
        h = self.encoder(obs).unsqueeze(0).expand(self.num_critics, -1, -1)
        params = self._parameters  # dict lookups: Module.__getattr__ is slow per call
        last = len(self._layer_names) - 1
        for index, (weight_name, bias_name) in enumerate(self._layer_names):
            h = torch.baddbmm(params[bias_name], h, params[weight_name])
            if index < last and self.activation_fn is not None:
                h = self.activation_fn(h)
        return h


# --------------------------------------------------------------------- model
class SACModel(nn.Module):
    """The online actor and critics. ``forward(obs)`` is the greedy action, which is what
    :meth:`~flowrl.policies.sac.SACTorchPolicy.export` traces.

    ``Box``: a :class:`SquashedGaussianActor` and a
    :class:`~flowrl.policies.ddpg_networks.CriticEnsemble` on ``concat(obs, u)``;
    ``forward`` gives ``center + half_range * squash(mean)`` ``[B, A]`` (env units,
    unclipped). ``Discrete``: a :class:`CategoricalActor` and a
    :class:`DiscreteCriticEnsemble`; ``forward`` gives ``argmax`` of the logits, int64
    ``[B]``. Two critics with ``twin_q`` (the default), else one.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.Space,
        config: dict[str, Any],
        normalizer: ActionNormalizer | None,
    ) -> None:
        super().__init__()
        model_config = config.get("model") or {}  # only image leaves read it
        num_critics = 2 if config["twin_q"] else 1
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        actor_args = (list(config["actor_hiddens"]), config["actor_hidden_activation"])
        critic_args = (list(config["critic_hiddens"]), config["critic_hidden_activation"],
                       num_critics, model_config)
        if self.discrete:
            n = int(action_space.n)
            self.actor: nn.Module = CategoricalActor(obs_space, n, *actor_args, model_config)
            self.critic: nn.Module = DiscreteCriticEnsemble(obs_space, n, *critic_args)
            center, half_range = np.zeros(1, np.float32), np.ones(1, np.float32)
        else:
            act_dim = int(np.prod(action_space.shape))
            self.actor = SquashedGaussianActor(obs_space, act_dim, *actor_args, normalizer,
                                               model_config)
            self.critic = CriticEnsemble(obs_space, act_dim, *critic_args)
            center, half_range = normalizer.center, normalizer.half_range
        self.register_buffer("center", torch.from_numpy(center.copy()), persistent=False)
        self.register_buffer("half_range", torch.from_numpy(half_range.copy()),
                             persistent=False)

    def forward(self, obs: Any) -> torch.Tensor:
        if self.discrete:
            return torch.argmax(self.actor(obs), dim=-1)
        return self.center + self.half_range * self.actor.deterministic(obs)


class GreedyUnitAction(nn.Module):
    """A :class:`SquashedGaussianActor` as ``obs -> squash(mean)`` (normalized units), the
    actor that :class:`~flowrl.policies.ddpg_networks._ExportedActor` maps to the bounds."""

    def __init__(self, actor: SquashedGaussianActor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, obs: Any) -> torch.Tensor:
        return self.actor.deterministic(obs)
