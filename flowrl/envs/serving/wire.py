"""The policy server's wire format: JSON only, never pickle.

Arrays travel as ``{"dtype": "float32", "shape": [4], "data": ...}`` where ``data`` is
the base64 of the raw little-endian bytes (what :func:`encode_array` writes) or a
nested JSON list of numbers. Only numeric and boolean dtypes exist on the wire.
Spaces and configs are plain JSON.

Spaces: ``Box``, ``Discrete``, ``MultiDiscrete``, ``MultiBinary`` (the *leaves*), and
``Dict`` / ``Tuple`` spaces of them, nested to any depth. Values of a space:

* a leaf: an array object (a plain JSON integer is accepted for ``Discrete``);
* a ``Dict``: a JSON object with exactly the space's keys, each holding its part's
  value, e.g. ``{"pos": {"dtype": "float32", "shape": [2], "data": ...}, "mode": 2}``;
* a ``Tuple``: a JSON list with one value per part, in order.

Batched values (``log_experience``) keep that nesting and batch each leaf: a leaf is
one array with a leading row dimension, and all leaves of one value hold equally many
rows. Spaces without an array form (``Text``, ``Graph``, ``Sequence``, custom
classes), also as parts of a ``Dict`` / ``Tuple``, cannot travel: serving them is
refused with the part's path.

Every decoder checks what it reads and raises
:class:`~flowrl.envs.serving.errors.BadRequestError` with a message that names the
offending field, so the server can answer HTTP 400 instead of failing later.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from flowrl.envs.serving.errors import BadRequestError

#: dtypes accepted on the wire (no object, string or void dtypes).
WIRE_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                         "uint32", "uint64", "float16", "float32", "float64"})
MAX_NDIM = 32
#: Upper bound on elements per array; the body size limit is usually stricter.
MAX_ELEMENTS = 1 << 26

#: Spaces whose values are one array (or a Discrete integer) on the wire.
LEAF_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete,
               gym.spaces.MultiBinary)
#: Spaces whose values nest others: JSON objects (Dict) and lists (Tuple).
NESTED_SPACES = (gym.spaces.Dict, gym.spaces.Tuple)
SUPPORTED_SPACES = LEAF_SPACES + NESTED_SPACES


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def is_int(value: Any) -> bool:
    """A JSON integer (booleans are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number (booleans excluded)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


# -- arrays ------------------------------------------------------------------------------
def encode_array(value: Any) -> dict:
    """``{"dtype", "shape", "data"}`` with ``data`` the base64 of little-endian bytes."""
    arr = np.ascontiguousarray(value)
    if arr.dtype.name not in WIRE_DTYPES:
        raise TypeError(f"cannot send an array of dtype {arr.dtype} (allowed: "
                        f"{', '.join(sorted(WIRE_DTYPES))})")
    raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": arr.dtype.name, "shape": list(arr.shape),
            "data": base64.b64encode(raw).decode("ascii")}


