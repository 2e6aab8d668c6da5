"""ONNX export of a policy's greedy actions: raw observations in, actions out.

    path = agent.export_policy("exported/", format="onnx")   # policy.onnx + policy.json

    # anywhere, with onnxruntime alone (no torch, no flowrl):
    import onnxruntime
    session = onnxruntime.InferenceSession("exported/policy.onnx")
    (actions,) = session.run(None, {"obs": obs_batch})       # numpy in, numpy out

The ONNX model is the same eager module that the TorchScript export converts
(``Policy.export_module()``, see :mod:`flowrl.policies.export`), so it computes the same
thing: observations exactly as the env returns them (the observation filter's current
normalization built in) -> the action ``compute_action(obs, explore=False)`` gives
(argmax for ``Discrete``, the argmax per component for ``MultiDiscrete`` /
``MultiBinary``, the clipped mean / deterministic action for ``Box``, one flat float32
row per observation for ``Tuple`` / ``Dict`` actions).

Inputs and outputs are named; every one has a dynamic first axis ``batch``:

- ``obs``: the observation batch, in the dtype the env gives (float32 for CartPole,
  uint8 for Atari frames, int64 for ``Discrete`` observations); onnxruntime does not
  cast, so feed that dtype (``policy.json`` lists it under ``inputs``).
- For ``Dict`` / ``Tuple`` observations one input per leaf instead, named by its path:
  ``obs.action_mask``, ``obs.observations``, ``obs.0.1``, ... (in
  :func:`flowrl.data.spaces.leaf_paths` order).
- Recurrent policies add ``state_in_0``, ``state_in_1``, ... (float32 ``[batch, size]``),
  then ``prev_actions`` / ``prev_rewards`` when the model uses them, and return
  ``state_out_0``, ... after ``actions``: feed each step's ``state_out_*`` back as the
  next step's ``state_in_*``; an episode starts from the initial state listed under
  ``state`` in ``policy.json`` (zeros for an LSTM) with zero previous action / reward.
- Output ``actions``.

Exporter: torch's TorchScript-based ONNX exporter (``torch.onnx.export(...,
dynamo=False)``). It needs nothing beyond torch, traces the same single-step path that
the TorchScript export traces, and maps ``nn.LSTM`` to ONNX's ``LSTM`` op; the
``torch.export`` based exporter would add onnxscript as a dependency and does not
handle every module here without rewrites. Opset :data:`ONNX_OPSET` (17): the newest
opset every op here needs is far older, and 17 is what onnxruntime has supported since
1.13 (2022) and what most other runtimes (TensorRT, OpenVINO, onnx.js) read, so the
file stays portable.

After writing, the model is loaded with onnxruntime and run on observation batches of
several sizes; its outputs must equal the eager module's (integers exactly, floats to a
relative 1e-4), otherwise the export fails with an error naming the difference.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl.data.spaces import is_nested, leaf_paths
from flowrl.policies.export import (
    METADATA_FILE,
    _replace_atomically,
    _step_of,
    describe_export,
    example_batches,
)

__all__ = ["ONNX_FILE", "ONNX_OPSET", "BATCH_AXIS", "require_onnx", "onnx_names",
           "to_onnx", "check_onnx", "write_onnx_export"]

ONNX_FILE = "policy.onnx"
#: The default (ai.onnx) opset of the exported graph; see the module docstring.
ONNX_OPSET = 17
#: The name of every input's and output's first (batch) axis in the graph.
BATCH_AXIS = "batch"

_INSTALL_HINT = "pip install 'flowrl[onnx]'"

# Float outputs: onnxruntime's kernels (fused GEMMs, other summation orders) round
# differently from torch's, so a few float32 ulps of slack.
_RTOL, _ATOL = 1e-4, 1e-5

# The extra batch sizes run through onnxruntime, on top of example_batches' 1, 3 and 2:
# a larger one catches a size baked in by tracing that happens to divide the others.
_EXTRA_CHECK_SIZE = 7


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """``(onnx, onnxruntime)``; an ImportError naming the ``onnx`` extra when either is
    missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            f"Exporting a policy as ONNX needs the onnx and onnxruntime packages "
            f"({e.name or 'one of them'} is missing); install flowrl's `onnx` extra: "
            f"{_INSTALL_HINT}") from e
    return onnx, onnxruntime


