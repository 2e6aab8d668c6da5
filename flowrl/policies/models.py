"""Model catalog: built-in torch models and the custom-model registry.

Every model -- built-in or custom -- is constructed as
``cls(obs_space, action_space, num_outputs, model_config)`` and implements
``forward(obs) -> (dist_inputs [B, num_outputs], value [B])``. ``obs`` is the
raw observation batch as a tensor (integer indices for ``Discrete`` spaces,
``uint8`` frames for images); models do their own preprocessing (one-hot,
flatten, scale by 1/255) so the sampler ships observations unchanged.

Which built-in model :func:`get_model` picks:

* ``Discrete`` obs -> :class:`FullyConnectedNetwork` on a one-hot encoding;
* ``Box`` with 3 dims and height, width >= 32 (channels last, ``(H, W, C)``)
  -> :class:`VisionNetwork` (Nature-DQN conv stack; ``uint8`` obs scaled by 1/255);
* any other ``Box`` -> :class:`FullyConnectedNetwork` on the flattened obs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.imports import is_import_string, load_object

__all__ = [
    "MODEL_DEFAULTS",
    "TorchModel",
    "TwinMLP",
    "FullyConnectedNetwork",
    "VisionNetwork",
    "register_custom_model",
    "get_model",
    "merge_model_config",
]

MODEL_DEFAULTS: dict[str, Any] = {
    # Hidden layer sizes of the fully connected net (policy and value towers each).
    "fcnet_hiddens": [64, 64],
    # "tanh" | "relu" | "elu" | "silu" (alias "swish") | "linear".
    "fcnet_activation": "tanh",
    # Conv stack as [[out_channels, kernel, stride], ...]; None = Nature DQN.
    "conv_filters": None,
    "conv_activation": "relu",
    # Share the hidden layers between policy and value heads.
    "vf_share_layers": False,
    # Box actions: one learned log-std per action dimension, independent of the state
    # (starts at 0, std 1). False: the policy head outputs a log-std per state. Ignored
    # for other action spaces.
    "free_log_std": True,
    # A name given to register_custom_model (or the model class itself).
    "custom_model": None,
    "custom_model_config": {},
}

# Nature DQN (Mnih et al. 2015): 84x84 -> 20x20 -> 9x9 -> 7x7, then fc 512.
_NATURE_CONV_FILTERS = [[32, 8, 4], [64, 4, 2], [64, 3, 1]]
_NATURE_FC_SIZE = 512

_ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "linear": None,
}

_ACTIVATION_FNS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Tanh: torch.tanh,
    nn.ReLU: torch.relu,
    nn.ELU: nn.functional.elu,
    nn.SiLU: nn.functional.silu,
}

_CUSTOM_MODELS: dict[str, type[nn.Module]] = {}


def merge_model_config(model_config: dict | None) -> dict[str, Any]:
    """``model_config`` over :data:`MODEL_DEFAULTS` (copies; inputs untouched)."""
    merged = copy.deepcopy(MODEL_DEFAULTS)
    merged.update(copy.deepcopy(model_config or {}))
    return merged


def register_custom_model(name: str, cls: type[nn.Module]) -> None:
    """Make ``cls`` available as ``model={"custom_model": name}``.

    The registry is per process: register in a module the rollout workers
    import too, or put the class itself in ``custom_model`` (it travels with
    the pickled config to Ray actors).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"custom model name must be a non-empty string, got {name!r}")
    _CUSTOM_MODELS[name] = cls


