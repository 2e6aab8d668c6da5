"""The DQN Q network: an observation trunk (MLP, Nature conv net, or a custom model)
and a plain or dueling Q head. The policy is :mod:`flowrl.policies.dqn`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.policies.models import (
    FlatObs,
    _NATURE_CONV_FILTERS,
    _NATURE_FC_SIZE,
    _CUSTOM_MODELS,
    _activation,
    _conv_stack,
    _is_image_space,
    _linear,
    _mlp,
)


# ---------------------------------------------------------------------- model
class _FlatTrunk(nn.Module):
    """One-hot (Discrete) or flattened (Box) obs -> MLP of ``fcnet_hiddens``."""

    def __init__(self, obs_space: gym.Space, model_config: dict[str, Any]) -> None:
        super().__init__()
        self.flat_obs = FlatObs(obs_space, "DQN's built-in model")
        in_size = self.flat_obs.size
        activation = _activation(model_config.get("fcnet_activation", "tanh"))
        hiddens = list(model_config.get("fcnet_hiddens") or [])
        self.mlp, self.out_size = _mlp(in_size, hiddens, activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.flat_obs(obs))


class _VisionTrunk(nn.Module):
    """Channels-last frames -> Nature-DQN conv stack (or ``conv_filters``) -> fc 512."""

    def __init__(self, obs_space: gym.spaces.Box, model_config: dict[str, Any]) -> None:
        super().__init__()
        height, width, channels = (int(d) for d in obs_space.shape)
        # uint8 frames travel unscaled from env to learner; scale on the device.
        self.scale = 1.0 / 255.0 if obs_space.dtype == np.uint8 else 1.0
        filters = model_config.get("conv_filters") or _NATURE_CONV_FILTERS
        activation = _activation(model_config.get("conv_activation", "relu"))
        convs = _conv_stack(channels, filters, activation)
        with torch.no_grad():
            flat = convs(torch.zeros(1, channels, height, width)).shape[1]
        layers: list[nn.Module] = [convs, _linear(flat, _NATURE_FC_SIZE, gain=float(np.sqrt(2.0)))]
        if activation is not None:
            layers.append(activation())
        self.net = nn.Sequential(*layers)
        self.out_size = _NATURE_FC_SIZE

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.permute(0, 3, 1, 2).float()
        return self.net(x * self.scale if self.scale != 1.0 else x)


class _CustomTrunk(nn.Module):
    """A catalog custom model used as a feature extractor (its first output)."""

    def __init__(self, model: nn.Module, out_size: int) -> None:
        super().__init__()
        self.model = model
        self.out_size = int(out_size)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.model(obs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _head_stream(in_size: int, hiddens: list[int], out_size: int) -> nn.Sequential:
    body, size = _mlp(in_size, hiddens, nn.ReLU)
    return nn.Sequential(*body, _linear(size, out_size, gain=1.0))


class QNetwork(nn.Module):
    """``obs -> Q [B, num_actions]``: feature trunk + (dueling) Q head.

    Trunk, as the model catalog picks it: image stacks (3-D Box, H, W >= 32)
    -> Nature CNN + fc 512; other Box / Discrete obs -> an MLP of
    ``fcnet_hiddens`` with ``fcnet_activation`` (one-hot for Discrete);
    ``custom_model`` -> that model built with ``num_outputs =
    ([256] + fcnet_hiddens)[-1]``, whose first output is used as the features.

    Head: ``advantage_stream`` = ``hiddens`` ReLU layers -> ``num_actions``;
    with ``dueling`` also ``value_stream`` = ``hiddens`` ReLU layers -> 1 and
    ``Q = V + A - mean_a A``. Without dueling the advantage stream is Q itself.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.spaces.Discrete,
        model_config: dict[str, Any],
        hiddens: list[int],
        dueling: bool,
    ) -> None:
        super().__init__()
        self.num_actions = int(action_space.n)
        self.dueling = bool(dueling)
        self.trunk = self._make_trunk(obs_space, action_space, model_config)
        hiddens = [int(h) for h in hiddens or []]
        self.advantage_stream = _head_stream(self.trunk.out_size, hiddens, self.num_actions)
        self.value_stream = _head_stream(self.trunk.out_size, hiddens, 1) if self.dueling else None

    @staticmethod
    def _make_trunk(
        obs_space: gym.Space, action_space: gym.Space, model_config: dict[str, Any]
    ) -> nn.Module:
        custom = model_config.get("custom_model")
        if custom is not None:
            if isinstance(custom, str):
                if custom not in _CUSTOM_MODELS:
                    raise ValueError(
                        f"unknown custom_model {custom!r}; registered models: "
                        f"{sorted(_CUSTOM_MODELS)} "
                        "(call flowrl.policies.register_custom_model first)"
                    )
                cls = _CUSTOM_MODELS[custom]
            elif isinstance(custom, type):
                cls = custom
            else:
                raise ValueError(
                    f"custom_model must be a registered name or a class, got {custom!r}"
                )
            out_size = ([256] + list(model_config.get("fcnet_hiddens") or []))[-1]
            return _CustomTrunk(cls(obs_space, action_space, out_size, model_config), out_size)
        if _is_image_space(obs_space):
            return _VisionTrunk(obs_space, model_config)
        return _FlatTrunk(obs_space, model_config)

    def q_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Q-values from trunk features (dueling aggregation when enabled)."""
        advantages = self.advantage_stream(features)
        if self.value_stream is None:
            return advantages
        value = self.value_stream(features)
        return value + advantages - advantages.mean(dim=1, keepdim=True)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_from_features(self.trunk(obs))


# --------------------------------------------------------------------- policy
