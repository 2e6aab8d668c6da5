"""Model catalog: built-in torch models and the custom-model registry.

Every model -- built-in or custom -- is constructed as
``cls(obs_space, action_space, num_outputs, model_config)`` and implements
``forward(obs) -> (dist_inputs [B, num_outputs], value [B])``. ``obs`` is the
raw observation batch, unpreprocessed, so the sampler ships observations as the
env gives them and models do their own preprocessing (one-hot, flatten, scale by
1/255):

* a plain space gives one tensor ``[B, *shape]`` (integer indices ``[B]`` for
  ``Discrete``, ``uint8`` frames for images, int64 ``MultiDiscrete``, int8
  ``MultiBinary``, float32 ``Box``);
* a ``Dict`` / ``Tuple`` space gives the same structure of tensors: a ``dict`` of
  its keys / a ``tuple`` of its positions, one ``[B, ...]`` tensor per leaf with the
  dtypes above. Leaves without an array form (``Text``, MiniGrid's mission string)
  are left out: models are built for :func:`~flowrl.data.spaces.array_leaf_spaces`
  of the space and never see them. Custom models receive this nested structure too.

:class:`ObservationEncoder` turns any such observation into float32 features
``[B, size]`` (one encoder per leaf, concatenated in leaf order); custom models can
use it as their first layer.

Which built-in model :func:`get_model` picks:

* an image (a 3-D ``Box`` whose spatial sides are both >= 8, channels last
  ``(H, W, C)`` or channels first ``(C, H, W)``, see :func:`image_layout`)
  -> :class:`VisionNetwork` (conv stack; ``uint8`` obs scaled by 1/255);
* ``Box``, ``Discrete``, ``MultiDiscrete``, ``MultiBinary``, ``Dict``, ``Tuple``
  -> :class:`FullyConnectedNetwork` on the :class:`ObservationEncoder` features.

A masked observation (a ``Dict`` of ``action_mask`` and ``observations``) is handled
by wrapping the model of its ``observations`` part in :class:`ActionMaskedModel`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.spaces import ACTION_MASK, LeafPath, array_leaf_spaces, is_nested
from flowrl.imports import is_import_string, load_object

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_DEFAULTS",
    "TorchModel",
    "TwinMLP",
    "ObservationEncoder",
    "FullyConnectedNetwork",
    "VisionNetwork",
    "ActionMaskedModel",
    "image_layout",
    "register_custom_model",
    "get_model",
    "merge_model_config",
]

MODEL_DEFAULTS: dict[str, Any] = {
    # Hidden layer sizes of the fully connected net (policy and value towers each).
    "fcnet_hiddens": [64, 64],
    # "tanh" | "relu" | "elu" | "silu" (alias "swish") | "linear".
    "fcnet_activation": "tanh",
    # Conv stack as [[out_channels, kernel, stride(, padding)], ...]. None: Nature DQN
    # for images of 36x36 and up, a padded 3x3 stride-2 stack for smaller ones.
    "conv_filters": None,
    "conv_activation": "relu",
    # Share the hidden layers between policy and value heads.
    "vf_share_layers": False,
    # Box actions: one learned log-std per action dimension, independent of the state
    # (starts at 0, std 1). False: the policy head outputs a log-std per state. Ignored
    # for other action spaces.
    "free_log_std": True,
    # Recurrent policies (PG, A2C, A3C, PPO, IMPALA): wrap the model's encoder and MLP
    # in an LSTM of lstm_cell_size units; training cuts episodes into sequences of at
    # most max_seq_len steps (flowrl.policies.recurrent).
    "use_lstm": False,
    "lstm_cell_size": 256,
    "max_seq_len": 20,
    # Feed the previous action / reward to the LSTM along with the observation.
    "lstm_use_prev_action": False,
    "lstm_use_prev_reward": False,
    # A name given to register_custom_model (or the model class itself).
    "custom_model": None,
    "custom_model_config": {},
}

# Nature DQN (Mnih et al. 2015): 84x84 -> 20x20 -> 9x9 -> 7x7, then fc 512.
_NATURE_CONV_FILTERS = [[32, 8, 4], [64, 4, 2], [64, 3, 1]]
_NATURE_FC_SIZE = 512
# The smallest sides the Nature stack fits (36 -> 8 -> 3 -> 1).
_NATURE_MIN_SIDE = 36
# Below that: 3x3 stride-2 convs padded by 1 halve each side (rounding up), so any
# image of 8x8 and up keeps at least 1x1 after three layers.
_SMALL_CONV_FILTERS = [[32, 3, 2, 1], [64, 3, 2, 1], [64, 3, 2, 1]]
# Both spatial sides of a 3-D Box must be at least this for it to count as an image.
_MIN_IMAGE_SIDE = 8
# Width of the projection after an image leaf's conv stack in ObservationEncoder.
_IMAGE_FEATURES = 256

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


class CustomModelRegistry(Mapping):
    """Model classes registered by name, seen by every process of the Ray job.

    A name registered in the driver is stored in this process and in Ray's registry
    (the one ``register_env`` and Tune use, category ``rllib_model``), so rollout
    workers and Tune trial processes find it too: a lookup that misses here asks Ray's
    registry (when Ray runs) and keeps what it finds. Iterating lists this process's
    names.
    """

    # Ray's category for models (Tune's registry accepts known categories only).
    RAY_CATEGORY = "rllib_model"

    def __init__(self) -> None:
        self._local: dict[str, type[nn.Module]] = {}

    def register(self, name: str, cls: type[nn.Module]) -> None:
        """Stores ``cls`` under ``name`` here and, for other processes, in Ray's registry."""
        self._local[name] = cls
        from ray.tune.registry import _global_registry
        try:
            # Pickled now; flushed to Ray when it starts (or at once if it runs).
            _global_registry.register(self.RAY_CATEGORY, name, cls)
        except Exception as e:  # an unpicklable class still works in this process
            logger.warning("register_custom_model(%r): %s cannot be pickled (%s); it is "
                           "available in this process only, not in Ray workers.",
                           name, cls, e)

    def _remote(self, name: str) -> type[nn.Module] | None:
        """``name`` from Ray's registry (a class registered by the driver), or None."""
        import ray
        if not ray.is_initialized():
            return None
        from ray.tune.registry import _global_registry
        if not _global_registry.contains(self.RAY_CATEGORY, name):
            return None
        try:
            cls = _global_registry.get(self.RAY_CATEGORY, name)
        except Exception as e:  # pickled by reference to a module this process lacks
            raise ValueError(
                f"custom_model {name!r} was registered in the driver, but its class cannot "
                f"be loaded in this process ({type(e).__name__}: {e}); define it in a "
                "module the workers can import, or in the driver script itself") from e
        self._local[name] = cls
        return cls

    def __getitem__(self, name: str) -> type[nn.Module]:
        if name in self._local:
            return self._local[name]
        cls = self._remote(name) if isinstance(name, str) else None
        if cls is None:
            raise KeyError(name)
        return cls

    def __contains__(self, name: object) -> bool:
        return name in self._local or (isinstance(name, str) and
                                       self._remote(name) is not None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._local)

    def __len__(self) -> int:
        return len(self._local)