def _activation_fn(name: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The functional form of an activation (cheaper to call than a module)."""
    cls = _activation(name)
    return None if cls is None else _ACTIVATION_FNS[cls]


def _activation(name: str | None) -> type[nn.Module] | None:
    key = "linear" if name is None else str(name).lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[key]


def _linear(in_size: int, out_size: int, gain: float) -> nn.Linear:
    # Orthogonal init (gain sqrt(2) hidden, 0.01 policy head, 1 value head) is the
    # standard PPO recipe: a near-uniform initial policy, no saturated tanh units.
    layer = nn.Linear(in_size, out_size)
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(in_size: int, hiddens: list[int], activation: type[nn.Module] | None) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    for size in hiddens:
        layers.append(_linear(in_size, int(size), gain=float(np.sqrt(2.0))))
        if activation is not None:
            layers.append(activation())
        in_size = int(size)
    return nn.Sequential(*layers), in_size


class TorchModel(nn.Module):
    """Base class of the built-in models: the free-log-std policy head helper.

    Subclasses call :meth:`_make_policy_head` for their final policy layer and
    :meth:`_policy_output` on its result; with ``free_log_std`` the head emits
    only the means and a learned, state-independent log-std is appended, so the
    output is always ``concat([mean, log_std])`` of width ``num_outputs``.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.Space,
        num_outputs: int,
        model_config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.obs_space = obs_space
        self.action_space = action_space
        self.num_outputs = int(num_outputs)
        self.model_config = model_config
        # Only a Gaussian over Box actions has a log-std half in its outputs.
        self.free_log_std = bool(model_config.get("free_log_std", False)) and isinstance(
            action_space, gym.spaces.Box)
        if self.free_log_std and self.num_outputs % 2:
            raise ValueError(
                f"free_log_std needs an even num_outputs (mean and log-std), got {num_outputs}"
            )
        self.log_std = (
            nn.Parameter(torch.zeros(self.num_outputs // 2)) if self.free_log_std else None
        )

    def _make_policy_head(self, in_size: int) -> nn.Linear:
        out = self.num_outputs // 2 if self.free_log_std else self.num_outputs
        return _linear(in_size, out, gain=0.01)

    def _policy_output(self, head_out: torch.Tensor) -> torch.Tensor:
        if self.log_std is None:
            return head_out
        return torch.cat([head_out, self.log_std.expand_as(head_out)], dim=-1)


class TwinMLP(nn.Module):
    """Two same-shaped MLPs (policy and value tower) run as one batched matmul per layer.

    Mathematically two independent ``Linear``/activation stacks, but each layer
    is a single ``baddbmm`` over a leading dimension of 2, which halves the
    number of torch ops (and their fixed per-op cost) in both the forward and
    the backward pass -- the dominant cost for the small nets of classic control.
    Layer ``i`` holds ``weight_i`` of shape ``[2, in, out]`` and ``bias_i`` of
    shape ``[2, 1, out]`` (index 0 = policy tower, 1 = value tower). The final
    layer is padded to a common width; the value tower uses its first column.
    """

    def __init__(
        self,
        in_size: int,
        hiddens: list[int],
        policy_outputs: int,
        activation: str | None,
    ) -> None:
        super().__init__()
        self.policy_outputs = int(policy_outputs)
        self.activation_fn = _activation_fn(activation)
        sizes = [int(in_size), *(int(h) for h in hiddens)]
        head_width = max(self.policy_outputs, 1)
        layer_shapes = list(zip(sizes[:-1], sizes[1:])) + [(sizes[-1], head_width)]
        self._layer_names: list[tuple[str, str]] = []
        for index, (fan_in, fan_out) in enumerate(layer_shapes):
            weight = torch.zeros(2, fan_in, fan_out)
            is_head = index == len(layer_shapes) - 1
            # Same orthogonal recipe as _linear, per tower (gain 0.01 policy head, 1 value head).
            for tower, gain in enumerate((0.01, 1.0) if is_head else (np.sqrt(2.0), np.sqrt(2.0))):
                cols = (self.policy_outputs if tower == 0 else 1) if is_head else fan_out
                block = torch.empty(cols, fan_in)
                nn.init.orthogonal_(block, gain=float(gain))
                weight[tower, :, :cols] = block.t()
            self.register_parameter(f"weight_{index}", nn.Parameter(weight))
            self.register_parameter(f"bias_{index}", nn.Parameter(torch.zeros(2, 1, fan_out)))
            self._layer_names.append((f"weight_{index}", f"bias_{index}"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, in]`` -> ``(policy_out [B, policy_outputs], value [B])``."""
        # Direct dict lookups: nn.Module attribute access costs ~1us per parameter.
        params = self._parameters
        h = x.unsqueeze(0).expand(2, -1, -1)
        last = len(self._layer_names) - 1
        for index, (weight_name, bias_name) in enumerate(self._layer_names):
            h = torch.baddbmm(params[bias_name], h, params[weight_name])
            if index < last and self.activation_fn is not None:
                h = self.activation_fn(h)
        return h[0, :, : self.policy_outputs], h[1, :, 0]


class FlatObs(nn.Module):
    """Raw vector obs -> float32 ``[B, size]``: one-hot for ``Discrete``, flattened ``Box``.

        encode = FlatObs(env.observation_space, "MyModel")
        mlp = nn.Linear(encode.size, 64)   # ... mlp(encode(obs))
    """

    def __init__(self, obs_space: gym.Space, owner: str) -> None:
        super().__init__()
        if isinstance(obs_space, gym.spaces.Discrete):
            self.one_hot_size: int | None = int(obs_space.n)
            self.obs_start = int(obs_space.start)
            self.size = self.one_hot_size
        elif isinstance(obs_space, gym.spaces.Box):
            self.one_hot_size = None
            self.obs_start = 0
            self.size = int(np.prod(obs_space.shape))
        else:
            raise ValueError(
                f"{owner} needs a Box or Discrete observation space, got {obs_space!r}")

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.one_hot_size is not None:
            return nn.functional.one_hot(obs.long() - self.obs_start, self.one_hot_size).float()
        return obs.reshape(obs.shape[0], -1).float()


class FullyConnectedNetwork(TorchModel):
    """MLP for vector (or one-hot ``Discrete``) observations.

    Separate policy and value towers of ``fcnet_hiddens`` each (evaluated
    together by :class:`TwinMLP`), or one shared trunk with two linear heads
    when ``vf_share_layers`` is set.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.Space,
        num_outputs: int,
        model_config: dict[str, Any],
    ) -> None:
        super().__init__(obs_space, action_space, num_outputs, model_config)
        self.flat_obs = FlatObs(obs_space, "FullyConnectedNetwork")
        in_size = self.flat_obs.size
        hiddens = list(model_config.get("fcnet_hiddens") or [])
        activation = _activation(model_config.get("fcnet_activation", "tanh"))
        self.vf_share_layers = bool(model_config.get("vf_share_layers", False))

        if self.vf_share_layers:
            self.twin = None
            self.trunk, trunk_out = _mlp(in_size, hiddens, activation)
            self.policy_head = self._make_policy_head(trunk_out)
            self.value_head = _linear(trunk_out, 1, gain=1.0)
        else:
            policy_outputs = self.num_outputs // 2 if self.free_log_std else self.num_outputs
            self.twin = TwinMLP(
                in_size, hiddens, policy_outputs, model_config.get("fcnet_activation", "tanh")
            )

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw obs -> float32 ``[B, features]`` (one-hot for Discrete obs)."""
        return self.flat_obs(obs)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(obs)
        if self.twin is not None:
            policy_out, value = self.twin(x)
            return self._policy_output(policy_out), value
        features = self.trunk(x)
        dist_inputs = self._policy_output(self.policy_head(features))
        return dist_inputs, self.value_head(features).squeeze(-1)


def _conv_stack(
    in_channels: int, filters: list[list[int]], activation: type[nn.Module] | None
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels, kernel, stride in filters:
        conv = nn.Conv2d(in_channels, int(out_channels), int(kernel), int(stride))
        nn.init.orthogonal_(conv.weight, gain=float(np.sqrt(2.0)))
        nn.init.zeros_(conv.bias)
        layers.append(conv)
        if activation is not None:
            layers.append(activation())
        in_channels = int(out_channels)
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class VisionNetwork(TorchModel):
    """Nature-DQN conv net for channels-last image stacks, e.g. ``(84, 84, 4)`` uint8.

    Conv 32x8 s4, 64x4 s2, 64x3 s1 (or ``conv_filters``), then fc 512 and the
    heads. ``uint8`` observations are scaled by 1/255 inside the model so frames
    stay uint8 from the env to the learner. Without ``vf_share_layers`` the
    value function has its own conv stack.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.Space,
        num_outputs: int,
        model_config: dict[str, Any],
    ) -> None:
        super().__init__(obs_space, action_space, num_outputs, model_config)
        if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 3):
            raise ValueError(
                f"VisionNetwork needs a 3-D (H, W, C) Box observation space, got {obs_space!r}"
            )
        height, width, channels = (int(d) for d in obs_space.shape)
        self.scale = 1.0 / 255.0 if obs_space.dtype == np.uint8 else 1.0
        filters = model_config.get("conv_filters") or _NATURE_CONV_FILTERS
        activation = _activation(model_config.get("conv_activation", "relu"))
        self.vf_share_layers = bool(model_config.get("vf_share_layers", False))

        def tower() -> nn.Sequential:
            convs = _conv_stack(channels, filters, activation)
            with torch.no_grad():
                flat = convs(torch.zeros(1, channels, height, width)).shape[1]
            fc: list[nn.Module] = [_linear(flat, _NATURE_FC_SIZE, gain=float(np.sqrt(2.0)))]
            if activation is not None:
                fc.append(activation())
            return nn.Sequential(convs, *fc)

        self.policy_tower = tower()
        self.policy_head = self._make_policy_head(_NATURE_FC_SIZE)
        self.value_tower = None if self.vf_share_layers else tower()
        self.value_head = _linear(_NATURE_FC_SIZE, 1, gain=1.0)

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` raw frames -> ``[B, C, H, W]`` float32 in [0, 1]."""
        x = obs.permute(0, 3, 1, 2).float()
        return x * self.scale if self.scale != 1.0 else x

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(obs)
        features = self.policy_tower(x)
        dist_inputs = self._policy_output(self.policy_head(features))
        value_features = features if self.value_tower is None else self.value_tower(x)
        return dist_inputs, self.value_head(value_features).squeeze(-1)


def _is_image_space(space: gym.Space) -> bool:
    return (
        isinstance(space, gym.spaces.Box)
        and len(space.shape) == 3
        and space.shape[0] >= 32
        and space.shape[1] >= 32
    )


def get_model(
    obs_space: gym.Space,
    action_space: gym.Space,
    num_outputs: int,
    model_config: dict[str, Any] | None,
) -> nn.Module:
    """Build the model for these spaces; ``model_config`` is merged over :data:`MODEL_DEFAULTS`.

    ``custom_model`` (a registered name, a model class, or an import string
    ``"path/to/file.py:Model"``) takes precedence over the built-ins. Unsupported observation spaces raise ``ValueError``.
    """
    config = merge_model_config(model_config)
    custom = config.get("custom_model")
    if custom is not None:
        if isinstance(custom, str) and custom not in _CUSTOM_MODELS and \
                is_import_string(custom):
            cls = load_object(custom)  # "path/to/file.py:MyModel" from --config
        elif isinstance(custom, str):
            if custom not in _CUSTOM_MODELS:
                raise ValueError(
                    f"unknown custom_model {custom!r}; registered models: {sorted(_CUSTOM_MODELS)} "
                    "(call flowrl.policies.register_custom_model first)"
                )
            cls = _CUSTOM_MODELS[custom]
        elif isinstance(custom, type):
            cls = custom
        else:
            raise ValueError(f"custom_model must be a registered name or a class, got {custom!r}")
        return cls(obs_space, action_space, num_outputs, config)
    if _is_image_space(obs_space):
        return VisionNetwork(obs_space, action_space, num_outputs, config)
    if isinstance(obs_space, (gym.spaces.Box, gym.spaces.Discrete)):
        return FullyConnectedNetwork(obs_space, action_space, num_outputs, config)
    raise ValueError(
        f"no built-in model for observation space {obs_space!r}: use a Box or Discrete "
        "observation space or register a custom model"
    )
