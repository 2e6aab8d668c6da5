"""Nested gymnasium spaces as plain numpy: observation records and flat action rows.

Batches, replay buffers and Ray transfers hold only numpy arrays with a fixed dtype.
A ``Dict`` or ``Tuple`` observation is therefore stored as one *record* per step: a
numpy structured array whose fields mirror the space (a ``Dict`` key or a ``Tuple``
index per field, nested spaces as nested records), each leaf keeping its own dtype
and shape (uint8 images stay uint8)::

    packer = ObservationPacker(env.observation_space)   # Dict(image=Box, direction=Discrete)
    rows = packer.pack([obs0, obs1])                     # ndarray [2], structured dtype
    rows["image"].shape                                  # (2, 7, 7, 3)
    unpack(rows, env.observation_space)                  # {"direction": [2], "image": [2, 7, 7, 3]}

Slicing, concatenation, shuffling and ``np.zeros(capacity, rows.dtype)`` all work on
records as on any array, so :class:`~flowrl.data.sample_batch.SampleBatch` and the
replay buffers need nothing special. Leaves of spaces without a fixed array form
(``Text``, MiniGrid's mission string, custom ``Space`` classes) are left out of the
record: the sampler never stores them and models never see them.

Leaf dtypes: ``Box`` keeps its dtype, ``Discrete`` is int64 (a scalar),
``MultiDiscrete`` int64 and ``MultiBinary`` int8 (their shapes).

Action masking: a ``Dict`` observation space with exactly the keys ``action_mask``
and ``observations`` (``observation`` is accepted too, as PettingZoo's classic games
name it) is a masked observation; :func:`action_mask_keys` recognises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["is_nested", "record_dtype", "ObservationPacker", "unpack", "leaf_paths",
           "action_mask_keys", "ACTION_MASK", "array_leaf_spaces"]

#: Key of the action mask in a masked observation.
ACTION_MASK = "action_mask"
_MASKED_OBS_KEYS = ("observations", "observation")

#: One path from the root of a nested space to a leaf: Dict keys and Tuple indexes.
LeafPath = tuple[Any, ...]


def is_nested(space: gym.Space) -> bool:
    """Whether ``space`` is a ``Dict`` or ``Tuple`` (stored as records)."""
    return isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple))


def _leaf_dtype(space: gym.Space) -> tuple[np.dtype, tuple[int, ...]] | None:
    """``(dtype, shape)`` of one leaf's array form; None for a leaf that has none."""
    if isinstance(space, gym.spaces.Box):
        return np.dtype(space.dtype), tuple(space.shape)
    if isinstance(space, gym.spaces.Discrete):
        return np.dtype(np.int64), ()
    if isinstance(space, gym.spaces.MultiDiscrete):
        return np.dtype(np.int64), tuple(space.shape)
    if isinstance(space, gym.spaces.MultiBinary):
        return np.dtype(np.int8), tuple(space.shape)
    return None


def _children(space: gym.Space) -> list[tuple[Any, str, gym.Space]]:
    """``(key, field name, subspace)`` of a Dict (its key order) or a Tuple (0, 1, ...)."""
    if isinstance(space, gym.spaces.Dict):
        return [(key, str(key), sub) for key, sub in space.spaces.items()]
    return [(index, str(index), sub) for index, sub in enumerate(space.spaces)]


def record_dtype(space: gym.Space) -> np.dtype:
    """The structured dtype of one record of a nested ``space`` (see the module doc).

    Raises ``ValueError`` if no leaf of ``space`` has an array form.
    """
    fields = []
    for _, name, sub in _children(space):
        if is_nested(sub):
            try:
                fields.append((name, record_dtype(sub)))
            except ValueError:
                continue  # a branch without array leaves is left out like such a leaf
            continue
        leaf = _leaf_dtype(sub)
        if leaf is not None:
            fields.append((name, leaf[0], leaf[1]))
    if not fields:
        raise ValueError(f"observation space {space} has no Box, Discrete, MultiDiscrete or "
                         "MultiBinary leaf that could be stored")
    return np.dtype(fields)


