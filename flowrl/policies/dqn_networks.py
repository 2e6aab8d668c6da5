"""The DQN Q network: an observation trunk (MLP, Nature conv net, or a custom model)
and a plain or dueling Q head. The policy is :mod:`flowrl.policies.dqn`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from torch import nn

from flowrl.policies.models import (
    ObservationEncoder,
    _NATURE_FC_SIZE,
    _CUSTOM_MODELS,
    _ImageSpec,
    _activation,
    _is_image_space,
    _linear,
    _mlp,
    _to_nchw,
)


# ---------------------------------------------------------------------- model
class _FlatTrunk(nn.Module):
    """:class:`ObservationEncoder` features (any supported space) -> MLP of ``fcnet_hiddens``."""

    def __init__(self, obs_space: gym.Space, model_config: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = ObservationEncoder(obs_space, model_config)
        activation = _activation(model_config.get("fcnet_activation", "tanh"))
        hiddens = list(model_config.get("fcnet_hiddens") or [])
        self.mlp, self.out_size = _mlp(self.encoder.size, hiddens, activation)

    def forward(self, obs: Any) -> torch.Tensor:
        return self.mlp(self.encoder(obs))


class _VisionTrunk(nn.Module):
    """Image frames, channels last or first -> conv stack (Nature DQN for sides >= 36,
    a padded 3x3 stack below, or ``conv_filters``) -> fc 512."""

    def __init__(self, obs_space: gym.spaces.Box, model_config: dict[str, Any]) -> None:
        super().__init__()
        spec = _ImageSpec(obs_space, model_config, "DQN's vision trunk")
        self.channels_last = spec.channels_last
        # uint8 frames travel unscaled from env to learner; scale on the device.
        self.scale = spec.scale
        self.net = spec.tower(_activation(model_config.get("conv_activation", "relu")),
                              _NATURE_FC_SIZE)
        self.out_size = _NATURE_FC_SIZE

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(_to_nchw(obs, self.channels_last, self.scale))


class _CustomTrunk(nn.Module):
    """A catalog custom model used as a feature extractor (its first output)."""

    def __init__(self, model: nn.Module, out_size: int) -> None:
        super().__init__()
        self.model = model
        self.out_size = int(out_size)

    def forward(self, obs: Any) -> torch.Tensor:
        out = self.model(obs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _head_stream(in_size: int, hiddens: list[int], out_size: int) -> nn.Sequential:
    body, size = _mlp(in_size, hiddens, nn.ReLU)
    return nn.Sequential(*body, _linear(size, out_size, gain=1.0))


class QNetwork(nn.Module):
    """``obs -> Q [B, num_actions]``: feature trunk + (dueling) Q head.

    Trunk, as the model catalog picks it: images (3-D Box with both spatial
    sides >= 8, channels last or first, see :func:`~flowrl.policies.models.image_layout`)
    -> conv stack + fc 512; any other supported space (Box, Discrete,
    MultiDiscrete, MultiBinary, Dict, Tuple) -> :class:`ObservationEncoder`
    features -> an MLP of ``fcnet_hiddens`` with ``fcnet_activation``;
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

    def forward(self, obs: Any) -> torch.Tensor:
        """Observation batch (a tensor, or nested tensors for Dict / Tuple) -> Q ``[B, n]``."""
        return self.q_from_features(self.trunk(obs))


# --------------------------------------------------------------------- policy
