"""Reward normalization for the on-policy algorithms (``normalize_rewards: True``).

    scaler = ReturnScaler(num_envs=8, gamma=0.99)
    sampler = VectorSampler(envs, policy, 200, reward_scaler=scaler)
    # every fragment's "rewards" column is divided by the running std of the
    # discounted return; episode metrics still report the env's own rewards

Why the return and not the reward: advantages and value targets are sums of
discounted rewards, so dividing by the spread of that sum brings them to about unit
scale whatever the env's reward units are (a task paying thousands per episode
trains with the same learning rate and entropy bonus as one paying +-1). The mean is
not subtracted, so the sign of every reward, and with it what the policy prefers,
is unchanged.

The statistics are per sampling worker and are not merged: each worker's scale
converges to the same value once it has seen a few episodes.
"""

from __future__ import annotations


import numpy as np

from flowrl.policies.filters import RunningStat

__all__ = ["ReturnScaler"]


class ReturnScaler:
    """Divides rewards by the running std of each env's discounted return.

    For each step ``t`` of env ``i``: ``G_i = gamma * G_i + r_t`` (``G_i`` restarts at 0
    after the episode ends), the running variance takes ``G_i``, and the scaled
    reward is ``clip(r_t / sqrt(var + epsilon), -clip, clip)``. Before any data the
    scale is 1. The clip bounds what a near-zero spread can do early in a run (two
    envs whose first returns are equal have a variance of 0).
    """

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8,
                 clip: float = 10.0):
        self.gamma = float(gamma)
        self.epsilon = float(epsilon)
        self.clip = float(clip)
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.stats = RunningStat(())  # of every per-env return seen so far

    @property
    def std(self) -> float:
        """The current scale (1.0 before two returns were seen)."""
        if self.stats.count < 2:
            return 1.0
        return float(np.sqrt(self.stats.var + self.epsilon))

    def scale(self, rewards: np.ndarray, ended: np.ndarray) -> np.ndarray:
        """Scaled copy of ``rewards [T, num_envs]``; ``ended [T, num_envs]`` marks the last
        step of an episode (terminated or truncated), after which the return restarts.

        Each row updates the statistics before it is scaled, so the first rewards of
        a run are scaled by what has been seen so far, like every later one.
        """
        out = np.empty(rewards.shape, dtype=np.float32)
        for t in range(rewards.shape[0]):
            self.returns = self.returns * self.gamma + rewards[t]
            self.stats.push(self.returns)
            out[t] = np.clip(rewards[t] / self.std, -self.clip, self.clip)
            self.returns[ended[t]] = 0.0
        return out
