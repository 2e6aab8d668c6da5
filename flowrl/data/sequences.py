"""Cutting a batch's rows into sequences for recurrent policies.

A recurrent policy's batch keeps one row per step, like any other, plus the state the
policy started that step with (``state_in_0``, ``state_in_1``, ...). For learning, the
rows are cut into sequences: a new sequence starts wherever the rows stop being
consecutive steps of one agent's episode (``eps_id``, ``agent_index`` or ``t`` says
so) and after every ``max_seq_len`` rows. A sequence's first row carries the state to
start it from, so sequences can be cut anywhere and minibatches can take whole
sequences in any order::

    lens = sequence_lengths(batch, max_seq_len=20)    # e.g. [20, 20, 7, 20, 3]
    index, mask = padded_layout(lens)                 # [5, 20] row numbers, valid steps

Rows of one sequence are contiguous and in order, so the valid entries of ``index``
in row-major order are ``0, 1, ..., count - 1``: outputs computed on the padded
``[S, L]`` layout return to row order as ``outputs[mask]``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["STATE_IN", "STATE_OUT", "PREV_ACTIONS", "PREV_REWARDS", "state_in_key",
           "state_out_key", "sequence_lengths", "padded_layout"]

STATE_IN = "state_in_"
STATE_OUT = "state_out_"
PREV_ACTIONS = "prev_actions"
PREV_REWARDS = "prev_rewards"


def state_in_key(index: int) -> str:
    """Column of the ``index``-th state tensor each row started its step with."""
    return f"{STATE_IN}{index}"


def state_out_key(index: int) -> str:
    """Column of the ``index``-th state tensor after each row's step."""
    return f"{STATE_OUT}{index}"


def sequence_lengths(batch: Mapping[str, np.ndarray], max_seq_len: int) -> np.ndarray:
    """Lengths (int64, summing to the row count) of the batch's sequences, in row order.

    A sequence ends where the next row belongs to another episode (``eps_id``) or agent
    (``agent_index``), where ``t`` does not go up by one, and after ``max_seq_len`` rows.
    Columns that are absent are not used for cutting.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    first_column = next(iter(batch.values()), None)
    count = 0 if first_column is None else len(first_column)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.zeros(count, dtype=bool)  # breaks[i]: row i starts a new piece
    breaks[0] = True
    for key in ("eps_id", "agent_index"):
        if key in batch:
            column = np.asarray(batch[key])
            breaks[1:] |= column[1:] != column[:-1]
    if "t" in batch:
        t = np.asarray(batch["t"])
        breaks[1:] |= t[1:] != t[:-1] + 1
    piece_starts = np.flatnonzero(breaks)
    piece_lens = np.diff(np.append(piece_starts, count))
    # Each piece as full sequences of max_seq_len plus its remainder.
    full, rest = np.divmod(piece_lens, max_seq_len)
    per_piece = full + (rest > 0)
    lens = np.full(int(per_piece.sum()), max_seq_len, dtype=np.int64)
    last_of_piece = np.cumsum(per_piece) - 1
    has_rest = rest > 0
    lens[last_of_piece[has_rest]] = rest[has_rest]
    return lens


def padded_layout(seq_lens: np.ndarray, max_len: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(index [S, L], mask [S, L])`` for contiguous sequences of ``seq_lens``.

    ``index[s, j]`` is the row of step ``j`` of sequence ``s`` (0 where padded) and
    ``mask[s, j]`` whether that step exists; ``L`` is ``max_len`` or the longest
    sequence.
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    width = int(seq_lens.max()) if max_len is None else int(max_len)
    starts = np.cumsum(seq_lens) - seq_lens
    steps = np.arange(width)
    mask = steps[None, :] < seq_lens[:, None]
    index = np.where(mask, starts[:, None] + steps[None, :], 0)
    return index, mask