_CUSTOM_MODELS = CustomModelRegistry()


def merge_model_config(model_config: dict | None) -> dict[str, Any]:
    """``model_config`` over :data:`MODEL_DEFAULTS` (copies; inputs untouched)."""
    merged = copy.deepcopy(MODEL_DEFAULTS)
    merged.update(copy.deepcopy(model_config or {}))
    return merged


def register_custom_model(name: str, cls: type[nn.Module]) -> None:
    """Make ``cls`` available as ``model={"custom_model": name}``.

    ``cls(obs_space, action_space, num_outputs, model_config)`` builds the model;
    its ``forward(obs)`` gets the raw observation batch: one tensor for a plain
    space, a nested ``dict`` / ``tuple`` of ``[B, ...]`` tensors (one per leaf, leaves
    without an array form left out) for a ``Dict`` / ``Tuple`` space. An
    :class:`ObservationEncoder` turns either into float32 features.

    Registering in the driver is enough: the class is also stored in Ray's registry
    (pickled by value where it is not importable, e.g. defined in a script), so remote
    rollout workers and Tune trial processes of the same Ray job find the name. Classes
    that cannot be pickled stay available in this process only (a warning says so).
    Putting the class itself in ``custom_model`` works too.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"custom model name must be a non-empty string, got {name!r}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_custom_model({name!r}, ...): expected a torch.nn.Module "
                        f"subclass, got {cls!r}")
    _CUSTOM_MODELS.register(name, cls)


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


# ------------------------------------------------------------------- images
ImageLayout = Literal["HWC", "CHW"]


def _layout_and_dims(shape: tuple[int, ...]) -> tuple[ImageLayout, int, int, int]:
    """``(layout, channels, height, width)`` of a 3-D shape by :func:`image_layout`'s rule,
    whatever its size."""
    if shape[0] < shape[2]:
        return "CHW", int(shape[0]), int(shape[1]), int(shape[2])
    return "HWC", int(shape[2]), int(shape[0]), int(shape[1])


def image_layout(space: gym.Space) -> ImageLayout | None:
    """How the catalog reads ``space`` as an image: ``"HWC"``, ``"CHW"``, or None.

    An image is a 3-D ``Box`` whose two spatial sides are both at least 8. It is
    channels-first (``"CHW"``, e.g. ``FrameStackObservation``'s ``(4, 84, 84)``)
    when ``shape[0] < shape[2]``, channels-last (``"HWC"``, e.g. Atari's
    ``(84, 84, 4)``) otherwise. Any other space gives None, including 3-D Boxes with
    a side below 8 (MiniGrid's ``(7, 7, 3)`` grid), which models flatten instead.
    """
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 3:
        return None
    layout, _, height, width = _layout_and_dims(space.shape)
    return layout if min(height, width) >= _MIN_IMAGE_SIDE else None


def _is_image_space(space: gym.Space) -> bool:
    """Whether the catalog gives ``space`` a conv stack (see :func:`image_layout`)."""
    return image_layout(space) is not None


def _too_small_for_convs(space: gym.spaces.Box, owner: str) -> ValueError:
    _, _, height, width = _layout_and_dims(space.shape)
    return ValueError(
        f"{owner}: a conv stack needs an image of at least {_MIN_IMAGE_SIDE}x{_MIN_IMAGE_SIDE}, "
        f"got a {height}x{width} one ({space!r}); smaller 3-D Boxes are flattened into "
        "the MLP when conv_filters is left unset"
    )


def _conv_filter_entry(entry: Any) -> list[int]:
    """One ``conv_filters`` entry as ints; a square ``[k, k]`` kernel or stride (the
    form RLlib configs use) becomes ``k``."""
    def size(value: Any) -> int:
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise ValueError(
                    f"conv_filters entry {entry!r}: kernels and strides are square here, "
                    f"one int or [k, k]; got {value!r}")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(
                "conv_filters entries are [out_channels, kernel, stride] or [out_channels, "
                f"kernel, stride, padding] with whole numbers, got {entry!r}")
        return int(value)
    if not isinstance(entry, (list, tuple)):
        raise ValueError(
            "conv_filters entries are [out_channels, kernel, stride] or [out_channels, "
            f"kernel, stride, padding], got {entry!r}")
    return [size(value) for value in entry]


def _conv_filters_for(model_config: dict[str, Any], height: int,
                      width: int) -> tuple[list[list[int]], int]:
    """``conv_filters`` (or the default stack for this size) and the flattened size of
    their output on a ``height x width`` image; ValueError if they shrink it to nothing."""
    given = model_config.get("conv_filters")
    if given:
        filters = [_conv_filter_entry(entry) for entry in given]
    elif min(height, width) >= _NATURE_MIN_SIDE:
        filters = _NATURE_CONV_FILTERS
    else:
        filters = _SMALL_CONV_FILTERS
    out_h, out_w = height, width
    for entry in filters:
        if len(entry) not in (3, 4) or min(entry[:3]) < 1 or (len(entry) == 4 and entry[3] < 0):
            raise ValueError(
                "conv_filters entries are [out_channels, kernel, stride] or [out_channels, "
                f"kernel, stride, padding] with positive sizes, got {entry!r}")
        _, kernel, stride = entry[:3]
        padding = entry[3] if len(entry) == 4 else 0
        out_h = (out_h + 2 * padding - kernel) // stride + 1
        out_w = (out_w + 2 * padding - kernel) // stride + 1
        if out_h < 1 or out_w < 1:
            raise ValueError(
                f"conv_filters {filters} shrink the {height}x{width} image to nothing "
                f"(layer {entry} leaves {max(out_h, 0)}x{max(out_w, 0)}); use smaller kernels "
                "or strides, or padding as a 4th entry")
    return filters, filters[-1][0] * out_h * out_w


def _conv_stack(
    in_channels: int, filters: list[list[int]], activation: type[nn.Module] | None
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for entry in filters:
        out_channels, kernel, stride = (int(v) for v in entry[:3])
        padding = int(entry[3]) if len(entry) > 3 else 0
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
        nn.init.orthogonal_(conv.weight, gain=float(np.sqrt(2.0)))
        nn.init.zeros_(conv.bias)
        layers.append(conv)
        if activation is not None:
            layers.append(activation())
        in_channels = out_channels
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class _ImageSpec:
    """What a conv tower needs to know about one image space (checked on construction)."""

    def __init__(self, space: gym.Space, model_config: dict[str, Any], owner: str) -> None:
        if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 3):
            raise ValueError(
                f"{owner} needs a 3-D image Box, (H, W, C) or (C, H, W), got {space!r}")
        layout, self.channels, self.height, self.width = _layout_and_dims(space.shape)
        if min(self.height, self.width) < _MIN_IMAGE_SIDE:
            raise _too_small_for_convs(space, owner)
        self.channels_last = layout == "HWC"
        # uint8 frames travel unscaled from the env to the learner; scale on the device.
        self.scale = 1.0 / 255.0 if space.dtype == np.uint8 else 1.0
        self.filters, self.conv_out = _conv_filters_for(model_config, self.height, self.width)

    def tower(self, activation: type[nn.Module] | None, fc_size: int) -> nn.Sequential:
        """Conv stack -> flatten -> Linear(``fc_size``) -> activation."""
        layers: list[nn.Module] = [
            _conv_stack(self.channels, self.filters, activation),
            _linear(self.conv_out, fc_size, gain=float(np.sqrt(2.0))),
        ]
        if activation is not None:
            layers.append(activation())
        return nn.Sequential(*layers)


def _to_nchw(obs: torch.Tensor, channels_last: bool, scale: float) -> torch.Tensor:
    """Raw image batch -> ``[B, C, H, W]`` float32 (scaled to [0, 1] for uint8).

    Converted and scaled in the input's own layout, then permuted (a view): the same
    channels-last strides as permuting first, but the uint8 -> float pass reads
    memory in order and the scaling reuses the converted copy, which halves the
    time of this step for a 512-frame batch on CPU.
    """
    x = obs.float()
    if scale != 1.0:
        x = x * scale if x is obs else x.mul_(scale)  # in place only on the fresh copy
    return x.permute(0, 3, 1, 2) if channels_last else x


# ------------------------------------------------------------------ encoders
class _FlattenLeaf(nn.Module):
    """Box (non-image) or MultiBinary leaf -> flattened float32."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.size = int(np.prod(shape))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], -1).float()


class _OneHotLeaf(nn.Module):
    """Discrete leaf ``[B]`` -> one-hot ``[B, n]`` of ``obs - start``."""

    def __init__(self, space: gym.spaces.Discrete) -> None:
        super().__init__()
        self.size = int(space.n)
        self.start = int(space.start)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(obs.reshape(-1).long() - self.start, self.size).float()


class _MultiOneHotLeaf(nn.Module):
    """MultiDiscrete leaf -> the one-hots of its components (``nvec[i]`` wide each),
    concatenated in flattened component order."""

    def __init__(self, space: gym.spaces.MultiDiscrete) -> None:
        super().__init__()
        nvec = np.asarray(space.nvec, dtype=np.int64).reshape(-1)
        start = np.asarray(space.start, dtype=np.int64).reshape(-1)
        self.size = int(nvec.sum())
        offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]]).astype(np.int64)
        # Component i's value v is column offsets[i] + v - start[i]: one scatter for all.
        # Not persistent: a constant of the space, not a weight.
        self.register_buffer("shift", torch.from_numpy(offsets - start), persistent=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        index = obs.reshape(obs.shape[0], -1).long() + self.shift
        out = torch.zeros(index.shape[0], self.size, device=obs.device)
        return out.scatter_(1, index, 1.0)


class _ImageLeaf(nn.Module):
    """Image leaf -> conv stack -> Linear to ``_IMAGE_FEATURES`` -> ``conv_activation``.

    The conv output's width grows with the image (3136 for 84x84, 64 for 8x8). The
    projection keeps the encoder's width, and so the first MLP layer, independent of
    the resolution, and stops a single image from outweighing the other leaves by
    thousands of features to a handful in the concatenation.
    """

    def __init__(self, space: gym.spaces.Box, model_config: dict[str, Any]) -> None:
        super().__init__()
        spec = _ImageSpec(space, model_config, "ObservationEncoder")
        self.channels_last = spec.channels_last
        self.scale = spec.scale
        self.net = spec.tower(_activation(model_config.get("conv_activation", "relu")),
                              _IMAGE_FEATURES)
        self.size = _IMAGE_FEATURES

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(_to_nchw(obs, self.channels_last, self.scale))


def _leaf_spaces(space: gym.Space, prefix: LeafPath = ()) -> list[tuple[LeafPath, gym.Space]]:
    """``(path, leaf space)`` of every leaf, Dict keys in the space's order, Tuple by index."""
    if isinstance(space, gym.spaces.Dict):
        children: list[tuple[Any, gym.Space]] = list(space.spaces.items())
    elif isinstance(space, gym.spaces.Tuple):
        children = list(enumerate(space.spaces))
    else:
        return [(prefix, space)]
    leaves: list[tuple[LeafPath, gym.Space]] = []
    for key, sub in children:
        leaves.extend(_leaf_spaces(sub, (*prefix, key)))
    return leaves


def _leaf_encoder(space: gym.Space, path: LeafPath, model_config: dict[str, Any]) -> nn.Module:
    if isinstance(space, gym.spaces.Box):
        if _is_image_space(space):
            return _ImageLeaf(space, model_config)
        return _FlattenLeaf(space.shape)
    if isinstance(space, gym.spaces.Discrete):
        return _OneHotLeaf(space)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return _MultiOneHotLeaf(space)
    if isinstance(space, gym.spaces.MultiBinary):
        return _FlattenLeaf(space.shape)
    where = f" (leaf {'/'.join(str(k) for k in path)})" if path else ""
    raise ValueError(
        f"no observation encoder for the space {space!r}{where}: supported are Box, Discrete, "
        "MultiDiscrete and MultiBinary, also inside Dict / Tuple; use a custom model for others"
    )


class ObservationEncoder(nn.Module):
    """Raw observation batch of any supported space -> float32 features ``[B, size]``.

    One encoder per leaf, outputs concatenated in leaf order (a ``Dict``'s key
    order, a ``Tuple``'s positions, depth first):

    * ``Box`` that is an image (:func:`image_layout`) -> conv stack (``conv_filters``,
      else Nature DQN for sides >= 36 and three padded 3x3 stride-2 convs below) ->
      Linear to 256 -> ``conv_activation``; ``uint8`` scaled by 1/255, channels-first
      images used as they are;
    * any other ``Box`` -> flattened, as float (no scaling);
    * ``Discrete`` -> one-hot of ``obs - start``;
    * ``MultiDiscrete`` -> one one-hot per component (``obs[i] - start[i]`` among
      ``nvec[i]``), concatenated;
    * ``MultiBinary`` -> flattened, as float.

    ``obs`` is one tensor for a plain space, nested ``dict`` / ``tuple`` of tensors
    for ``Dict`` / ``Tuple``. Leaves without an array form are left out (the encoder
    is built for :func:`~flowrl.data.spaces.array_leaf_spaces`); other leaf spaces
    raise ``ValueError``. ``conv_filters`` set for a space whose only 3-D ``Box``
    leaves are too small to be images raises ``ValueError`` (8x8 is the minimum).

        encode = ObservationEncoder(env.observation_space, {})
        head = nn.Linear(encode.size, 64)   # head(encode(obs))
    """

    def __init__(self, obs_space: gym.Space, model_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        config = model_config or {}
        space = array_leaf_spaces(obs_space)
        leaves = _leaf_spaces(space)
        if config.get("conv_filters"):
            cubes = [leaf for _, leaf in leaves
                     if isinstance(leaf, gym.spaces.Box) and len(leaf.shape) == 3]
            if cubes and not any(_is_image_space(leaf) for leaf in cubes):
                raise _too_small_for_convs(cubes[0], "conv_filters")
        self.obs_space = space
        self._nested = is_nested(space)
        self._paths = [path for path, _ in leaves]
        self.leaf_encoders = nn.ModuleList(
            [_leaf_encoder(leaf, path, config) for path, leaf in leaves])
        self.size = sum(int(encoder.size) for encoder in self.leaf_encoders)
        # Plain vector Box / MultiBinary and Discrete obs are encoded inline in forward:
        # no sub-module call on the hot path of small classic-control nets.
        self._flatten = not self._nested and isinstance(
            self.leaf_encoders[0], _FlattenLeaf)
        one_hot = None if self._nested else self.leaf_encoders[0]
        self._one_hot_size = one_hot.size if isinstance(one_hot, _OneHotLeaf) else None
        self._one_hot_start = one_hot.start if isinstance(one_hot, _OneHotLeaf) else 0

    def forward(self, obs: Any) -> torch.Tensor:
        """Observation batch (a tensor, or nested dict / tuple of tensors) -> ``[B, size]``."""
        # The isinstance check and the is_scripting branch let TorchScript compile the
        # plain-space paths (policy exports) and skip the nested one.
        if isinstance(obs, torch.Tensor):
            if self._flatten:
                return obs.reshape(obs.shape[0], -1).float()
            if self._one_hot_size is not None:
                return nn.functional.one_hot(
                    obs.long() - self._one_hot_start, self._one_hot_size).float()
            if not self._nested:
                return self.leaf_encoders[0](obs)
        if torch.jit.is_scripting():
            raise RuntimeError("TorchScript models take plain tensor observations only")
        else:
            features = []
            for path, encoder in zip(self._paths, self.leaf_encoders):
                leaf = obs
                for key in path:
                    leaf = leaf[key]
                features.append(encoder(leaf))
            return torch.cat(features, dim=1)


# -------------------------------------------------------------------- models
class FullyConnectedNetwork(TorchModel):
    """MLP on :class:`ObservationEncoder` features (any supported observation space).

    Separate policy and value towers of ``fcnet_hiddens`` each (evaluated
    together by :class:`TwinMLP`), or one shared trunk with two linear heads
    when ``vf_share_layers`` is set. The encoder (conv stacks of image leaves
    included) is shared by both towers.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.Space,
        num_outputs: int,
        model_config: dict[str, Any],
    ) -> None:
        super().__init__(obs_space, action_space, num_outputs, model_config)
        self.encoder = ObservationEncoder(obs_space, model_config)
        in_size = self.encoder.size
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

    def preprocess(self, obs: Any) -> torch.Tensor:
        """Raw obs -> float32 ``[B, features]`` (see :class:`ObservationEncoder`)."""
        return self.encoder(obs)

    def forward(self, obs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(obs)
        if self.twin is not None:
            policy_out, value = self.twin(x)
            return self._policy_output(policy_out), value
        features = self.trunk(x)
        dist_inputs = self._policy_output(self.policy_head(features))
        return dist_inputs, self.value_head(features).squeeze(-1)


class VisionNetwork(TorchModel):
    """Conv net for image observations, e.g. Atari's ``(84, 84, 4)`` uint8 frame stacks.

    Channels-last ``(H, W, C)`` and channels-first ``(C, H, W)`` images are both
    accepted (:func:`image_layout`). Conv stack: ``conv_filters``, else Nature DQN
    (32x8 s4, 64x4 s2, 64x3 s1) for sides >= 36 and three 3x3 stride-2 convs padded
    by 1 (32, 64, 64 channels) for smaller images (8x8 at least); then fc 512 and
    the heads. ``uint8`` observations are scaled by 1/255 inside the model so frames
    stay uint8 from the env to the learner. Without ``vf_share_layers`` the value
    function has its own conv stack.
    """

    def __init__(
        self,
        obs_space: gym.Space,
        action_space: gym.Space,
        num_outputs: int,
        model_config: dict[str, Any],
    ) -> None:
        super().__init__(obs_space, action_space, num_outputs, model_config)
        spec = _ImageSpec(obs_space, model_config, "VisionNetwork")
        self.channels_last = spec.channels_last
        self.scale = spec.scale
        activation = _activation(model_config.get("conv_activation", "relu"))
        self.vf_share_layers = bool(model_config.get("vf_share_layers", False))

        self.policy_tower = spec.tower(activation, _NATURE_FC_SIZE)
        self.policy_head = self._make_policy_head(_NATURE_FC_SIZE)
        self.value_tower = None if self.vf_share_layers else spec.tower(activation,
                                                                        _NATURE_FC_SIZE)
        self.value_head = _linear(_NATURE_FC_SIZE, 1, gain=1.0)

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw frames (either layout) -> ``[B, C, H, W]`` float32 (in [0, 1] for uint8)."""
        return _to_nchw(obs, self.channels_last, self.scale)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(obs)
        features = self.policy_tower(x)
        dist_inputs = self._policy_output(self.policy_head(features))
        value_features = features if self.value_tower is None else self.value_tower(x)
        return dist_inputs, self.value_head(value_features).squeeze(-1)


class ActionMaskedModel(nn.Module):
    """Masks the logits of a model for a masked observation ``{"action_mask", obs_key}``.

    ``forward(obs)`` runs ``inner(obs[obs_key])`` and sets the logits of actions whose
    ``obs["action_mask"]`` entry is 0 to the most negative finite value of their
    dtype: after a softmax those actions have probability exactly 0, while
    log-probabilities, entropies and KLs stay finite (``0 * min`` is 0 where
    ``0 * -inf`` would be nan). A row whose mask is all zeros (the terminal
    observation of some games) is left unmasked. ``inner`` may return
    ``(dist_inputs, value, ...)`` -- the first element is masked -- or one tensor such
    as DQN's Q-values ``[B, n]``, which is masked and returned.

    With ``mask_space`` and ``num_outputs`` the mask width is checked against the
    logits once, here; without them, on every call.
    """

    def __init__(
        self,
        inner: nn.Module,
        obs_key: str,
        mask_space: gym.Space | None = None,
        num_outputs: int | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.obs_key = obs_key
        self.num_outputs = None if num_outputs is None else int(num_outputs)
        mask_size = None
        if mask_space is not None:
            if not isinstance(mask_space, (gym.spaces.Box, gym.spaces.MultiBinary)) or \
                    len(mask_space.shape) != 1:
                raise ValueError(
                    f"the action mask must be a 1-D Box or MultiBinary space, got {mask_space!r}")
            mask_size = int(mask_space.shape[0])
        if mask_size is not None and self.num_outputs is not None and \
                mask_size != self.num_outputs:
            raise ValueError(
                f"the action mask has {mask_size} entries but the model outputs "
                f"{self.num_outputs} logits; they must match (one mask entry per action)")
        self._check_each_call = mask_size is None or self.num_outputs is None

    def mask_logits(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``logits [B, n]`` with the entries where ``mask [B, n]`` is 0 set to the dtype's
        minimum (rows with an all-zero mask unchanged)."""
        if self._check_each_call and mask.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"the action mask has {mask.shape[-1]} entries but the model outputs "
                f"{logits.shape[-1]} logits; they must match (one mask entry per action)")
        blocked = mask == 0
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return logits.masked_fill(blocked, torch.finfo(logits.dtype).min)

    def forward(self, obs: dict[str, Any]) -> Any:
        out = self.inner(obs[self.obs_key])
        if isinstance(out, (tuple, list)):
            return (self.mask_logits(out[0], obs[ACTION_MASK]), *out[1:])
        return self.mask_logits(out, obs[ACTION_MASK])


_BUILT_IN_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete,
                    gym.spaces.MultiBinary, gym.spaces.Dict, gym.spaces.Tuple)


def get_model(
    obs_space: gym.Space,
    action_space: gym.Space,
    num_outputs: int,
    model_config: dict[str, Any] | None,
) -> nn.Module:
    """Build the model for these spaces; ``model_config`` is merged over :data:`MODEL_DEFAULTS`.

    ``custom_model`` (a registered name, a model class, or an import string
    ``"path/to/file.py:Model"``) takes precedence over the built-ins; it receives the
    observations as the built-ins do (nested tensors for ``Dict`` / ``Tuple``). Images
    get a :class:`VisionNetwork`; ``Box``, ``Discrete``, ``MultiDiscrete``,
    ``MultiBinary``, ``Dict`` and ``Tuple`` spaces a :class:`FullyConnectedNetwork`.
    Other observation spaces raise ``ValueError``.
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
    if isinstance(obs_space, _BUILT_IN_SPACES):
        return FullyConnectedNetwork(obs_space, action_space, num_outputs, config)
    raise ValueError(
        f"no built-in model for observation space {obs_space!r}: use a Box, Discrete, "
        "MultiDiscrete, MultiBinary, Dict or Tuple space, or register a custom model"
    )
