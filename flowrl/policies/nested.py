"""Observations as torch tensors, plain or nested (``Dict`` / ``Tuple`` spaces).

A batch of nested observations arrives as a numpy record array
(:mod:`flowrl.data.spaces`); models receive it as nested ``dict`` / ``tuple`` of
tensors, one ``[B, ...]`` tensor per leaf. The helpers here treat a plain tensor and
such a structure alike, so the SGD loop and the losses shuffle, slice and concatenate
observation rows without knowing which one they hold::

    obs = records_to_tensors(batch["obs"], packer, device)   # {"image": [B, 7, 7, 3], ...}
    obs = map_rows(lambda t: t[10:20], obs)                  # rows 10..19 of every leaf
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flowrl.data.spaces import ObservationPacker

__all__ = ["Rows", "records_to_tensors", "array_to_tensor", "map_rows", "cat_rows", "num_rows"]

#: A tensor, or a nested dict / tuple of tensors with the same number of rows.
Rows = Any


def array_to_tensor(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """One numpy array as a tensor on ``device`` (float64 becomes float32; arrays read
    zero-copy from Ray's object store, which are read-only, are copied)."""
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).to(device)


def records_to_tensors(records: np.ndarray, packer: ObservationPacker,
                       device: torch.device) -> Rows:
    """A record array of ``packer``'s space as nested tensors on ``device``."""
    # Record fields are strided views; a fresh C-order copy per leaf is what torch takes
    # (numpy may call a one-row view contiguous while its strides still say otherwise).
    return map_arrays(lambda arr: array_to_tensor(np.array(arr, order="C"), device),
                      packer.unpack(records))


def map_arrays(fn: Callable[[Any], Any], value: Any) -> Any:
    """``fn`` applied to every leaf of a nested dict / tuple (or to ``value`` itself)."""
    if isinstance(value, dict):
        return {key: map_arrays(fn, sub) for key, sub in value.items()}
    if isinstance(value, tuple):
        return tuple(map_arrays(fn, sub) for sub in value)
    return fn(value)


def map_rows(fn: Callable[[torch.Tensor], torch.Tensor], rows: Rows) -> Rows:
    """``fn`` applied to each leaf tensor (a plain tensor: one call, no recursion)."""
    if isinstance(rows, torch.Tensor):
        return fn(rows)
    return map_arrays(fn, rows)


def cat_rows(first: Rows, second: Rows) -> Rows:
    """The rows of ``first`` followed by those of ``second`` (same structure, dtypes of
    ``first``)."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second.to(first.dtype)])
    if isinstance(first, dict):
        return {key: cat_rows(first[key], second[key]) for key in first}
    return tuple(cat_rows(a, b) for a, b in zip(first, second))


def num_rows(rows: Rows) -> int:
    """The number of rows (the first leaf's leading size)."""
    while not isinstance(rows, torch.Tensor):
        rows = next(iter(rows.values())) if isinstance(rows, dict) else rows[0]
    return int(rows.shape[0])
