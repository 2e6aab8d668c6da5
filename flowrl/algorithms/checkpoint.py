"""The checkpoint format: a directory written atomically.

    checkpoint_000010/
      flowrl_checkpoint.json   format version, versions, algorithm, env, iteration, counters
      params.json              the full config
      policies/<policy_id>.pt  torch state dict per policy (weights + optimizer + extras)

Policy files hold only tensors, arrays and plain containers and are read with
``torch.load(weights_only=True)``: a checkpoint never runs code when loaded.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import uuid
from typing import Any

import torch

from flowrl.version import __version__

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "flowrl_checkpoint.json"
PARAMS_FILE = "params.json"
POLICY_DIR = "policies"


def json_default(value: Any) -> Any:
    """JSON fallback for configs: classes and functions are written by name."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=json_default, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(path: str, manifest: dict, params: dict,
                     policy_states: dict[str, dict],
                     extra_states: dict[str, Any] | None = None) -> str:
    """Writes a checkpoint directory at ``path`` atomically and returns its path.

    Everything goes to a temporary sibling directory first, which is renamed into place
    only when complete: a crash mid-write never leaves a half-written checkpoint, and an
    older checkpoint at the same path is replaced only after the new one is whole.
    """
    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _recover_replaced_checkpoint(path)
    _remove_leftovers(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.join(tmp, POLICY_DIR))
    try:
        files = {}
        for pid, state in policy_states.items():
            rel = f"{POLICY_DIR}/{pid}.pt"
            with open(os.path.join(tmp, rel), "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            files[pid] = rel
        extra_files = {}
        for name, state in (extra_states or {}).items():
            rel = f"{name}.pt"
            with open(os.path.join(tmp, rel), "wb") as f:
                torch.save(to_tensors(state), f)
                f.flush()
                os.fsync(f.fileno())
            extra_files[name] = rel
        full_manifest = {
            "format_version": FORMAT_VERSION,
            "flowrl_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "policies": files,
            "extra_states": extra_files,
            **manifest,
        }
        _write_json(os.path.join(tmp, PARAMS_FILE), params)
        # The manifest goes last: its presence marks a complete checkpoint.
        _write_json(os.path.join(tmp, MANIFEST_FILE), full_manifest)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)  # Tune hands us an empty directory to fill
        if os.path.exists(path):
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def to_tensors(state: Any) -> Any:
    """numpy arrays -> torch tensors, recursively, so ``weights_only`` loading accepts them.

    Arrays of dtypes torch lacks (e.g. uint32) are stored as ``{"__ndarray__": bytes...}``
    free of pickled objects too.
    """
    import numpy as np
    if isinstance(state, dict):
        return {k: to_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_tensors(v) for v in state)
    if isinstance(state, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(state))
        except TypeError:
            return {"__ndarray__": torch.frombuffer(bytearray(state.tobytes()),
                                                    dtype=torch.uint8),
                    "dtype": _dtype_to_text(state.dtype), "shape": list(state.shape)}
    if isinstance(state, np.generic):
        return state.item()
    return state


def _dtype_to_text(dtype: Any) -> str:
    """A dtype as text: ``"<u4"``, or for a record dtype (nested observations) its
    fields as JSON, which ``dtype.str`` (``"|V16"``) would lose."""
    if dtype.names is None:
        return dtype.str
    return "record:" + json.dumps(dtype.descr)


def _dtype_from_text(text: str) -> Any:
    """Inverse of :func:`_dtype_to_text`."""
    import numpy as np
    if not text.startswith("record:"):
        return np.dtype(text)

    def fields(descr: list) -> list[tuple]:
        # JSON made the (name, type[, shape]) tuples lists; nested records are lists too.
        out = []
        for name, kind, *shape in descr:
            kind = fields(kind) if isinstance(kind, list) else kind
            out.append((name, kind, tuple(shape[0])) if shape else (name, kind))
        return out
    return np.dtype(fields(json.loads(text[len("record:"):])))


