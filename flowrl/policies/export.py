"""TorchScript export of a policy's greedy actions: raw observations in, actions out.

    path = agent.export_policy("exported/")        # exported/policy.pt + policy.json

    # anywhere, with torch alone (no flowrl import):
    module = torch.jit.load("exported/policy.pt")
    actions = module(torch.as_tensor(obs_batch))   # [B] int64 or [B, *shape] float

The module takes a batch of observations exactly as the env returns them (uint8
``[B, 84, 84, 4]`` Atari frame stacks, float32 ``[B, 4]`` CartPole states, int
indices for ``Discrete`` observations) and returns the action the agent takes with
``explore=False``: the argmax for ``Discrete`` actions, the mean / deterministic
action for ``Box`` actions, clipped to the space bounds when the agent clips
(``clip_actions``, on by default); the argmax per component for ``MultiDiscrete`` /
``MultiBinary`` actions (int64 ``[B, *shape]``); for ``Tuple`` / ``Dict`` actions one
flat float32 row ``[B, D]`` per observation, which
``flowrl.data.actions.ActionLayout(space).to_env(row, clip=False)`` (or the
``action_row`` slots in ``policy.json``) turns into the nested action. Each policy
class builds its eager module with ``export_module()``; this file holds the shared
head modules, the conversion to TorchScript (``torch.jit.script`` where the model
allows it, else ``torch.jit.trace``, checked on several batch sizes) and the atomic
writing of the two files.

Recurrent policies (``model.use_lstm`` or a ``RecurrentModel`` custom model) export a
module that takes the state with the observations and returns the next state with the
actions, one step per call::

    module(obs, *state_in[, prev_actions][, prev_rewards]) -> (actions, *state_out)

    state = [torch.zeros(B, 256), torch.zeros(B, 256)]    # LSTM [h, c]: the initial state
    prev_actions, prev_rewards = torch.zeros(B, dtype=torch.int64), torch.zeros(B)
    for t in range(T):
        actions, *state = module(obs, *state, prev_actions, prev_rewards)
        ...                                               # step the envs with actions
        prev_actions, prev_rewards = actions, rewards

``state_in`` is one float32 ``[B, size]`` tensor per state part (``policy.json`` lists
the parts, their sizes and initial values, and the traced module keeps them as buffers
``initial_state_0``, ``initial_state_1``, ...); at an episode's start a row's state is
the initial state and its previous action and reward are zeros. ``prev_actions``
(actions as the module returns them, ``[B, *action_shape]``) and ``prev_rewards``
(float32 ``[B]``) are arguments only when the model was configured to use them
(``lstm_use_prev_action`` / ``lstm_use_prev_reward``). A ``Dict`` / ``Tuple``
observation takes one tensor per leaf, as for other policies, before the state.
Box actions come out clipped to the bounds when the agent clips, and that is what the
module expects back as ``prev_actions``; ``Agent.compute_action`` and the training
sampler feed back the unclipped action, so the two agree while the mean stays inside
the bounds. Recurrent exports are traced (the model's single-step path; checked on several batch
sizes against the eager module).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import uuid
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.actions import ActionLayout
from flowrl.policies.distributions import ProductDistribution, get_dist_class
from flowrl.data.spaces import ObservationPacker, array_leaf_spaces, is_nested, leaf_paths
from flowrl.policies.nested import map_rows
from flowrl.version import __version__

__all__ = [
    "EXPORT_FILE", "METADATA_FILE", "ArgmaxHead", "DistInputsGreedy", "BoxActionHead",
    "MultiArgmaxHead", "ProductGreedyHead", "RecurrentStep", "RecurrentGreedy",
    "greedy_head", "describe_space",
    "describe_action_row", "describe_export", "to_torchscript", "write_export",
]

EXPORT_FILE = "policy.pt"
METADATA_FILE = "policy.json"

# Batch sizes the exported module is checked on against the eager one: a traced module
# that baked its example's batch size in would fail here, not in the user's process.
_CHECK_BATCH_SIZES = (1, 3, 2)


def _box_bounds(space: gym.spaces.Box) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    dtype = torch.float64 if np.dtype(space.dtype) == np.float64 else torch.float32
    low = torch.as_tensor(np.asarray(space.low, dtype=np.float64).reshape(-1), dtype=dtype)
    high = torch.as_tensor(np.asarray(space.high, dtype=np.float64).reshape(-1), dtype=dtype)
    return low, high, dtype


class BoxActionHead(nn.Module):
    """Flat ``[B, k]`` actions -> clipped to ``[low, high]`` (optional) -> ``[B, *shape]``.

    Clipping uses the space's bounds (infinite bounds clip nothing), in the action
    space's float dtype.
    """

    def __init__(self, action_space: gym.spaces.Box, clip: bool) -> None:
        super().__init__()
        low, high, _ = _box_bounds(action_space)
        self.clip = bool(clip)
        self.action_shape = [int(d) for d in action_space.shape]
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, flat_actions: torch.Tensor) -> torch.Tensor:
        actions = flat_actions.to(self.low.dtype)
        if self.clip:
            actions = torch.minimum(torch.maximum(actions, self.low), self.high)
        return actions.reshape([-1] + self.action_shape)


class ArgmaxHead(nn.Module):
    """``model(obs) -> scores [B, n]`` (Q-values, logits) -> ``argmax`` int64 ``[B]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.argmax(self.model(obs), dim=-1)