def onnx_names(module: nn.Module, observation_space: gym.Space) -> tuple[list[str], list[str]]:
    """The graph's input and output names for an export module, in argument order.

    ``obs`` (or ``obs.<path>`` per leaf of a nested space), then for a recurrent module
    ``state_in_<i>``, ``prev_actions``, ``prev_rewards`` as it takes them; outputs
    ``actions`` and, for a recurrent module, ``state_out_<i>``.
    """
    if is_nested(observation_space):
        inputs = [".".join(["obs", *(str(key) for key in path)])
                  for path in leaf_paths(observation_space)]
    else:
        inputs = ["obs"]
    outputs = ["actions"]
    step = _step_of(module)
    if step is not None:
        inputs += [f"state_in_{i}" for i in range(step.num_state)]
        inputs += ["prev_actions"] if step.uses_prev_actions else []
        inputs += ["prev_rewards"] if step.uses_prev_rewards else []
        outputs += [f"state_out_{i}" for i in range(step.num_state)]
    return inputs, outputs


def _examples(module: nn.Module, observation_space: gym.Space) -> list[tuple[torch.Tensor, ...]]:
    """Argument tuples of several batch sizes (observations, then any recurrent inputs);
    the first is the one to trace, the others only check."""
    examples = [batch if isinstance(batch, tuple) else (batch,)
                for batch in example_batches(observation_space)]
    # Trace on the last (2 rows, as to_torchscript): a batch of one would let the tracer
    # fold broadcasts over the batch axis.
    examples.insert(0, examples.pop())
    # One larger batch: the rows of the largest, repeated.
    largest = max(examples, key=lambda inputs: inputs[0].shape[0])
    repeat = -(-_EXTRA_CHECK_SIZE // largest[0].shape[0])
    examples.append(tuple(t.repeat(repeat, *[1] * (t.dim() - 1))[:_EXTRA_CHECK_SIZE]
                          for t in largest))
    step = _step_of(module)
    if step is not None:
        examples = [(*inputs, *step.extra_inputs(inputs[0].shape[0], seed=index))
                    for index, inputs in enumerate(examples)]
    return examples


def to_onnx(module: nn.Module, observation_space: gym.Space,
            opset_version: int = ONNX_OPSET) -> bytes:
    """The serialized ONNX model of an eager export module (see the module docstring),
    checked with :func:`check_onnx` before it is returned.

    ``module`` is what ``Policy.export_module()`` returns: ``module(obs_batch) ->
    actions`` (one tensor per leaf of a nested observation space), or for a recurrent
    policy ``module(*obs, *state_in[, prev_actions][, prev_rewards]) -> (actions,
    *state_out)``. The graph is traced on the CPU with a dynamic batch axis.
    """
    onnx, _ = require_onnx()
    module = module.cpu().eval().requires_grad_(False)
    examples = _examples(module, observation_space)
    input_names, output_names = onnx_names(module, observation_space)
    if len(input_names) != len(examples[0]):
        raise RuntimeError(f"{type(module).__name__} takes {len(examples[0])} tensors, but "
                           f"the ONNX export names {len(input_names)}: {input_names}")
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter is marked deprecated in torch 2.9+; tracing
            # warns about Python ints and the LSTM export about batch sizes other than
            # the traced one. check_onnx runs other batch sizes instead of trusting them.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                module, examples[0], buffer, dynamo=False, opset_version=opset_version,
                input_names=input_names, output_names=output_names,
                dynamic_axes={name: {0: BATCH_AXIS} for name in input_names + output_names},
                do_constant_folding=True)
    except Exception as e:  # noqa: BLE001  any exporter failure gets the same context
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise RuntimeError(
            f"The ONNX export of {type(module).__name__} (opset {opset_version}) failed: "
            f"{lines[-1]}. The TorchScript export (format='torchscript') may still work; "
            "a custom model needs ops that torch.onnx can trace.") from e
    model = onnx.load_from_string(buffer.getvalue())
    _restore_inputs(model, input_names, examples[0])
    with torch.no_grad():
        _fix_shapes(model.graph.output, _as_outputs(module(*examples[0])))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    check_onnx(data, module, examples, input_names)
    return data