def array_leaf_spaces(space: gym.Space) -> gym.Space:
    """``space`` without the leaves that have no array form (what records hold and
    models receive); non-nested spaces are returned as they are."""
    if not is_nested(space):
        return space
    names = set(record_dtype(space).names)
    if isinstance(space, gym.spaces.Dict):
        return gym.spaces.Dict({key: array_leaf_spaces(sub)
                                for key, name, sub in _children(space) if name in names})
    return gym.spaces.Tuple([array_leaf_spaces(sub) for _, name, sub in _children(space)
                             if name in names])


def leaf_paths(space: gym.Space) -> list[LeafPath]:
    """Paths of the stored leaves of a nested space, in record field order."""
    paths: list[LeafPath] = []
    kept = array_leaf_spaces(space)
    for key, _, sub in _children(kept):
        if is_nested(sub):
            paths.extend((key, *rest) for rest in leaf_paths(sub))
        else:
            paths.append((key,))
    return paths


def _get(value: Any, path: LeafPath) -> Any:
    for key in path:
        value = value[key]
    return value


class ObservationPacker:
    """Stacks per-env observations of ``space`` into one batch array.

    Nested spaces give a record array (one structured row per observation); any other
    space gives ``np.stack`` of the observations, as before records existed.
    """

    def __init__(self, space: gym.Space) -> None:
        self.space = space
        self.nested = is_nested(space)
        self.dtype: np.dtype | None = record_dtype(space) if self.nested else None
        self._paths = leaf_paths(space) if self.nested else []
        self._names = [tuple(str(k) for k in path) for path in self._paths]
        #: The space without the leaves records leave out (what models are built for).
        self.kept_space = array_leaf_spaces(space)

    def pack(self, observations: Sequence[Any]) -> np.ndarray:
        """``[N, ...]`` array of ``observations`` (records for a nested space).

        A leaf whose value does not fit its place in the record raises ``ValueError``
        naming the leaf, its expected shape and the value's shape.
        """
        if not self.nested:
            return np.stack([np.asarray(o) for o in observations])
        out = np.empty(len(observations), dtype=self.dtype)
        for path, names in zip(self._paths, self._names):
            column = out
            for name in names:
                column = column[name]
            try:
                column[...] = np.stack([np.asarray(_get(o, path)) for o in observations])
            except (KeyError, IndexError, TypeError) as err:
                raise ValueError(f"observation has no leaf {'/'.join(names)} of space "
                                 f"{self.space}: {err!r}") from err
            except ValueError as err:
                raise ValueError(
                    f"observation leaf {'/'.join(names)} does not fit the space: expected "
                    f"shape {column.shape[1:]}, got {np.shape(_get(observations[0], path))} "
                    f"({err})") from err
        return out

    def pack_one(self, observation: Any) -> np.ndarray:
        """One observation as a batch of one (``[1, ...]``)."""
        return self.pack([observation])

    def as_batch(self, observations: Any) -> np.ndarray:
        """``observations`` as this space's batch array: a record array or any array is
        used as it is; a list of per-step observations is packed."""
        if isinstance(observations, np.ndarray) and (
                not self.nested or observations.dtype.names is not None):
            return observations
        if not self.nested:
            return np.asarray(observations)
        return self.pack(list(observations))

    def unpack(self, records: np.ndarray) -> Any:
        """:func:`unpack` of this space's records."""
        return _unpack_kept(records, self.kept_space)


def unpack(records: np.ndarray, space: gym.Space) -> Any:
    """A record array as nested ``dict`` / ``tuple`` of leaf arrays (views, ``[N, ...]``).

    ``space`` decides between dicts and tuples; non-record arrays are returned as they are.
    """
    if records.dtype.names is None:
        return records
    return _unpack_kept(records, array_leaf_spaces(space))


def _unpack_kept(records: np.ndarray, kept: gym.Space) -> Any:
    if records.dtype.names is None:
        return records
    parts = {key: _unpack_kept(records[name], sub) for key, name, sub in _children(kept)}
    if isinstance(kept, gym.spaces.Tuple):
        return tuple(parts.values())
    return parts


def action_mask_keys(space: gym.Space) -> tuple[str, str] | None:
    """``("action_mask", observations key)`` if ``space`` is a masked observation
    (a Dict with exactly an ``action_mask`` and an ``observations`` or ``observation``
    key), else None."""
    if not isinstance(space, gym.spaces.Dict) or len(space.spaces) != 2 or \
            ACTION_MASK not in space.spaces:
        return None
    for key in _MASKED_OBS_KEYS:
        if key in space.spaces:
            return ACTION_MASK, key
    return None
