"""DDPG / TD3 networks and their math: actor, twin critics, action normalization,
exploration schedules and the TD target. The policy (losses, optimizers, exploration,
checkpoints) is :mod:`flowrl.policies.ddpg`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.policies.models import ObservationEncoder, _activation, _activation_fn, _linear, _mlp

# Defaults of ``exploration_config`` (keys the user leaves out).
_DEFAULT_EXPLORATION: dict[str, Any] = {
    "type": "gaussian",
    "scale": 0.1,
    "initial_scale": 1.0,
    "final_scale": 1.0,
    "scale_timesteps": 10000,
    "random_timesteps": 1000,
    "ou_theta": 0.15,
    "ou_sigma": 0.2,
    "ou_base_scale": 0.1,
}


# ------------------------------------------------------------------ helpers
def linear_scale(timestep: int, initial: float, final: float, start: int, timesteps: int) -> float:
    """``initial`` until ``start``, then linear to ``final`` over ``timesteps``, then ``final``."""
    if timesteps <= 0:
        return float(final) if timestep >= start else float(initial)
    frac = min(1.0, max(0.0, (timestep - start) / float(timesteps)))
    return float(initial + frac * (final - initial))


def ou_stationary_variance(theta: float, sigma: float) -> float:
    """Stationary variance of ``x_{t+1} = (1 - theta) x_t + sigma * eps``: an AR(1) process.

    ``Var = sigma^2 / (1 - (1 - theta)^2) = sigma^2 / (theta (2 - theta))`` -- slightly
    above the continuous-time ``sigma^2 / (2 theta)`` for the unit time step.
    """
    if not 0.0 < theta < 2.0:
        raise ValueError(f"ou_theta={theta!r} must be in (0, 2) for a stationary process")
    return float(sigma**2 / (theta * (2.0 - theta)))


def ddpg_td_target(
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    gammas: torch.Tensor,
    q_next: torch.Tensor,
) -> torch.Tensor:
    """``r + gammas * (1 - terminated) * min_k q_next[k]``, shape ``[B]``.

    ``q_next`` is ``[K, B]``: the target critics' values at ``(s', u')``; with
    one critic (DDPG) the min is that critic, with two (TD3) the clipped double-Q.
    """
    q_min = q_next[0] if q_next.shape[0] == 1 else q_next.min(dim=0).values
    return rewards + gammas * (1.0 - terminateds.to(q_min.dtype)) * q_min


class ActionNormalizer:
    """Maps normalized actions ``u`` to env actions ``a`` and back, for one Box space.

    Bounded dimensions (both bounds finite): ``a = center + half_range * u`` with
    ``u`` in ``[-1, 1]``; unbounded ones: ``a = u``. Works on numpy arrays and,
    through :meth:`to_device`, on torch tensors of shape ``[B, act_dim]``.
    """

    def __init__(self, space: gym.spaces.Box) -> None:
        low = np.asarray(space.low, dtype=np.float64).reshape(-1)
        high = np.asarray(space.high, dtype=np.float64).reshape(-1)
        self.bounded = np.isfinite(low) & np.isfinite(high)
        self.all_bounded = bool(self.bounded.all())
        self.none_bounded = not bool(self.bounded.any())
        self.low = np.where(self.bounded, low, -np.inf).astype(np.float32)
        self.high = np.where(self.bounded, high, np.inf).astype(np.float32)
        finite_low = np.where(self.bounded, low, -1.0)
        finite_high = np.where(self.bounded, high, 1.0)
        self.center = ((finite_high + finite_low) / 2.0).astype(np.float32)  # 0 if unbounded
        self.half_range = ((finite_high - finite_low) / 2.0).astype(np.float32)  # 1 if unbounded
        # -1 / +1 on bounded dims, -inf / +inf on unbounded ones: clipping in one op.
        self.unit_low = np.where(self.bounded, -1.0, -np.inf).astype(np.float32)
        self.unit_high = np.where(self.bounded, 1.0, np.inf).astype(np.float32)

    def to_env(self, u: np.ndarray) -> np.ndarray:
        """Normalized ``[B, act_dim]`` -> env units, clipped to the bounds (float32)."""
        a = self.center + self.half_range * u
        return np.clip(a, self.low, self.high).astype(np.float32, copy=False)

    def to_normalized(self, a: np.ndarray) -> np.ndarray:
        """Env units ``[B, act_dim]`` -> normalized units (float32)."""
        return ((np.asarray(a, dtype=np.float32) - self.center) / self.half_range).astype(
            np.float32, copy=False
        )

    def clip_normalized(self, u: np.ndarray) -> np.ndarray:
        """Clip normalized actions to ``[-1, 1]`` on bounded dimensions."""
        if self.none_bounded:
            return u
        return np.clip(u, self.unit_low, self.unit_high)


def _squash(x: torch.Tensor, bounded: torch.Tensor | None, all_bounded: bool) -> torch.Tensor:
    if all_bounded:
        return torch.tanh(x)
    if bounded is None:
        return x
    return torch.where(bounded, torch.tanh(x), x)


# -------------------------------------------------------------------- models
class Actor(nn.Module):
    """``obs -> u [B, act_dim]``: :class:`ObservationEncoder` -> MLP of ``hiddens`` ->
    linear head -> tanh on bounded dims.

    The head is initialised with gain 0.01 (orthogonal), so the initial policy
    is close to the middle of the action range. ``model_config`` is read only for
    the conv stacks of image observations (``conv_filters``, ``conv_activation``).
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
        self.encoder = ObservationEncoder(obs_space, model_config)
        body, size = _mlp(self.encoder.size, [int(h) for h in hiddens], _activation(activation))
        self.net = nn.Sequential(*body, _linear(size, int(act_dim), gain=0.01))
        self.all_bounded = normalizer.all_bounded
        mask = None if normalizer.all_bounded or normalizer.none_bounded else torch.from_numpy(
            normalizer.bounded.copy()
        )
        # Constant, so not part of the weights (get_weights / set_weights) or the state.
        self.register_buffer("bounded", mask, persistent=False)

    def forward(self, obs: Any) -> torch.Tensor:
        return _squash(self.net(self.encoder(obs)), self.bounded, self.all_bounded)