def _decode_shape(shape: Any, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or \
            not all(is_int(n) and n >= 0 for n in shape):
        raise BadRequestError(f"{what}: 'shape' must be a list of at most {MAX_NDIM} "
                              f"non-negative integers, got {shape!r:.80}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise BadRequestError(f"{what}: shape {shape} has more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def _from_base64(data: str, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BadRequestError(f"{what}: 'data' is neither valid base64 nor a list") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise BadRequestError(f"{what}: 'data' holds {len(raw)} bytes; dtype {dtype.name} "
                              f"and shape {list(shape)} need {expected}")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def _from_list(data: Any, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise BadRequestError(f"{what}: 'data' is not a rectangular list of numbers") from None
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "b") != (dtype.kind == "b"):
        raise BadRequestError(f"{what}: 'data' must hold only "
                              f"{'booleans' if dtype.kind == 'b' else 'numbers'}")
    if arr.shape != shape:
        raise BadRequestError(f"{what}: 'data' has shape {list(arr.shape)}, 'shape' says "
                              f"{list(shape)}")
    if dtype.kind in "iu":
        if arr.dtype.kind == "f" and arr.size:
            raise BadRequestError(f"{what}: dtype {dtype.name} but 'data' holds fractions")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadRequestError(f"{what}: 'data' does not fit dtype {dtype.name}")
    return arr.astype(dtype)


def decode_array(obj: Any, what: str) -> np.ndarray:
    """The array an ``{"dtype", "shape", "data"}`` object describes (a new array).

    Raises BadRequestError for anything else: other types, missing or extra keys,
    unknown dtypes, impossible shapes, bad base64, byte counts that do not match.
    """
    if not isinstance(obj, dict):
        raise BadRequestError(f"{what}: expected an array object {{\"dtype\", \"shape\", "
                              f"\"data\"}}, got {json_type(obj)}")
    if set(obj) != {"dtype", "shape", "data"}:
        raise BadRequestError(f"{what}: an array object has exactly the keys 'dtype', "
                              f"'shape', 'data'; got {sorted(map(str, obj))!r:.120}")
    name = obj["dtype"]
    if not isinstance(name, str) or name not in WIRE_DTYPES:
        raise BadRequestError(f"{what}: dtype {name!r:.40} is not one of "
                              f"{', '.join(sorted(WIRE_DTYPES))}")
    dtype = np.dtype(name)
    shape = _decode_shape(obj["shape"], what)
    data = obj["data"]
    if isinstance(data, str):
        return _from_base64(data, dtype, shape, what)
    if isinstance(data, (list, int, float, bool)):
        return _from_list(data, dtype, shape, what)
    raise BadRequestError(f"{what}: 'data' must be a base64 string or a list, "
                          f"got {json_type(data)}")


# -- spaces: what can travel ----------------------------------------------------------------
def check_space_supported(space: gym.Space, what: str) -> None:
    """TypeError unless the wire format can carry values of ``space``.

    Every part of a ``Dict`` / ``Tuple`` is checked; the message names the first
    unsupported part by its path (``observation space['mission']``).
    """
    if isinstance(space, NESTED_SPACES):
        if not space.spaces:
            raise TypeError(f"{what}: an empty {type(space).__name__} space has no values "
                            "to serve")
        if isinstance(space, gym.spaces.Dict):
            for key in space.spaces:
                if not isinstance(key, str):
                    raise TypeError(f"{what}: Dict keys must be strings (they become JSON "
                                    f"object keys), got {key!r}")
        for _, sub, path in _children(space, what):
            check_space_supported(sub, path)
        return
    if not isinstance(space, LEAF_SPACES):
        raise TypeError(f"{what} {space} is not supported by the policy server: use Box, "
                        "Discrete, MultiDiscrete or MultiBinary, or Dict / Tuple spaces of "
                        "them (drop parts without an array form, e.g. Text, with an "
                        "observation wrapper)")


def _children(space: gym.Space, what: str) -> list[tuple[Any, gym.Space, str]]:
    """``(key, subspace, path)`` of a Dict (its key order) or a Tuple (0, 1, ...)."""
    if isinstance(space, gym.spaces.Dict):
        return [(key, sub, f"{what}[{key!r}]") for key, sub in space.spaces.items()]
    return [(index, sub, f"{what}[{index}]") for index, sub in enumerate(space.spaces)]


def _parts(space: gym.Space, value: Any, what: str,
           error: type[Exception] = BadRequestError) -> list[tuple[Any, gym.Space, Any, str]]:
    """``(key, subspace, part of value, path)`` of a Dict / Tuple ``value``.

    Raises ``error`` when ``value`` is not an object with exactly the Dict's keys, or
    not a list (or tuple) with one value per part of the Tuple.
    """
    children = _children(space, what)
    if isinstance(space, gym.spaces.Dict):
        keys = list(space.spaces)
        if not isinstance(value, Mapping):
            raise error(f"{what}: expected an object with the keys {keys} (a Dict space), "
                        f"got {json_type(value)}")
        missing = [key for key in keys if key not in value]
        if missing:
            raise error(f"{what}: missing key(s) {missing}; the Dict space has the keys {keys}")
        if len(value) != len(keys):
            extra = [key for key in value if key not in space.spaces]
            raise error(f"{what}: unknown key(s) {extra!r:.120}; the Dict space has the "
                        f"keys {keys}")
        return [(key, sub, value[key], path) for key, sub, path in children]
    if not isinstance(value, (list, tuple)):
        raise error(f"{what}: expected a list of {len(children)} values (a Tuple space), "
                    f"got {json_type(value)}")
    if len(value) != len(children):
        raise error(f"{what}: expected {len(children)} values (one per part of the Tuple "
                    f"space), got {len(value)}")
    return [(key, sub, value[key], path) for key, sub, path in children]


def _nest(space: gym.Space, parts: dict) -> Any:
    """A Dict's value is a ``dict``, a Tuple's a ``tuple`` (of ``parts`` in order)."""
    return parts if isinstance(space, gym.spaces.Dict) else tuple(parts.values())


def _leaves(space: gym.Space, value: Any, what: str) -> list[tuple[str, Any]]:
    """``(path, leaf value)`` of a value already checked against ``space``."""
    if not isinstance(space, NESTED_SPACES):
        return [(what, value)]
    return [leaf for key, sub, path in _children(space, what)
            for leaf in _leaves(sub, value[key], path)]


# -- values of a space --------------------------------------------------------------------
def _check_leaf(space: gym.Space, value: Any, what: str, strict_dtype: bool,
                batched: bool) -> Any:
    if isinstance(space, gym.spaces.Discrete):
        arr = np.asarray(value) if not isinstance(value, np.ndarray) else value
        want_shape: tuple[int, ...] = arr.shape[:1] if batched else ()
        if arr.dtype.kind not in "iu" or arr.shape != want_shape or \
                (batched and arr.ndim != 1):
            raise BadRequestError(f"{what}: expected {'integers' if batched else 'an integer'}"
                                  f" of {space}, got dtype {arr.dtype} shape {list(arr.shape)}")
        low, high = int(space.start), int(space.start) + int(space.n)
        if arr.size and (arr.min() < low or arr.max() >= high):
            raise BadRequestError(f"{what}: {arr.tolist()!r:.80} is outside {space}")
        return arr.astype(np.int64) if batched else int(arr)
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    want = space.shape if not batched else (arr.shape[:1] + tuple(space.shape))
    if arr.shape != want or (batched and arr.ndim != len(space.shape) + 1):
        batch_note = ", plus a batch dimension" if batched else ""
        raise BadRequestError(f"{what}: shape {list(arr.shape)} does not match {space} "
                              f"(shape {list(space.shape)}{batch_note})")
    dtype = np.dtype(space.dtype)
    if arr.dtype != dtype:
        if strict_dtype or not np.can_cast(arr.dtype, dtype, casting="same_kind"):
            raise BadRequestError(f"{what}: dtype {arr.dtype} does not match {space} "
                                  f"(dtype {dtype})")
        arr = arr.astype(dtype)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise BadRequestError(f"{what}: NaN or infinite values are not accepted")
    if isinstance(space, gym.spaces.MultiDiscrete):
        if np.any(arr < 0) or np.any(arr >= space.nvec):
            raise BadRequestError(f"{what}: values outside {space}")
    elif isinstance(space, gym.spaces.MultiBinary):
        if np.any((arr != 0) & (arr != 1)):
            raise BadRequestError(f"{what}: values of {space} must be 0 or 1")
    return arr


def _check(space: gym.Space, value: Any, what: str, strict_dtype: bool, batched: bool) -> Any:
    if isinstance(space, NESTED_SPACES):
        return _nest(space, {key: _check(sub, part, path, strict_dtype, batched)
                             for key, sub, part, path in _parts(space, value, what)})
    return _check_leaf(space, value, what, strict_dtype, batched)


def check_value(space: gym.Space, value: Any, what: str, strict_dtype: bool,
                batched: bool = False) -> Any:
    """``value`` checked against ``space``; returns it as the sampler stores it.

    Discrete values come back as ``int`` (``int64`` arrays when ``batched``), others as
    arrays of the space's dtype. ``strict_dtype``: the array's dtype must be the
    space's (the HTTP path); otherwise same-kind casts are applied (in-process calls
    with Python lists or float64 arrays). Float values must be finite; Discrete,
    MultiDiscrete and MultiBinary values must lie in the space. Box bounds are not
    enforced: simulators often step slightly outside the bounds they declare.
    ``batched``: ``value`` holds one row per step (a leading batch dimension).

    A Dict value is a mapping with exactly the space's keys and comes back as a
    ``dict`` in the space's key order; a Tuple value is a list or tuple with one value
    per part and comes back as a ``tuple``. Errors name the part's path
    (``observation['pos']``). Batched nested values must have equally many rows in
    every leaf.
    """
    checked = _check(space, value, what, strict_dtype, batched)
    if batched and isinstance(space, NESTED_SPACES):
        batch_size(space, checked, what)
    return checked


def batch_size(space: gym.Space, value: Any, what: str = "value") -> int:
    """The number of rows of a checked batched value (its leaves' leading size).

    Raises BadRequestError when the leaves of a nested value disagree.
    """
    leaves = _leaves(space, value, "")  # paths relative to ``what``
    first_path, first = leaves[0][0] or "the value", len(leaves[0][1])
    for path, leaf in leaves[1:]:
        if len(leaf) != first:
            raise BadRequestError(f"{what}: every part of a batched value needs the same "
                                  f"number of rows; part {first_path} has {first}, part "
                                  f"{path} has {len(leaf)}")
    return first


def unbatch_value(space: gym.Space, value: Any) -> list:
    """The rows of a checked batched value, each a value of ``space`` as
    :func:`check_value` returns it unbatched (nested values keep their nesting)."""
    if not isinstance(space, NESTED_SPACES):
        return list(value)
    return [_row(space, value, i) for i in range(batch_size(space, value))]


def _row(space: gym.Space, value: Any, index: int) -> Any:
    if isinstance(space, NESTED_SPACES):
        return _nest(space, {key: _row(sub, value[key], index)
                             for key, sub, _ in _children(space, "")})
    if isinstance(space, gym.spaces.Discrete):
        return int(value[index])
    return value[index]


def _decode(space: gym.Space, obj: Any, what: str, batched: bool) -> Any:
    if isinstance(space, NESTED_SPACES):
        return _nest(space, {key: _decode(sub, part, path, batched)
                             for key, sub, part, path in _parts(space, obj, what)})
    if isinstance(space, gym.spaces.Discrete) and not batched and is_int(obj):
        # A Python int first: JSON integers may be far beyond int64.
        if not int(space.start) <= obj < int(space.start) + int(space.n):
            raise BadRequestError(f"{what}: {obj!r:.40} is outside {space}")
        return int(obj)
    return _check_leaf(space, decode_array(obj, what), what, strict_dtype=True,
                       batched=batched)


def decode_value(space: gym.Space, obj: Any, what: str, batched: bool = False) -> Any:
    """A value of ``space`` from JSON (see the module docstring), checked as
    :func:`check_value` does with ``strict_dtype=True``."""
    value = _decode(space, obj, what, batched)
    if batched and isinstance(space, NESTED_SPACES):
        batch_size(space, value, what)
    return value


def encode_value(space: gym.Space, value: Any, what: str = "value") -> Any:
    """JSON for a value of ``space``: an ``int`` for Discrete, an array object in the
    space's dtype for the other leaves, an object (Dict) or a list (Tuple) of those.

    Raises ValueError naming (by ``what`` and its path) the part that does not fit:
    a Dict / Tuple value of the wrong structure, or a leaf that does not convert.
    """
    if isinstance(space, NESTED_SPACES):
        return _encoded_nest(space, {key: encode_value(sub, part, path) for key, sub, part, path
                                     in _parts(space, value, what, ValueError)})
    try:
        if isinstance(space, gym.spaces.Discrete):
            return int(value)
        return encode_array(np.asarray(value, dtype=space.dtype))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: cannot convert {type(value).__name__} to a value of "
                         f"{space} ({error})") from None


def _encoded_nest(space: gym.Space, parts: dict) -> Any:
    return parts if isinstance(space, gym.spaces.Dict) else list(parts.values())


def encode_batch(space: gym.Space, values: Sequence[Any], what: str = "values") -> Any:
    """JSON for ``values`` (one value of ``space`` per row) as one batched value: each
    leaf one array with a leading row dimension (``int64`` for Discrete leaves)."""
    if isinstance(space, NESTED_SPACES):
        rows = [_parts(space, v, f"{what}[row {i}]", ValueError) for i, v in enumerate(values)]
        return _encoded_nest(space, {
            key: encode_batch(sub, [parts[j][2] for parts in rows], path)
            for j, (key, sub, path) in enumerate(_children(space, what))})
    discrete = isinstance(space, gym.spaces.Discrete)
    dtype = np.dtype(np.int64) if discrete else np.dtype(space.dtype)
    shape = () if discrete else tuple(space.shape)
    try:
        arr = np.asarray(values, dtype=dtype).reshape((len(values),) + shape)
    except ValueError as error:
        raise ValueError(f"{what}: the values do not fit {space}: {error}") from None
    return encode_array(arr)


def decode_reply_value(space: gym.Space, obj: Any, what: str = "action") -> Any:
    """The client's side of :func:`encode_value` (trusts the server's shapes):
    ``int`` for Discrete, arrays for other leaves, ``dict`` / ``tuple`` for Dict / Tuple."""
    if isinstance(space, NESTED_SPACES):
        return _nest(space, {key: decode_reply_value(sub, part, path)
                             for key, sub, part, path in _parts(space, obj, what)})
    if isinstance(space, gym.spaces.Discrete):
        return int(obj)
    return decode_array(obj, what)


# -- spaces as JSON ---------------------------------------------------------------------------
def space_to_json(space: gym.Space) -> dict:
    """JSON description of a supported space (Box bounds as base64 arrays: they may be
    infinite, which JSON numbers cannot express). Dict: ``{"type": "Dict", "spaces":
    {key: space, ...}}`` in the space's key order; Tuple: ``{"type": "Tuple",
    "spaces": [space, ...]}``."""
    check_space_supported(space, "space")
    return _space_json(space)


def _space_json(space: gym.Space) -> dict:
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict",
                "spaces": {key: _space_json(sub) for key, sub in space.spaces.items()}}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "Tuple", "spaces": [_space_json(sub) for sub in space.spaces]}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "low": encode_array(space.low), "high": encode_array(space.high),
                "dtype": np.dtype(space.dtype).name}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": encode_array(space.nvec),
                "dtype": np.dtype(space.dtype).name}
    return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}


