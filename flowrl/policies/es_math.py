"""The pure math of evolution strategies (Salimans et al. 2017): a shared noise table,
antithetic perturbations, centered ranks, and the gradient estimate.

    noise = create_noise_table(25_000_000, seed=123)     # float32, one copy per node
    eps = noise[idx:idx + num_params]                    # a perturbation is one integer
    pos, neg = perturb(theta, eps, sigma)                # the antithetic pair
    grad = es_gradient(returns, noise, indices, num_params)   # returns [pairs, 2]

NumPy only: no policy, no env, no Ray.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RETURN_PROC_MODES", "batched_weighted_sum", "compute_centered_ranks",
           "create_noise_table", "es_gradient", "perturb", "process_returns"]

RETURN_PROC_MODES = ("centered_rank", "raw")


def compute_centered_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of all entries of ``x`` scaled to ``[-0.5, 0.5]`` (same shape, float32).

    The smallest value gets -0.5, the largest 0.5; ties are ranked in order of
    appearance (stable sort) so the result is deterministic. Rank transformation
    makes the update invariant to the scale of returns and robust to outliers.
    """
    x = np.asarray(x)
    flat = x.reshape(-1)
    if flat.size <= 1:
        return np.zeros(x.shape, dtype=np.float32)
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return (ranks / (flat.size - 1) - 0.5).reshape(x.shape).astype(np.float32)


def process_returns(returns: np.ndarray, mode: str) -> np.ndarray:
    """``returns [num_pairs, 2]`` -> fitness values per ``return_proc_mode``."""
    if mode == "centered_rank":
        return compute_centered_ranks(returns)
    if mode == "raw":
        return np.asarray(returns, dtype=np.float32)
    raise ValueError(f"return_proc_mode={mode!r}; expected one of {RETURN_PROC_MODES}")


def perturb(theta: np.ndarray, eps: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The antithetic pair ``(theta + sigma * eps, theta - sigma * eps)``."""
    delta = sigma * eps
    return theta + delta, theta - delta


def batched_weighted_sum(weights: np.ndarray, noise: np.ndarray, indices: np.ndarray,
                         num_params: int, batch_size: int = 500) -> np.ndarray:
    """``sum_i weights[i] * noise[indices[i] : indices[i] + num_params]`` (float32).

    Slices are stacked ``batch_size`` at a time into one matrix-vector product, so
    memory stays bounded for large populations.
    """
    total = np.zeros(num_params, dtype=np.float64)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        block = np.stack([noise[i:i + num_params] for i in idx])
        total += np.asarray(weights[start:start + batch_size], dtype=np.float64) @ block
    return total.astype(np.float32)


def es_gradient(returns: np.ndarray, noise: np.ndarray, indices: np.ndarray,
                num_params: int, mode: str = "centered_rank") -> np.ndarray:
    """The ascent direction from antithetic ``returns [num_pairs, 2]`` (pos, neg).

    Like the paper's code, sigma is folded into the step size and the sum is divided
    by the number of returns (2 per pair).
    """
    fitness = process_returns(returns, mode)
    grad = batched_weighted_sum(fitness[:, 0] - fitness[:, 1], noise, indices, num_params)
    return grad / max(fitness.size, 1)


def create_noise_table(size: int, seed: int) -> np.ndarray:
    """``size`` standard-normal float32 values, deterministic in ``seed``."""
    return np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