class MultiArgmaxHead(nn.Module):
    """Logits of independent categoricals side by side, ``[B, sum(nvec)]`` -> the
    argmax per component, int64 ``[B, *action_shape]`` (``MultiDiscrete`` /
    ``MultiBinary``: one index per component)."""

    def __init__(self, nvec: list[int], action_shape: list[int]) -> None:
        super().__init__()
        self.num_components = len(nvec)
        self.max_n = max(nvec)
        self.action_shape = [int(d) for d in action_shape]
        # Padded position j of component c reads input column offset_c + j, or the
        # appended -inf column past the component's size (never the argmax).
        total = sum(nvec)
        pad = torch.full((self.num_components, self.max_n), total, dtype=torch.long)
        offset = 0
        for c, n in enumerate(nvec):
            pad[c, :n] = torch.arange(offset, offset + n)
            offset += n
        self.register_buffer("pad_index", pad.reshape(-1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        pad = torch.full_like(logits[:, :1], float("-inf"))
        padded = torch.cat([logits, pad], dim=1).index_select(1, self.pad_index)
        best = torch.argmax(padded.reshape(-1, self.num_components, self.max_n), dim=-1)
        return best.reshape([-1] + self.action_shape)


class ProductGreedyHead(nn.Module):
    """``dist_inputs`` of a ``ProductDistribution`` -> the flat float32 action row
    ``[B, D]`` of a ``Tuple`` / ``Dict`` action space: the argmax of each discrete
    leaf (as a float) and the mean of each ``Box`` leaf, clipped to that leaf's bounds
    when ``clip``, in the row layout of :class:`~flowrl.data.actions.ActionLayout`
    (``ActionLayout(space).to_env(row, clip=False)`` gives the nested action).
    """

    def __init__(self, action_space: gym.Space, clip: bool) -> None:
        super().__init__()
        dist_class, _ = get_dist_class(action_space)
        if not issubclass(dist_class, ProductDistribution):
            raise NotImplementedError(f"no product greedy export for {action_space}")
        categorical = dist_class.categorical_class
        self.num_categorical = len(dist_class.categorical_slots)
        self.num_gaussian = len(dist_class.gaussian_slots)
        self.categorical = None if categorical is None else MultiArgmaxHead(
            list(categorical.nvec), [self.num_categorical])
        self.clip = bool(clip)
        self.register_buffer("cat_inputs", torch.as_tensor(dist_class.categorical_inputs))
        self.register_buffer("mean_inputs", torch.as_tensor(dist_class.mean_inputs))
        # Column j of [argmaxes, means] goes to row slot order[j]; argsort inverts that.
        order = np.concatenate([dist_class.categorical_slots, dist_class.gaussian_slots])
        self.register_buffer("order", torch.as_tensor(np.argsort(order)))
        boxes = [leaf.space for leaf in ActionLayout(action_space).leaves
                 if isinstance(leaf.space, gym.spaces.Box)]
        low = [np.asarray(b.low, dtype=np.float64).reshape(-1) for b in boxes]
        high = [np.asarray(b.high, dtype=np.float64).reshape(-1) for b in boxes]
        self.register_buffer("low", torch.as_tensor(
            np.concatenate(low) if low else np.zeros(0), dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(
            np.concatenate(high) if high else np.zeros(0), dtype=torch.float32))

    def forward(self, dist_inputs: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        categorical = self.categorical
        if categorical is not None:
            parts.append(categorical(dist_inputs.index_select(1, self.cat_inputs))
                         .to(torch.float32))
        if self.num_gaussian > 0:
            means = dist_inputs.index_select(1, self.mean_inputs).to(torch.float32)
            if self.clip:
                means = torch.minimum(torch.maximum(means, self.low), self.high)
            parts.append(means)
        return torch.cat(parts, dim=1).index_select(1, self.order)


class _ArgmaxLogits(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.argmax(logits, dim=-1)


class _BoxMean(nn.Module):
    """The first ``size`` dist inputs (the mean, or a deterministic action) -> Box head."""

    def __init__(self, action_space: gym.spaces.Box, clip: bool) -> None:
        super().__init__()
        self.action_size = int(np.prod(action_space.shape))
        self.box = BoxActionHead(action_space, clip)

    def forward(self, dist_inputs: torch.Tensor) -> torch.Tensor:
        return self.box(dist_inputs[:, : self.action_size])


def greedy_head(action_space: gym.Space, dist_name: str, clip_actions: bool) -> nn.Module:
    """The module ``dist_inputs [B, num_outputs] -> greedy actions`` for a distribution.

    ``Categorical`` (Discrete): argmax, int64 ``[B]``. ``DiagGaussian`` /
    ``Deterministic`` (Box): the mean, :class:`BoxActionHead`, ``[B, *shape]``.
    ``MultiCategorical`` (MultiDiscrete / MultiBinary): :class:`MultiArgmaxHead`,
    int64 ``[B, *shape]``. ``ProductDistribution`` (Tuple / Dict):
    :class:`ProductGreedyHead`, float32 ``[B, D]``.
    """
    if isinstance(action_space, gym.spaces.Discrete) and dist_name == "Categorical":
        return _ArgmaxLogits()
    if isinstance(action_space, gym.spaces.Box) and dist_name in ("DiagGaussian",
                                                                   "Deterministic"):
        return _BoxMean(action_space, clip_actions)
    if isinstance(action_space, (gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)) \
            and dist_name == "MultiCategorical":
        dist_class, _ = get_dist_class(action_space)
        return MultiArgmaxHead(list(dist_class.nvec), list(action_space.shape))
    if isinstance(action_space, (gym.spaces.Tuple, gym.spaces.Dict)) \
            and dist_name == "ProductDistribution":
        return ProductGreedyHead(action_space, clip_actions)
    raise NotImplementedError(f"no greedy export for {dist_name} over {action_space}")


class DistInputsGreedy(nn.Module):
    """Catalog model ``obs -> (dist_inputs, value)`` -> the distribution's mode.

    ``Discrete``: argmax of the logits (``Categorical``), int64 ``[B]``. ``Box``: the
    mean, i.e. the first half of ``dist_inputs`` (``DiagGaussian``), or all of it for
    a ``Deterministic`` distribution, then :class:`BoxActionHead`. ``MultiDiscrete`` /
    ``MultiBinary``: the argmax per component, int64 ``[B, *shape]``. ``Tuple`` /
    ``Dict``: the flat float32 row ``[B, D]`` (see :class:`ProductGreedyHead`); the
    caller turns a row into the nested action with
    ``flowrl.data.actions.ActionLayout(space).to_env(row, clip=False)``, or by the
    ``action_row`` slots recorded in ``policy.json``.
    """

    def __init__(self, model: nn.Module, action_space: gym.Space, dist_name: str,
                 clip_actions: bool) -> None:
        super().__init__()
        self.model = model
        self.head = greedy_head(action_space, dist_name, clip_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(obs)[0])


class LeafInputs(nn.Module):
    """``module(nested obs)`` called with one tensor per observation leaf.

    TorchScript modules take tensors, not dicts, so an export for a ``Dict`` / ``Tuple``
    observation space takes its leaves positionally, in the order of
    :func:`flowrl.data.spaces.leaf_paths` (``policy.json`` lists them)::

        actions = module(obs["action_mask"], obs["observations"])
    """

    def __init__(self, module: nn.Module, observation_space: gym.Space) -> None:
        super().__init__()
        self.module = module
        self.kept_space = array_leaf_spaces(observation_space)

    def forward(self, *leaves: torch.Tensor) -> torch.Tensor:
        return self.module(_nest_leaves(self.kept_space, list(leaves)))


def _nest_leaves(space: gym.Space, leaves: list[torch.Tensor]) -> Any:
    """The nested observation of ``space`` from its leaf tensors in leaf order (consumes
    ``leaves`` from the front)."""
    if isinstance(space, gym.spaces.Dict):
        return {key: _nest_leaves(sub, leaves) for key, sub in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(_nest_leaves(sub, leaves) for sub in space.spaces)
    return leaves.pop(0)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


class RecurrentStep(nn.Module):
    """One step of a recurrent model on raw observations, for exports::

        module(*obs, *state_in[, prev_actions][, prev_rewards])
            -> (dist_inputs [B, num_outputs], values [B], *state_out)

    ``obs`` is one batch (one tensor per leaf for a ``Dict`` / ``Tuple`` space, see
    :class:`LeafInputs`), normalized by ``normalize`` when given (the observation
    filter); ``state_in`` one float32 ``[B, size]`` tensor per part of the model's
    state; ``prev_actions`` (``[B, *action_shape]``, cast to the batch's action
    dtype) and ``prev_rewards`` (``[B]``) only when ``uses_prev_actions`` /
    ``uses_prev_rewards``. The initial state is kept as buffers ``initial_state_<i>``.
    """

    def __init__(self, model: nn.Module, observation_space: gym.Space,
                 action_space: gym.Space, initial_state: list[torch.Tensor],
                 uses_prev_actions: bool, uses_prev_rewards: bool,
                 normalize: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize
        # Plain spaces: None (one obs tensor); nested: the space the leaves rebuild.
        self.kept_space = array_leaf_spaces(observation_space) \
            if is_nested(observation_space) else None
        self.num_obs_inputs = len(leaf_paths(observation_space)) \
            if self.kept_space is not None else 1
        self.num_state = len(initial_state)
        for index, part in enumerate(initial_state):
            self.register_buffer(f"initial_state_{index}",
                                 part.detach().cpu().to(torch.float32).clone())
        self.uses_prev_actions = bool(uses_prev_actions)
        self.uses_prev_rewards = bool(uses_prev_rewards)
        self.action_space = action_space
        layout = ActionLayout(action_space)
        self.action_shape = [int(d) for d in layout.shape]
        self.action_dtype = _torch_dtype(layout.dtype)

    @property
    def num_inputs(self) -> int:
        """How many tensors :meth:`forward` takes."""
        return (self.num_obs_inputs + self.num_state + int(self.uses_prev_actions)
                + int(self.uses_prev_rewards))

    def initial_state(self) -> list[torch.Tensor]:
        """The unbatched initial state, one tensor per part."""
        return [self.get_buffer(f"initial_state_{i}") for i in range(self.num_state)]

    def extra_inputs(self, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Sample ``state_in`` / ``prev_actions`` / ``prev_rewards`` for ``batch_size``
        rows (random values, to check an export against the eager module)."""
        generator = torch.Generator().manual_seed(seed)
        inputs: list[torch.Tensor] = [
            torch.randn((batch_size, *part.shape), generator=generator)
            for part in self.initial_state()]
        if self.uses_prev_actions:
            sampler = copy.deepcopy(self.action_space)
            sampler.seed(seed)
            rows = ActionLayout(self.action_space).from_env_batch(
                [sampler.sample() for _ in range(batch_size)])
            inputs.append(torch.from_numpy(np.ascontiguousarray(rows)))
        if self.uses_prev_rewards:
            inputs.append(torch.randn(batch_size, generator=generator))
        return tuple(inputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != self.num_inputs:
            raise TypeError(f"expected {self.num_inputs} tensors (obs, *state_in"
                            f"{', prev_actions' if self.uses_prev_actions else ''}"
                            f"{', prev_rewards' if self.uses_prev_rewards else ''}), "
                            f"got {len(inputs)}")
        count = self.num_obs_inputs
        if self.kept_space is None:
            obs: Any = inputs[0]
        else:
            obs = _nest_leaves(self.kept_space, list(inputs[:count]))
        if self.normalize is not None:
            obs = self.normalize(obs)
        state = list(inputs[count:count + self.num_state])
        position = count + self.num_state
        batch_size = inputs[0].shape[0]
        prev_actions = prev_rewards = None
        if self.uses_prev_actions:
            prev_actions = inputs[position].to(self.action_dtype).reshape(
                [-1, 1] + self.action_shape)
            position += 1
        if self.uses_prev_rewards:
            prev_rewards = inputs[position].to(torch.float32).reshape(-1, 1)
        # Each row is a sequence of one step: [B, 1, ...].
        dist_inputs, values, state_out = self.model(
            map_rows(lambda t: t.unsqueeze(1), obs), state,
            torch.ones(batch_size, dtype=torch.int64), prev_actions, prev_rewards)
        return (dist_inputs[:, 0], values[:, 0], *state_out)


class RecurrentGreedy(nn.Module):
    """A :class:`RecurrentStep` followed by a greedy head (:func:`greedy_head`)::

        module(*obs, *state_in[, prev_actions][, prev_rewards]) -> (actions, *state_out)
    """

    def __init__(self, step: RecurrentStep, head: nn.Module) -> None:
        super().__init__()
        self.step = step
        self.head = head
        # Top-level copies: torch.jit.load(path).initial_state_0 reads them.
        for index, part in enumerate(step.initial_state()):
            self.register_buffer(f"initial_state_{index}", part.clone())

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.step(*inputs)
        return (self.head(outputs[0]), *outputs[2:])


def example_batches(space: gym.Space) -> list[Any]:
    """Observation batches of several sizes, sampled from a private copy of ``space``
    (the env's own space and its RNG stay untouched); for a nested space each batch is
    a tuple of leaf tensors (see :class:`LeafInputs`)."""
    sampler = copy.deepcopy(space)
    sampler.seed(0)
    batches: list[Any] = []
    packer = ObservationPacker(space)
    for size in _CHECK_BATCH_SIZES:
        if packer.nested:
            leaves = [np.array(records_leaf, order="C") for records_leaf in
                      _flat_leaves(packer.unpack(packer.pack([sampler.sample()
                                                              for _ in range(size)])))]
            batches.append(tuple(torch.from_numpy(leaf) for leaf in leaves))
            continue
        arr = np.stack([np.asarray(sampler.sample()) for _ in range(size)])
        if arr.dtype == np.float64 and isinstance(space, gym.spaces.Box) \
                and np.dtype(space.dtype) != np.float64:
            arr = arr.astype(space.dtype)
        batches.append(torch.from_numpy(np.ascontiguousarray(arr)))
    return batches


def _flat_leaves(nested: Any) -> list[Any]:
    """The leaves of nested dicts / tuples in order (dicts in their key order)."""
    if isinstance(nested, dict):
        return [leaf for sub in nested.values() for leaf in _flat_leaves(sub)]
    if isinstance(nested, tuple):
        return [leaf for sub in nested for leaf in _flat_leaves(sub)]
    return [nested]


def _outputs_match(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)):  # recurrent exports: (actions, *state_out)
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(
            _outputs_match(x, y) for x, y in zip(a, b))
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
    return bool(torch.equal(a, b))


def _step_of(module: nn.Module) -> RecurrentStep | None:
    """The recurrent step inside an export module (None for a stateless one)."""
    if isinstance(module, RecurrentStep):
        return module
    if isinstance(module, RecurrentGreedy):
        return module.step
    return None


def to_torchscript(module: nn.Module, observation_space: gym.Space) -> torch.jit.ScriptModule:
    """TorchScript of an eager ``module(obs_batch) -> actions`` on the CPU.

    ``torch.jit.script`` when the module compiles (its control flow is kept);
    otherwise ``torch.jit.trace`` on a sampled observation batch. Either way the
    result is run on batches of 1, 2 and 3 observations and must give the eager
    module's outputs, so a size baked in by tracing fails here. A recurrent module
    (:class:`RecurrentStep` / :class:`RecurrentGreedy`) is traced, with sampled
    states (and previous actions / rewards) after the observations.
    """
    # Inference only: outputs then need no .detach() before .numpy().
    module = module.cpu().eval().requires_grad_(False)
    step = _step_of(module)
    examples = [batch if isinstance(batch, tuple) else (batch,)
                for batch in example_batches(observation_space)]
    if step is not None:
        examples = [(*inputs, *step.extra_inputs(inputs[0].shape[0], seed=index))
                    for index, inputs in enumerate(examples)]
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated, but it is still the format that loads
        # without Python model code (torch.jit.load, libtorch).
        warnings.simplefilter("ignore", DeprecationWarning)
        exported = None
        if step is None:
            try:
                exported = torch.jit.script(module)
            except Exception:  # noqa: BLE001  Python-only constructs: fall back to tracing
                exported = None
        if exported is None:
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with torch.no_grad():
                exported = torch.jit.trace(module, examples[-1], check_trace=False)
    with torch.no_grad():
        for inputs in examples:
            expected = module(*inputs)
            try:
                got = exported(*inputs)
            except RuntimeError as e:
                raise RuntimeError(
                    f"The TorchScript export of {type(module).__name__} fails on a batch of "
                    f"{inputs[0].shape[0]} observations; the model may not be traceable "
                    f"(a batch size turned into a Python int is baked in): "
                    f"{str(e).strip().splitlines()[-1]}") from e
            if not _outputs_match(expected, got):
                raise RuntimeError(
                    f"The TorchScript export of {type(module).__name__} differs from the "
                    f"eager module on a batch of {inputs[0].shape[0]} observations (expected "
                    f"{_shapes(expected)}, got {_shapes(got)}); the model may not be "
                    "traceable (a batch size turned into a Python int is baked in).")
    return exported


def _shapes(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    return f"{tuple(value.shape)} {value.dtype}"


def _json_number(value: float) -> float | str:
    # JSON has no infinities; "inf" / "-inf" strings keep the file standard JSON.
    if np.isposinf(value):
        return "inf"
    if np.isneginf(value):
        return "-inf"
    return value.item() if hasattr(value, "item") else value


def _bounds(values: np.ndarray) -> Any:
    flat = np.asarray(values).reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return _json_number(flat[0])  # one number for uniform bounds (Atari: 0 / 255)
    if flat.size > 1024:
        return None
    return [_json_number(v) for v in flat]


def describe_space(space: gym.Space) -> dict[str, Any]:
    """A JSON-able description of a space: type, shape, dtype and bounds / sizes.

    ``Discrete``, ``Box``, ``MultiDiscrete`` (``nvec``, ``start``), ``MultiBinary``
    (``n``) and ``Tuple`` / ``Dict`` (``spaces``, described the same way; a ``Dict``
    also lists its ``keys`` in the space's order, which sorted JSON would lose).
    Other spaces give their type and ``repr``.
    """
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start),
                "dtype": "int64"}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": [int(d) for d in space.shape],
                "dtype": np.dtype(space.dtype).name,
                "low": _bounds(space.low), "high": _bounds(space.high)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "shape": [int(d) for d in space.shape],
                "dtype": np.dtype(space.dtype).name, "nvec": space.nvec.tolist(),
                "start": space.start.tolist()}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "shape": [int(d) for d in space.shape],
                "dtype": np.dtype(space.dtype).name, "n": np.asarray(space.n).tolist()}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "Tuple", "spaces": [describe_space(sub) for sub in space.spaces]}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "keys": [str(key) for key in space.spaces],
                "spaces": {str(key): describe_space(sub) for key, sub in space.spaces.items()}}
    return {"type": type(space).__name__, "repr": repr(space)}


def describe_action_row(action_space: gym.Space) -> list[dict[str, Any]]:
    """Where each leaf of a ``Tuple`` / ``Dict`` action sits in the exported flat
    float32 row: ``path`` (keys / indexes from the root), ``slots`` ``[start, stop)``
    and the leaf's :func:`describe_space`, in row order."""
    return [{"path": [key if isinstance(key, int) else str(key) for key in leaf.path],
             "slots": [leaf.offset, leaf.offset + leaf.size],
             "space": describe_space(leaf.space)}
            for leaf in ActionLayout(action_space).leaves]


def _output_text(action_space: gym.Space, desc: dict[str, Any]) -> str:
    """What the exported module returns, for ``policy.json``."""
    if isinstance(action_space, gym.spaces.Discrete):
        return "greedy actions, int64 [B]"
    if isinstance(action_space, (gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)):
        return f"greedy actions (argmax per component), int64 {_batch_shape(desc)}"
    if isinstance(action_space, (gym.spaces.Tuple, gym.spaces.Dict)):
        size = ActionLayout(action_space).size
        return (f"greedy actions as flat rows, float32 [B, {size}]: each leaf's slots are "
                "in 'action_row' (Discrete leaves: the index as a float; Box leaves: the "
                "mean, clipped to the leaf's bounds when the agent clips actions); "
                "flowrl.data.actions.ActionLayout(space).to_env(row, clip=False) turns a "
                "row into the nested action")
    return (f"deterministic actions, shape {_batch_shape(desc)}, dtype "
            f"{desc.get('dtype')}")


def _batch_shape(desc: dict[str, Any]) -> str:
    """``[B, 84, 84, 4]`` for a space description (``[B]`` for Discrete)."""
    return "[" + ", ".join(["B", *(str(d) for d in desc.get("shape", []))]) + "]"


def _replace_atomically(path: str, write: Any) -> None:
    """``write(file)`` into a temporary sibling of ``path``, then rename it into place."""
    tmp = os.path.join(os.path.dirname(path),
                       f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _input_text(space: gym.Space, desc: dict[str, Any]) -> Any:
    """What the exported module takes: one batch, or one batch per leaf of a nested space."""
    if not is_nested(space):
        return ("a batch of raw observations as the env returns them, shape "
                f"{_batch_shape(desc)}, dtype {desc.get('dtype')}")
    kept = array_leaf_spaces(space)
    leaves = []
    for path in leaf_paths(space):
        leaf_space = kept
        for key in path:
            leaf_space = leaf_space[key]
        leaf_desc = describe_space(leaf_space)
        leaves.append({"path": list(path), "shape": _batch_shape(leaf_desc),
                       "dtype": leaf_desc.get("dtype")})
    return {"arguments": "one batch per observation leaf, in this order (leaves without "
                         "an array form, e.g. Text, are not taken)", "leaves": leaves}


def _describe_state(step: RecurrentStep) -> list[dict[str, Any]]:
    """Each state part's shape, dtype and initial value (``"zeros"`` when all zero)."""
    parts = []
    for index, part in enumerate(step.initial_state()):
        values = part.numpy()
        parts.append({"index": index, "shape": ["B", *(int(d) for d in values.shape)],
                      "dtype": "float32",
                      "initial": "zeros" if not values.any() else values.tolist()})
    return parts


def _recurrent_input_text(space: gym.Space, desc: dict[str, Any],
                          step: RecurrentStep) -> dict[str, Any]:
    """The arguments of a recurrent export, in order, for ``policy.json``."""
    names = ["obs"] if not is_nested(space) else ["*obs_leaves"]
    info: dict[str, Any] = {"obs": _input_text(space, desc)}
    for part in _describe_state(step):
        index, dims = part["index"], ", ".join(str(d) for d in part["shape"])
        names.append(f"state_in_{index}")
        info[f"state_in_{index}"] = (
            f"state part {index}, float32 [{dims}]: state_out_{index} of the previous "
            "call, or the initial state (see 'state') at an episode's first step")
    if step.uses_prev_actions:
        names.append("prev_actions")
        info["prev_actions"] = ("the previous step's actions as this module returned them, "
                                f"{_batch_shape({'shape': step.action_shape})}; zeros at an "
                                "episode's first step")
    if step.uses_prev_rewards:
        names.append("prev_rewards")
        info["prev_rewards"] = ("the previous step's rewards, float32 [B]; zeros at an "
                                "episode's first step")
    info["arguments"] = names
    return info


def _recurrent_usage(space: gym.Space, step: RecurrentStep) -> str:
    """A one-line recipe for ``policy.json``: the initial state, then the step loop."""
    obs = "*leaf_batches" if is_nested(space) else "torch.as_tensor(obs_batch)"
    parts = []
    for index, part in enumerate(step.initial_state()):
        dims = ", ".join(str(d) for d in part.shape)
        ones = ", ".join(["1"] * part.dim())
        parts.append(f"torch.zeros(B, {dims})" if not part.any() else
                     f"m.initial_state_{index}.unsqueeze(0).repeat(B, {ones})")
    extra = (", prev_actions" if step.uses_prev_actions else "") + \
        (", prev_rewards" if step.uses_prev_rewards else "")
    return (f"m = torch.jit.load('{EXPORT_FILE}'); state = [{', '.join(parts)}]; then at "
            f"each step: actions, *state = m({obs}, *state{extra}); a row whose episode "
            "ended starts again from the initial state (and zero previous action / reward)")


def describe_export(module: nn.Module, observation_space: gym.Space,
                    action_space: gym.Space,
                    metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``policy.json`` entries every export format shares: ``metadata`` (algorithm,
    env, ...), the spaces, the module's input and output in words, whether it is
    recurrent (then its ``state``), the ``action_row`` of ``Tuple`` / ``Dict`` actions,
    and the versions. The format's writer adds ``file``, ``format`` and ``usage``."""
    obs_desc = describe_space(observation_space)
    act_desc = describe_space(action_space)
    step = _step_of(module)
    info = {
        **(metadata or {}),
        "observation_space": obs_desc,
        "action_space": act_desc,
        "input": _input_text(observation_space, obs_desc),
        "output": _output_text(action_space, act_desc),
        "recurrent": step is not None,
        "flowrl_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    if step is not None:
        info["input"] = _recurrent_input_text(observation_space, obs_desc, step)
        info["output"] = {
            "returns": "a tuple (actions, *state_out)",
            "actions": info["output"],
            "state_out": "the state after this step, one float32 [B, size] tensor per "
                         "part (as state_in): pass it back in at the next step",
        }
        info["state"] = _describe_state(step)
    if isinstance(action_space, (gym.spaces.Tuple, gym.spaces.Dict)):
        info["action_row"] = describe_action_row(action_space)
    return info


def write_export(export_dir: str, module: nn.Module, observation_space: gym.Space,
                 action_space: gym.Space, metadata: dict[str, Any] | None = None) -> str:
    """Converts ``module`` with :func:`to_torchscript` and writes ``policy.pt`` and
    ``policy.json`` into ``export_dir`` (each file atomically); returns the ``.pt`` path.

    ``metadata`` entries (algorithm, env, ...) are added to ``policy.json``, which
    also describes the input and output of the module (:func:`describe_export`).
    """
    export_dir = os.path.abspath(os.path.expanduser(str(export_dir)))
    os.makedirs(export_dir, exist_ok=True)
    exported = to_torchscript(module, observation_space)
    step = _step_of(module)
    info = describe_export(module, observation_space, action_space, metadata)
    info["file"] = EXPORT_FILE
    info["format"] = "torchscript"
    info["usage"] = (f"torch.jit.load('{EXPORT_FILE}')(*leaf_batches)" if is_nested(
        observation_space) else f"torch.jit.load('{EXPORT_FILE}')(torch.as_tensor(obs_batch))")
    if step is not None:
        info["usage"] = _recurrent_usage(observation_space, step)
    path = os.path.join(export_dir, EXPORT_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see to_torchscript
        _replace_atomically(path, lambda f: torch.jit.save(exported, f))
    text = json.dumps(info, indent=2, sort_keys=True).encode()
    _replace_atomically(os.path.join(export_dir, METADATA_FILE), lambda f: f.write(text))
    return path