def space_from_json(obj: Any, what: str = "space") -> gym.Space:
    """The space :func:`space_to_json` described; BadRequestError if malformed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise BadRequestError(f"{what}: expected an object with a 'type', got {json_type(obj)}")
    kind = obj["type"]
    if kind in ("Dict", "Tuple"):
        parts = obj.get("spaces")
        container = dict if kind == "Dict" else list
        if set(obj) != {"type", "spaces"} or not isinstance(parts, container) or not parts:
            raise BadRequestError(f"{what}: a {kind} space is {{\"type\", \"spaces\"}} with a "
                                  f"non-empty {'object' if kind == 'Dict' else 'list'} of "
                                  "spaces")
        if kind == "Dict":  # a list of pairs keeps the sender's key order
            return gym.spaces.Dict([(key, space_from_json(sub, f"{what}[{key!r}]"))
                                    for key, sub in parts.items()])
        return gym.spaces.Tuple([space_from_json(sub, f"{what}[{i}]")
                                 for i, sub in enumerate(parts)])
    try:
        if kind == "Discrete":
            return gym.spaces.Discrete(int(obj["n"]), start=int(obj.get("start", 0)))
        if kind == "Box":
            return gym.spaces.Box(decode_array(obj["low"], f"{what}.low"),
                                  decode_array(obj["high"], f"{what}.high"),
                                  dtype=_wire_dtype(obj["dtype"]))
        if kind == "MultiDiscrete":
            return gym.spaces.MultiDiscrete(decode_array(obj["nvec"], f"{what}.nvec"),
                                            dtype=_wire_dtype(obj["dtype"]))
        if kind == "MultiBinary":
            return gym.spaces.MultiBinary(obj["n"])
    except (KeyError, TypeError, ValueError) as error:
        raise BadRequestError(f"{what}: malformed {kind} description ({error})") from None
    raise BadRequestError(f"{what}: unsupported type {kind!r:.40}")


def _wire_dtype(name: Any) -> np.dtype:
    if not isinstance(name, str) or name not in WIRE_DTYPES:
        raise ValueError(f"dtype {name!r:.40}")
    return np.dtype(name)


# -- configs ----------------------------------------------------------------------------------
_SKIP = object()


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else _SKIP
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = _json_safe(v)
            if isinstance(k, str) and v is not _SKIP:
                out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        items = [_json_safe(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    return _SKIP  # classes, callables, arrays: not part of a policy's JSON config


def config_to_json(config: dict) -> dict:
    """The JSON-representable part of a config (classes, callables and non-finite
    floats are left out: a client rebuilds its policy from the rest)."""
    out = _json_safe(config)
    return out if isinstance(out, dict) else {}