def to_numpy(state: Any) -> Any:
    """Inverse of :func:`to_tensors`."""
    import numpy as np
    if isinstance(state, dict):
        if "__ndarray__" in state:
            return np.frombuffer(state["__ndarray__"].numpy().tobytes(),
                                 dtype=_dtype_from_text(state["dtype"])
                                 ).reshape(state["shape"])
        return {k: to_numpy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_numpy(v) for v in state)
    if isinstance(state, torch.Tensor):
        return state.numpy()
    return state


def find_checkpoint_dir(path: str) -> str:
    """Accepts a checkpoint directory or its manifest file; raises a clear error if absent."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(path) and os.path.basename(path) == MANIFEST_FILE:
        path = os.path.dirname(path)
    if not os.path.exists(path):
        _recover_replaced_checkpoint(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {path!r} does not exist. Pass the "
                                "directory returned by Agent.save() (it holds "
                                f"{MANIFEST_FILE}).")
    if not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        raise FileNotFoundError(f"{path!r} is not a flowrl checkpoint: it has no "
                                f"{MANIFEST_FILE}. Pass the directory returned by "
                                "Agent.save().")
    return path


def _recover_replaced_checkpoint(path: str) -> None:
    """Puts back the old checkpoint of an overwrite that was killed between its two
    renames (old moved aside, new not yet in place), so ``path`` is never lost."""
    parent, name = os.path.split(path)
    if os.path.exists(path) or not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        old = os.path.join(parent, entry)
        if entry.startswith(f".{name}.old-") and \
                os.path.isfile(os.path.join(old, MANIFEST_FILE)):
            os.rename(old, path)
            logger.warning("Recovered checkpoint %s from an interrupted overwrite.", path)
            return


def _remove_leftovers(path: str) -> None:
    """Deletes the hidden temp/old siblings that killed writes of ``path`` left behind
    (only once ``path`` itself is a complete checkpoint)."""
    parent, name = os.path.split(path)
    if not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}.tmp-", f".{name}.old-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def read_manifest(path: str) -> dict:
    """Reads and checks the manifest of the checkpoint at ``path``."""
    path = find_checkpoint_dir(path)
    try:
        with open(os.path.join(path, MANIFEST_FILE)) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Checkpoint {path!r} is corrupt: {MANIFEST_FILE} is not valid "
                         f"JSON ({e}).") from e
    if not isinstance(manifest, dict) or "policies" not in manifest:
        raise ValueError(f"{os.path.join(path, MANIFEST_FILE)!r} is not a flowrl checkpoint "
                         "manifest (no 'policies' entry): was this directory written by "
                         "another program?")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Checkpoint {path!r} has format version {version!r} (written by flowrl "
            f"{manifest.get('flowrl_version', '?')}), but this flowrl "
            f"{__version__} reads format version {FORMAT_VERSION}.")
    return manifest


def read_params(path: str) -> dict:
    """The config stored with the checkpoint at ``path``."""
    file = os.path.join(find_checkpoint_dir(path), PARAMS_FILE)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Checkpoint {path!r}: cannot read its config {file} "
                         f"({_first_line(e)}).") from e


def read_policy_states(path: str, manifest: dict) -> dict[str, dict]:
    """Loads every policy's state dict (``weights_only=True``)."""
    path = find_checkpoint_dir(path)
    states = {}
    for pid, rel in manifest["policies"].items():
        file = os.path.join(path, rel)
        try:
            states[pid] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"Checkpoint {path!r}: cannot load policy {pid!r} from "
                             f"{file} (truncated or corrupt: {_first_line(e)}).") from e
    return states


def read_extra_state(path: str, manifest: dict, name: str) -> Any | None:
    """An optional extra state (e.g. ``replay``) saved with the checkpoint, or None."""
    rel = manifest.get("extra_states", {}).get(name)
    if rel is None:
        return None
    file = os.path.join(find_checkpoint_dir(path), rel)
    try:
        return to_numpy(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"Checkpoint {path!r}: cannot load the {name} state from "
                         f"{file} (truncated or corrupt: {_first_line(e)}).") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
