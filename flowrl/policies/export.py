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
(``clip_actions``, on by default). Each policy class builds its eager module with
``export_module()``; this file holds the shared head modules, the conversion to
TorchScript (``torch.jit.script`` where the model allows it, else ``torch.jit.trace``,
checked on several batch sizes) and the atomic writing of the two files.
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

from flowrl.version import __version__

__all__ = [
    "EXPORT_FILE", "METADATA_FILE", "ArgmaxHead", "DistInputsGreedy", "BoxActionHead",
    "describe_space", "to_torchscript", "write_export",
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


class DistInputsGreedy(nn.Module):
    """Catalog model ``obs -> (dist_inputs, value)`` -> the distribution's mode.

    ``Discrete``: argmax of the logits (``Categorical``). ``Box``: the mean, i.e. the
    first half of ``dist_inputs`` (``DiagGaussian``), or all of it for a
    ``Deterministic`` distribution, then :class:`BoxActionHead`.
    """

    def __init__(self, model: nn.Module, action_space: gym.Space, dist_name: str,
                 clip_actions: bool) -> None:
        super().__init__()
        self.model = model
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        if self.discrete:
            if dist_name != "Categorical":
                raise NotImplementedError(f"no greedy export for {dist_name} over {action_space}")
            self.action_size = 0
            self.box = None
        else:
            if dist_name not in ("DiagGaussian", "Deterministic"):
                raise NotImplementedError(f"no greedy export for {dist_name} over {action_space}")
            self.action_size = int(np.prod(action_space.shape))
            self.box = BoxActionHead(action_space, clip_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        dist_inputs = self.model(obs)[0]
        if self.box is None:
            return torch.argmax(dist_inputs, dim=-1)
        return self.box(dist_inputs[:, : self.action_size])


def _example_batches(space: gym.Space) -> list[torch.Tensor]:
    """Observation batches of several sizes, sampled from a private copy of ``space``
    (the env's own space and its RNG stay untouched)."""
    sampler = copy.deepcopy(space)
    sampler.seed(0)
    batches = []
    for size in _CHECK_BATCH_SIZES:
        arr = np.stack([np.asarray(sampler.sample()) for _ in range(size)])
        if arr.dtype == np.float64 and isinstance(space, gym.spaces.Box) \
                and np.dtype(space.dtype) != np.float64:
            arr = arr.astype(space.dtype)
        batches.append(torch.from_numpy(np.ascontiguousarray(arr)))
    return batches


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
    batches = _example_batches(observation_space)
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
            expected, got = module(batch), exported(batch)
            if not _outputs_match(expected, got):
                raise RuntimeError(
                    f"The TorchScript export of {type(module).__name__} differs from the "
                    f"eager module on a batch of {batch.shape[0]} observations (expected "
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
    """A JSON-able description of a Discrete or Box space (type, shape, dtype, bounds)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start),
                "dtype": "int64"}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": [int(d) for d in space.shape],
                "dtype": np.dtype(space.dtype).name,
                "low": _bounds(space.low), "high": _bounds(space.high)}
    return {"type": type(space).__name__, "repr": repr(space)}


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
        "input": "a batch of raw observations as the env returns them, shape "
                 f"{_batch_shape(obs_desc)}, dtype {obs_desc.get('dtype')}",
        "output": ("greedy actions, int64 [B]" if act_desc["type"] == "Discrete" else
                   f"deterministic actions, shape {_batch_shape(act_desc)}, dtype "
                   f"{act_desc.get('dtype')}"),
        "usage": f"torch.jit.load('{EXPORT_FILE}')(torch.as_tensor(obs_batch))",
        "flowrl_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    path = os.path.join(export_dir, EXPORT_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see to_torchscript
        _replace_atomically(path, lambda f: torch.jit.save(exported, f))
    text = json.dumps(info, indent=2, sort_keys=True).encode()
    _replace_atomically(os.path.join(export_dir, METADATA_FILE), lambda f: f.write(text))
    return path