class CriticEnsemble(nn.Module):
    """``K`` independent Q-networks ``Q_k(s, u)`` evaluated as one batched matmul per layer.

    Each Q-net is an MLP of ``hiddens`` on ``concat(encoder(obs), u)`` with a scalar
    head. Layer ``i`` holds ``weight_i`` ``[K, in, out]`` and ``bias_i``
    ``[K, 1, out]`` (orthogonal init per critic, gain sqrt(2) hidden, 1 head), so
    TD3's twin critics cost the same number of torch ops as one critic. The
    :class:`ObservationEncoder` (one for all ``K`` critics) reads ``model_config``
    only for image observations' conv stacks.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        act_dim: int,
        hiddens: list[int],
        activation: str,
        num_critics: int,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = ObservationEncoder(obs_space, model_config)
        self.num_critics = int(num_critics)
        self.activation_fn = _activation_fn(activation)
        sizes = [self.encoder.size + int(act_dim), *(int(h) for h in hiddens), 1]
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
                f"bias_{index}", nn.Parameter(torch.zeros(self.num_critics, 1, fan_out))
            )
            self._layer_names.append((f"weight_{index}", f"bias_{index}"))

    def forward(
        self, obs: Any, actions: torch.Tensor, num: int | None = None
    ) -> torch.Tensor:
        """``Q [K', B]`` for normalized ``actions``; ``num`` = only the first ``num`` critics."""
        k = self.num_critics if num is None else int(num)
        x = torch.cat([self.encoder(obs), actions.to(torch.float32)], dim=1)
        h = x.unsqueeze(0).expand(k, -1, -1)
        params = self._parameters  # dict lookups: Module.__getattr__ is slow per call
        last = len(self._layer_names) - 1
        for index, (weight_name, bias_name) in enumerate(self._layer_names):
            weight, bias = params[weight_name], params[bias_name]
            if k != self.num_critics:
                weight, bias = weight[:k], bias[:k]
            h = torch.baddbmm(bias, h, weight)
            if index < last and self.activation_fn is not None:
                h = self.activation_fn(h)
        return h.squeeze(-1)


class DDPGModel(nn.Module):
    """Online (or target) actor + critic(s). ``forward(obs)`` = deterministic env actions.

    ``forward`` is what :meth:`DDPGTorchPolicy.export` traces: raw obs in,
    ``[B, act_dim]`` actions in env units out.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.spaces.Box,
        config: dict[str, Any],
        normalizer: ActionNormalizer,
    ) -> None:
        super().__init__()
        act_dim = int(np.prod(action_space.shape))
        # Only image observations read it (conv_filters, conv_activation).
        model_config = config.get("model") or {}
        self.actor = Actor(
            obs_space,
            act_dim,
            list(config["actor_hiddens"]),
            config["actor_hidden_activation"],
            normalizer,
            model_config,
        )
        self.critic = CriticEnsemble(
            obs_space,
            act_dim,
            list(config["critic_hiddens"]),
            config["critic_hidden_activation"],
            2 if config["twin_q"] else 1,
            model_config,
        )
        self.register_buffer("center", torch.from_numpy(normalizer.center.copy()), persistent=False)
        self.register_buffer(
            "half_range", torch.from_numpy(normalizer.half_range.copy()), persistent=False
        )

    def forward(self, obs: Any) -> torch.Tensor:
        return self.center + self.half_range * self.actor(obs)


class _ExportedActor(nn.Module):
    """Actor ``u`` -> ``clip(center + half_range * u, low, high)`` reshaped to the action
    shape: :meth:`ActionNormalizer.to_env` in torch, for :meth:`DDPGTorchPolicy.export_module`."""

    def __init__(self, actor: Actor, normalizer: ActionNormalizer,
                 action_space: gym.spaces.Box) -> None:
        super().__init__()
        self.actor = actor
        self.action_shape = [int(d) for d in action_space.shape]
        for name in ("center", "half_range", "low", "high"):
            self.register_buffer(name, torch.from_numpy(getattr(normalizer, name).copy()))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        a = self.center + self.half_range * self.actor(obs).float()
        return torch.minimum(torch.maximum(a, self.low), self.high).reshape(
            [-1] + self.action_shape)


def _adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # The fused kernel is several times faster for small nets where torch has one.
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# -------------------------------------------------------------------- policy
