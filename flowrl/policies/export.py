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
from flowrl.version import __version__

__all__ = [
    "EXPORT_FILE", "METADATA_FILE", "ArgmaxHead", "DistInputsGreedy", "BoxActionHead",
    "MultiArgmaxHead", "ProductGreedyHead", "greedy_head", "describe_space",
    "describe_action_row", "to_torchscript", "write_export",
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

    def _nest(self, space: gym.Space, leaves: list[torch.Tensor]) -> Any:
        if isinstance(space, gym.spaces.Dict):
            return {key: self._nest(sub, leaves) for key, sub in space.spaces.items()}
        if isinstance(space, gym.spaces.Tuple):
            return tuple(self._nest(sub, leaves) for sub in space.spaces)
        return leaves.pop(0)

    def forward(self, *leaves: torch.Tensor) -> torch.Tensor:
        return self.module(self._nest(self.kept_space, list(leaves)))


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


def _outputs_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
    return bool(torch.equal(a, b))


def to_torchscript(module: nn.Module, observation_space: gym.Space) -> torch.jit.ScriptModule:
    """TorchScript of an eager ``module(obs_batch) -> actions`` on the CPU.

    ``torch.jit.script`` when the module compiles (its control flow is kept);
    otherwise ``torch.jit.trace`` on a sampled observation batch. Either way the
    result is run on batches of 1, 2 and 3 observations and must give the eager
    module's outputs, so a size baked in by tracing fails here.
    """
    # Inference only: outputs then need no .detach() before .numpy().
    module = module.cpu().eval().requires_grad_(False)
    batches = example_batches(observation_space)
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated, but it is still the format that loads
        # without Python model code (torch.jit.load, libtorch).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            exported = torch.jit.script(module)
        except Exception:  # noqa: BLE001  Python-only constructs: fall back to tracing
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with torch.no_grad():
                exported = torch.jit.trace(module, batches[-1], check_trace=False)
    with torch.no_grad():
        for batch in batches:
            inputs = batch if isinstance(batch, tuple) else (batch,)
            expected, got = module(*inputs), exported(*inputs)
            if not _outputs_match(expected, got):
                raise RuntimeError(
                    f"The TorchScript export of {type(module).__name__} differs from the "
                    f"eager module on a batch of {inputs[0].shape[0]} observations (expected "
                    f"{tuple(expected.shape)} {expected.dtype}, got {tuple(got.shape)} "
                    f"{got.dtype}); the model may not be traceable.")
    return exported


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


def write_export(export_dir: str, module: nn.Module, observation_space: gym.Space,
                 action_space: gym.Space, metadata: dict[str, Any] | None = None) -> str:
    """Converts ``module`` with :func:`to_torchscript` and writes ``policy.pt`` and
    ``policy.json`` into ``export_dir`` (each file atomically); returns the ``.pt`` path.

    ``metadata`` entries (algorithm, env, ...) are added to ``policy.json``, which
    also describes the input and output of the module.
    """
    export_dir = os.path.abspath(os.path.expanduser(str(export_dir)))
    os.makedirs(export_dir, exist_ok=True)
    exported = to_torchscript(module, observation_space)
    obs_desc = describe_space(observation_space)
    act_desc = describe_space(action_space)
    info = {
        **(metadata or {}),
        "file": EXPORT_FILE,
        "format": "torchscript",
        "observation_space": obs_desc,
        "action_space": act_desc,
        "input": _input_text(observation_space, obs_desc),
        "output": _output_text(action_space, act_desc),
        "usage": (f"torch.jit.load('{EXPORT_FILE}')(*leaf_batches)" if is_nested(
            observation_space) else f"torch.jit.load('{EXPORT_FILE}')(torch.as_tensor(obs_batch))"),
        "flowrl_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    if isinstance(action_space, (gym.spaces.Tuple, gym.spaces.Dict)):
        info["action_row"] = describe_action_row(action_space)
    path = os.path.join(export_dir, EXPORT_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see to_torchscript
        _replace_atomically(path, lambda f: torch.jit.save(exported, f))
    text = json.dumps(info, indent=2, sort_keys=True).encode()
    _replace_atomically(os.path.join(export_dir, METADATA_FILE), lambda f: f.write(text))
    return path
