"""How actions of a gymnasium space sit in a batch, and how they go back to the env.

A batch's ``actions`` column is one numpy array with a fixed dtype and row shape:

==========================  ==========  ==================  =============================
action space                dtype       row shape           env action (``to_env``)
==========================  ==========  ==================  =============================
``Discrete(n)``             int64       ``()``              python ``int``
``Box``                     space dtype ``space.shape``     the array (clipped if asked)
``MultiDiscrete(nvec)``     int64       ``space.shape``     array of the space dtype
``MultiBinary(n)``          int8        ``space.shape``     array of the space dtype (int8)
``Tuple`` / ``Dict``        float32     ``(D,)``            nested tuple / dict of leaves
==========================  ==========  ==================  =============================

A ``Tuple`` or ``Dict`` action (nested ones too) is flattened into one float32 row,
its leaves one after the other (``Dict`` in the space's key order, ``Tuple`` in index
order): a ``Discrete`` leaf takes one slot (its value as a float), a
``MultiDiscrete`` / ``MultiBinary`` leaf one slot per component, a ``Box`` leaf
``prod(shape)`` slots (C order). Leaves of a nested space must be ``Discrete``,
``Box``, ``MultiDiscrete`` or ``MultiBinary``::

    layout = ActionLayout(Tuple((Discrete(3), Box(-1, 1, (2,)))))
    layout.dtype, layout.shape              # float32, (3,)
    layout.to_env(np.array([2., .5, 1.7], np.float32), clip=True)   # (2, array([0.5, 1.]))
    layout.from_env((2, np.array([.5, 1.])))                        # array([2., .5, 1.])

The batch holds the env's own values (no offset is taken off ``start``), so
``to_env`` and ``from_env`` are inverses on every action that fits the space. Box
values outside the bounds fit (samples are stored unclipped; the env gets them
clipped with ``clip=True``); a wrong shape, a non-integer or out-of-range discrete
value, or a missing ``Dict`` key does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["ActionLayout", "ActionLeaf", "SUPPORTED_ACTION_SPACES"]

#: What the error for an unsupported action space lists.
SUPPORTED_ACTION_SPACES = ("Discrete, Box, MultiDiscrete, MultiBinary, and Tuple / Dict "
                           "(nested too) whose leaves are among these")

_LEAF_TYPES = (gym.spaces.Discrete, gym.spaces.Box, gym.spaces.MultiDiscrete,
               gym.spaces.MultiBinary)


class _Mismatch(ValueError):
    """A leaf value that does not fit its space (re-raised naming the whole space)."""


def _numeric(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise _Mismatch(f"expected numbers, got dtype {arr.dtype}")
    return arr


def _integral(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as int64 of ``shape``; integral floats (e.g. from JSON) are accepted."""
    arr = _numeric(value)
    if arr.shape != shape:
        raise _Mismatch(f"expected shape {shape}, got {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr)):
            raise _Mismatch("expected integers")
    return arr.astype(np.int64)


@dataclass(frozen=True)
class ActionLeaf:
    """One leaf of an action space and where it sits in a flat row.

    ``path`` is the ``Dict`` keys / ``Tuple`` indexes from the root (``()`` for a
    space that is not nested); ``offset`` and ``size`` are its slots in the float32
    row of a nested space (``size`` is also its number of components when flat).
    """

    path: tuple[Any, ...]
    space: gym.Space
    offset: int
    size: int

    def to_env(self, values: np.ndarray, clip: bool) -> Any:
        """The env's action for this leaf from its ``size`` values (any numeric dtype)."""
        space = self.space
        if isinstance(space, gym.spaces.Discrete):
            return int(np.rint(values[0])) if values.dtype.kind == "f" else int(values[0])
        if isinstance(space, gym.spaces.Box):
            values = values.reshape(space.shape)
            if clip:
                values = np.clip(values, space.low, space.high)
            if np.dtype(space.dtype).kind != "f" and values.dtype.kind == "f":
                values = np.rint(values)
            # np.asarray: clipping a 0-d array gives a numpy scalar, not an array.
            return np.asarray(values, dtype=space.dtype)
        # MultiDiscrete / MultiBinary
        if values.dtype.kind == "f":
            values = np.rint(values)
        return values.astype(space.dtype, copy=False).reshape(space.shape)

    def from_env(self, value: Any) -> np.ndarray:
        """This leaf's ``size`` values (flat) from an env action; raises ``_Mismatch``."""
        space = self.space
        if isinstance(space, gym.spaces.Discrete):
            arr = _integral(value, ())
            if not int(space.start) <= int(arr) < int(space.start) + int(space.n):
                raise _Mismatch(f"expected an integer in [{int(space.start)}, "
                                f"{int(space.start) + int(space.n)})")
            return arr.reshape(1)
        if isinstance(space, gym.spaces.Box):
            arr = _numeric(value)
            if arr.shape != space.shape:
                raise _Mismatch(f"expected shape {space.shape}, got {arr.shape}")
            return arr.astype(space.dtype, copy=False).reshape(-1)
        arr = _integral(value, tuple(space.shape))
        if isinstance(space, gym.spaces.MultiBinary):
            if np.any((arr != 0) & (arr != 1)):
                raise _Mismatch("expected only 0s and 1s")
        elif np.any(arr < space.start) or np.any(arr >= space.start + space.nvec):
            raise _Mismatch(f"expected each component in [start, start + nvec) with "
                            f"nvec {space.nvec.tolist()}")
        return arr.reshape(-1)


def _leaf_size(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Discrete):
        return 1
    return int(np.prod(space.shape, dtype=np.int64))


def _unsupported(space: gym.Space, root: gym.Space) -> ValueError:
    where = "" if space is root else f" (inside {root})"
    return ValueError(f"unsupported action space {space}{where}: flowrl supports "
                      f"{SUPPORTED_ACTION_SPACES}")


def _collect_leaves(space: gym.Space, root: gym.Space, path: tuple[Any, ...],
                    leaves: list[ActionLeaf], offset: int) -> int:
    """Appends the leaves of ``space`` (depth first) and returns the next free slot."""
    if isinstance(space, (gym.spaces.Tuple, gym.spaces.Dict)):
        children = (space.spaces.items() if isinstance(space, gym.spaces.Dict)
                    else enumerate(space.spaces))
        for key, sub in children:
            offset = _collect_leaves(sub, root, (*path, key), leaves, offset)
        return offset
    if not isinstance(space, _LEAF_TYPES):
        raise _unsupported(space, root)
    size = _leaf_size(space)
    leaves.append(ActionLeaf(path, space, offset, size))
    return offset + size


class ActionLayout:
    """The batch encoding of the actions of ``space`` (see the module doc).

    Attributes: ``space``; ``nested`` (a ``Tuple`` / ``Dict``); ``dtype`` and
    ``shape``, the dtype and row shape of the ``actions`` column; ``leaves``, the
    :class:`ActionLeaf` s in row order (one, with path ``()``, when not nested);
    ``size``, the number of values per row.

    Raises ``ValueError`` naming the space for spaces other than the supported ones
    (``Text``, ``Graph``, ``Sequence``, ``OneOf``, or a nested space holding one, or
    an empty ``Tuple`` / ``Dict``).
    """

    def __init__(self, space: gym.Space) -> None:
        self.space = space
        self.nested = isinstance(space, (gym.spaces.Tuple, gym.spaces.Dict))
        leaves: list[ActionLeaf] = []
        self.size: int = _collect_leaves(space, space, (), leaves, 0)
        if not leaves:
            raise ValueError(f"unsupported action space {space}: it has no leaves; flowrl "
                             f"supports {SUPPORTED_ACTION_SPACES}")
        self.leaves: tuple[ActionLeaf, ...] = tuple(leaves)
        self.shape: tuple[int, ...]
        if self.nested:
            self.dtype = np.dtype(np.float32)
            self.shape = (self.size,)
        elif isinstance(space, gym.spaces.Discrete):
            self.dtype, self.shape = np.dtype(np.int64), ()
        elif isinstance(space, gym.spaces.Box):
            self.dtype, self.shape = np.dtype(space.dtype), tuple(space.shape)
        elif isinstance(space, gym.spaces.MultiDiscrete):
            self.dtype, self.shape = np.dtype(np.int64), tuple(space.shape)
        else:  # MultiBinary
            self.dtype, self.shape = np.dtype(np.int8), tuple(space.shape)
        self._discrete = isinstance(space, gym.spaces.Discrete)
        self._box = isinstance(space, gym.spaces.Box)

    def __repr__(self) -> str:
        return f"ActionLayout({self.space}, dtype={self.dtype}, shape={self.shape})"

    # ------------------------------------------------------------ batch -> env
    def to_env(self, row: Any, clip: bool) -> Any:
        """The env action for one batch ``row`` (see the module doc).

        ``clip`` clips ``Box`` values (the whole space or ``Box`` leaves) to their
        bounds. The result may be a view of ``row`` when nothing needs converting.
        """
        if self._discrete:
            return int(row)
        row = np.asarray(row)
        if not self.nested:
            return self.leaves[0].to_env(row.reshape(-1), clip).reshape(self.shape)
        parts = [leaf.to_env(row[leaf.offset:leaf.offset + leaf.size], clip)
                 for leaf in self.leaves]
        return self._assemble(self.space, iter(parts))

    def to_env_batch(self, rows: np.ndarray, clip: bool) -> list[Any]:
        """``[to_env(row, clip) for row in rows]``, vectorised for Discrete and Box."""
        if self._discrete:
            return np.asarray(rows).tolist()
        if self._box:
            rows = np.asarray(rows, dtype=self.dtype)
            if clip:
                rows = np.clip(rows, self.space.low, self.space.high)
            return list(rows)
        if not self.nested:  # MultiDiscrete / MultiBinary
            return list(np.asarray(rows).astype(self.space.dtype, copy=False))
        return [self.to_env(row, clip) for row in np.asarray(rows)]

    def _assemble(self, space: gym.Space, parts: Any) -> Any:
        """The nested action of ``space`` from its leaf actions in row order."""
        if isinstance(space, gym.spaces.Dict):
            return {key: self._assemble(sub, parts) for key, sub in space.spaces.items()}
        if isinstance(space, gym.spaces.Tuple):
            return tuple(self._assemble(sub, parts) for sub in space.spaces)
        return next(parts)

    # ------------------------------------------------------------ env -> batch
    def from_env(self, action: Any) -> np.ndarray:
        """The batch row of an env ``action`` (the inverse of :meth:`to_env`).

        Raises ``ValueError`` naming the space and the value when ``action`` does not
        fit the space.
        """
        try:
            if not self.nested:
                flat = self.leaves[0].from_env(action)
                return flat.reshape(self.shape).astype(self.dtype, copy=False)
            row = np.empty(self.size, dtype=np.float32)
            for leaf in self.leaves:
                row[leaf.offset:leaf.offset + leaf.size] = leaf.from_env(
                    self._leaf_value(action, leaf.path))
            return row
        except _Mismatch as err:
            raise ValueError(f"action {action!r} does not fit the action space "
                             f"{self.space}: {err}") from None

    def from_env_batch(self, actions: list[Any]) -> np.ndarray:
        """``[N, *shape]`` batch column of env ``actions`` (see :meth:`from_env`)."""
        out = np.empty((len(actions), *self.shape), dtype=self.dtype)
        for i, action in enumerate(actions):
            out[i] = self.from_env(action)
        return out

    def _leaf_value(self, action: Any, path: tuple[Any, ...]) -> Any:
        value = action
        for depth, key in enumerate(path):
            where = "/".join(str(k) for k in path[:depth + 1])
            if isinstance(key, int) and not isinstance(value, Mapping):
                if not isinstance(value, (tuple, list)) or key >= len(value):
                    raise _Mismatch(f"no Tuple element {where}")
            elif not isinstance(value, Mapping) or key not in value:
                raise _Mismatch(f"no Dict key {where}")
            value = value[key]
        return value
