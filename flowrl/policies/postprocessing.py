"""Trajectory postprocessing: discounted sums, returns and GAE advantages.

These run on the rollout workers, once per trajectory fragment, right after
sampling (see :meth:`flowrl.policies.policy.Policy.postprocess_trajectory`).
"""

from __future__ import annotations

import math

import numpy as np

from flowrl.data.sample_batch import SampleBatch

__all__ = ["discount_cumsum", "compute_advantages"]

# Smallest power of gamma a block may reach. Keeping gamma**j above this inside a
# block means dividing by it later can neither underflow nor blow up precision.
_MIN_BLOCK_POWER = 1e-100
_MAX_BLOCK = 4096


def discount_cumsum(x: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted cumulative sum from each step to the end along axis 0.

    ``y[t] = sum_{k >= t} gamma**(k - t) * x[k]``, i.e. ``y[t] = x[t] + gamma * y[t+1]``.

    Vectorised without scipy/numba: within a block of ``m`` steps,
    ``y[j] = (sum_{k >= j} gamma**k x[k]) / gamma**j`` is one reversed cumsum;
    blocks are short enough that ``gamma**j`` never underflows, and a scalar
    carry links each block to the next. Computed in float64; the result has
    ``x``'s floating dtype (float64 for integer input).
    """
    x = np.asarray(x)
    out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    n = x.shape[0] if x.ndim else 0
    if n == 0:
        return np.zeros_like(x, dtype=out_dtype)
    xs = x.astype(np.float64, copy=False)
    if gamma == 0.0:
        return xs.astype(out_dtype, copy=True)
    if gamma == 1.0:
        return np.cumsum(xs[::-1], axis=0)[::-1].astype(out_dtype)

    block = _MAX_BLOCK
    if 0.0 < abs(gamma) < 1.0:
        block = max(1, min(_MAX_BLOCK, int(math.log(_MIN_BLOCK_POWER) / math.log(abs(gamma)))))
    elif abs(gamma) > 1.0:
        block = max(1, min(_MAX_BLOCK, int(math.log(1.0 / _MIN_BLOCK_POWER) / math.log(abs(gamma)))))

    trailing = (1,) * (xs.ndim - 1)  # broadcast powers over any extra axes
    powers_full = gamma ** np.arange(min(block, n) + 1, dtype=np.float64)
    out = np.empty_like(xs)
    carry = None  # y at the first step after the current block
    for end in range(n, 0, -block):
        start = max(0, end - block)
        m = end - start
        powers = powers_full[:m].reshape((m, *trailing))
        weighted = xs[start:end] * powers
        y = np.cumsum(weighted[::-1], axis=0)[::-1] / powers
        if carry is not None:
            # Steps after the block contribute gamma**(m - j) * y_next to step j.
            y += powers_full[m:0:-1].reshape((m, *trailing)) * carry
        out[start:end] = y
        carry = y[0]
    return out.astype(out_dtype, copy=False)


def compute_advantages(
    batch: SampleBatch,
    last_r: float,
    gamma: float = 0.9,
    lambda_: float = 1.0,
    use_gae: bool = True,
    use_critic: bool = True,
) -> SampleBatch:
    """Set ``advantages`` and ``value_targets`` (float32) on one episode fragment.

    ``batch`` must be ONE episode's contiguous piece; ``last_r`` is the value
    of the state after its last step: 0 when the episode terminated, else
    ``V(new_obs[-1])`` (see :meth:`Policy.postprocess_trajectory`).

    * GAE (``use_gae``, needs a critic): ``delta_t = r_t + gamma V_{t+1} - V_t``
      with ``V_T = last_r``; ``advantages = discount_cumsum(delta, gamma lambda)``;
      ``value_targets = advantages + vf_preds``.
    * Critic without GAE: ``returns = discount_cumsum(r + [last_r], gamma)[:-1]``;
      ``advantages = returns - vf_preds``; ``value_targets = returns``.
    * No critic (plain PG): ``advantages = value_targets = returns``.

    Returns ``batch`` itself, with the two columns set.
    """
    rewards = np.asarray(batch[SampleBatch.REWARDS], dtype=np.float64)
    if use_gae and not use_critic:
        raise ValueError("use_gae=True needs a critic (use_critic=True); set use_gae=False")
    if use_critic:
        vf_preds = np.asarray(batch[SampleBatch.VF_PREDS], dtype=np.float64)
    if rewards.shape[0] == 0:
        batch[SampleBatch.ADVANTAGES] = np.zeros(0, dtype=np.float32)
        batch[SampleBatch.VALUE_TARGETS] = np.zeros(0, dtype=np.float32)
        return batch

    if use_gae:
        next_values = np.empty_like(vf_preds)
        next_values[:-1] = vf_preds[1:]
        next_values[-1] = last_r
        deltas = rewards + gamma * next_values - vf_preds
        advantages = discount_cumsum(deltas, gamma * lambda_)
        value_targets = advantages + vf_preds
    else:
        returns = discount_cumsum(np.append(rewards, float(last_r)), gamma)[:-1]
        if use_critic:
            advantages = returns - vf_preds
        else:
            advantages = returns
        value_targets = returns

    batch[SampleBatch.ADVANTAGES] = advantages.astype(np.float32)
    batch[SampleBatch.VALUE_TARGETS] = value_targets.astype(np.float32)
    return batch