def _restore_inputs(model: Any, input_names: list[str], example: tuple[torch.Tensor, ...]
                    ) -> None:
    """Gives the graph exactly ``input_names`` as inputs, in that order.

    The exporter drops inputs the graph never reads (a leaf a custom model ignores);
    they come back as unused inputs of the example's dtype, so that every export of a
    space takes the same named inputs. Shapes come from the example (:func:`_fix_shapes`).
    """
    from onnx import ValueInfoProto, helper
    kept = {value.name: value for value in model.graph.input}
    inputs = []
    for name, tensor in zip(input_names, example):
        if name in kept:
            value = ValueInfoProto()
            value.CopyFrom(kept[name])  # a copy: the originals are deleted below
        else:
            value = helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(tensor.numpy().dtype),
                list(tensor.shape))
        inputs.append(value)
    _fix_shapes(inputs, list(example))
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _fix_shapes(values: Any, tensors: list[torch.Tensor]) -> None:
    """Writes each tensor's shape into a graph input / output, the first axis named
    :data:`BATCH_AXIS`: tracing loses sizes after a reshape (``[batch, "Reshape..."]``),
    and the eager module's outputs say what they are."""
    for value, tensor in zip(values, tensors):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for index, size in enumerate(tensor.shape):
            dim = dims.add()
            if index == 0:
                dim.dim_param = BATCH_AXIS
            else:
                dim.dim_value = int(size)


def _session(model: bytes) -> Any:
    """An onnxruntime CPU session on one thread (checks are small; cores are shared)."""
    _, onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model, sess_options=options,
                                        providers=["CPUExecutionProvider"])


def _as_outputs(value: Any) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def check_onnx(model: bytes, module: nn.Module, examples: list[tuple[torch.Tensor, ...]],
               input_names: list[str]) -> None:
    """Runs the ONNX ``model`` with onnxruntime on each argument tuple of ``examples``
    and raises a RuntimeError unless every output equals the eager ``module``'s:
    same shape and dtype, integers equal, floats within a relative 1e-4."""
    session = _session(model)
    output_names = [value.name for value in session.get_outputs()]
    with torch.no_grad():
        for inputs in examples:
            batch = int(inputs[0].shape[0])
            expected = [t.numpy() for t in _as_outputs(module(*inputs))]
            feeds = {name: t.numpy() for name, t in zip(input_names, inputs)}
            try:
                got = session.run(None, feeds)
            except Exception as e:  # noqa: BLE001  onnxruntime raises its own types
                lines = str(e).strip().splitlines() or [type(e).__name__]
                raise RuntimeError(
                    f"The ONNX export of {type(module).__name__} fails in onnxruntime on "
                    f"a batch of {batch} observations (a batch size baked in by tracing?): "
                    f"{lines[-1]}") from e
            for name, want, have in zip(output_names, expected, got):
                problem = _difference(want, np.asarray(have))
                if problem:
                    raise RuntimeError(
                        f"The ONNX export of {type(module).__name__} differs from the eager "
                        f"module on a batch of {batch} observations: output '{name}' "
                        f"{problem}. The model may not be traceable (a batch size turned "
                        "into a Python int is baked in) or uses an op ONNX computes "
                        "differently.")


def _difference(expected: np.ndarray, got: np.ndarray) -> str:
    """What differs between two outputs ('' when they match)."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return (f"is {got.shape} {got.dtype}, expected {expected.shape} "
                f"{expected.dtype}")
    if np.issubdtype(expected.dtype, np.floating):
        if np.allclose(got, expected, rtol=_RTOL, atol=_ATOL, equal_nan=True):
            return ""
        worst = float(np.nanmax(np.abs(got.astype(np.float64) - expected)))
        return f"is off by up to {worst:.3g}"
    if np.array_equal(got, expected):
        return ""
    return f"has {int(np.sum(got != expected))} of {expected.size} values different"


def _describe_values(values: Any) -> list[dict[str, Any]]:
    """Name, shape (``"batch"`` for the dynamic axis) and dtype of graph inputs/outputs."""
    from onnx import helper
    described = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [dim.dim_param if dim.dim_param else int(dim.dim_value)
                 for dim in tensor.shape.dim]
        described.append({"name": value.name, "shape": shape,
                          "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(
                              tensor.elem_type)).name})
    return described


def _usage(inputs: list[dict[str, Any]], recurrent: bool) -> str:
    """A one-line recipe for ``policy.json``."""
    session = f"s = onnxruntime.InferenceSession('{ONNX_FILE}')"
    obs_names = [entry["name"] for entry in inputs if entry["name"].startswith("obs")]
    feeds = ", ".join(f"'{name}': {name.replace('.', '_')}_batch" for name in obs_names)
    if not recurrent:
        return f"{session}; (actions,) = s.run(None, {{{feeds}}})"
    state = [entry for entry in inputs if entry["name"].startswith("state_in_")]
    extra = ", ".join(f"'{entry['name']}': state[{i}]" for i, entry in enumerate(state))
    names = {entry["name"] for entry in inputs}
    if "prev_actions" in names:
        extra += ", 'prev_actions': prev_actions"
    if "prev_rewards" in names:
        extra += ", 'prev_rewards': prev_rewards"
    return (f"{session}; state = the initial state (see 'state') repeated per row; then at "
            f"each step: actions, *state = s.run(None, {{{feeds}, {extra}}}); a row whose "
            "episode ended starts again from the initial state (and zero previous action / "
            "reward)")


def write_onnx_export(export_dir: str, module: nn.Module, observation_space: gym.Space,
                      action_space: gym.Space, metadata: dict[str, Any] | None = None,
                      opset_version: int = ONNX_OPSET) -> str:
    """Converts ``module`` with :func:`to_onnx` and writes ``policy.onnx`` and
    ``policy.json`` into ``export_dir`` (each file atomically); returns the ``.onnx`` path.

    ``policy.json`` holds what the TorchScript export's does (``metadata`` entries,
    spaces, the inputs and outputs in words, the state of a recurrent policy, the action
    row layout of ``Tuple`` / ``Dict`` actions) with ``"format": "onnx"``, plus
    ``inputs`` / ``outputs``: each graph input's and output's name, shape (``"batch"``
    for the dynamic first axis) and dtype, and the opset.
    Raises ImportError (naming the ``onnx`` extra) without onnx / onnxruntime.
    """
    onnx, onnxruntime = require_onnx()
    export_dir = os.path.abspath(os.path.expanduser(str(export_dir)))
    os.makedirs(export_dir, exist_ok=True)
    data = to_onnx(module, observation_space, opset_version)
    model = onnx.load_from_string(data)
    info = describe_export(module, observation_space, action_space, metadata)
    inputs, outputs = _describe_values(model.graph.input), _describe_values(model.graph.output)
    info.update({
        "file": ONNX_FILE,
        "format": "onnx",
        "opset": opset_version,
        "batch_axis": BATCH_AXIS,
        "inputs": inputs,
        "outputs": outputs,
        "usage": _usage(inputs, info["recurrent"]),
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
    })
    # A few entries inside the file too, for tools that see only the model.
    for key in ("algorithm", "env", "policy_id", "flowrl_version"):
        if key in info:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(info[key])
    model.producer_name = "flowrl"
    path = os.path.join(export_dir, ONNX_FILE)
    serialized = model.SerializeToString()
    _replace_atomically(path, lambda f: f.write(serialized))
    text = json.dumps(info, indent=2, sort_keys=True).encode()
    _replace_atomically(os.path.join(export_dir, METADATA_FILE), lambda f: f.write(text))
    return path
