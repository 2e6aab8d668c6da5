"""Action distributions parameterised by a model's flat output (``dist_inputs``).

Plain tensor math instead of ``torch.distributions``: no argument validation,
no broadcasting bookkeeping, and intermediate results (``log_softmax``, ``std``)
are computed once and reused across ``logp`` / ``entropy`` / ``kl`` -- this is
on the learner's hot path.

Every distribution works on a batch: ``inputs`` is ``[B, num_outputs]`` and
``logp`` / ``entropy`` / ``kl`` return ``[B]``.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch

__all__ = ["ActionDistribution", "Categorical", "DiagGaussian", "Deterministic", "get_dist_class"]

_LOG_2PI = math.log(2.0 * math.pi)


class ActionDistribution:
    """Interface of a batched action distribution built from ``dist_inputs``."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def sample(self) -> torch.Tensor:
        """A random action per row."""
        raise NotImplementedError

    def deterministic_sample(self) -> torch.Tensor:
        """The most likely action (mode) per row."""
        raise NotImplementedError

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        """Log-probability (density) of ``actions``, shape ``[B]``."""
        raise NotImplementedError

    def entropy(self) -> torch.Tensor:
        """Entropy per row, shape ``[B]``."""
        raise NotImplementedError

    def kl(self, other: ActionDistribution) -> torch.Tensor:
        """``KL(self || other)`` per row, shape ``[B]``."""
        raise NotImplementedError


class Categorical(ActionDistribution):
    """Categorical over ``num_outputs`` actions; ``inputs`` are unnormalised logits."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__(inputs)
        self._log_probs: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None

    @property
    def log_probs(self) -> torch.Tensor:
        """Normalised log-probabilities ``[B, n]`` (computed once)."""
        if self._log_probs is None:
            self._log_probs = torch.log_softmax(self.inputs, dim=-1)
        return self._log_probs

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities ``[B, n]`` (computed once; shared by entropy and kl)."""
        if self._probs is None:
            self._probs = self.log_probs.exp()
        return self._probs

    def sample(self) -> torch.Tensor:
        # Gumbel-max: one fused elementwise pass + argmax, cheaper than multinomial.
        u = torch.rand_like(self.inputs).clamp_(min=1e-20)
        return torch.argmax(self.inputs - torch.log(-torch.log(u)), dim=-1)

    def deterministic_sample(self) -> torch.Tensor:
        return torch.argmax(self.inputs, dim=-1)

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        return self.log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.probs * self.log_probs).sum(-1)

    def kl(self, other: Categorical) -> torch.Tensor:
        return (self.probs * (self.log_probs - other.log_probs)).sum(-1)


class DiagGaussian(ActionDistribution):
    """Diagonal Gaussian; ``inputs = concat([mean, log_std], -1)``, actions ``[B, k]``."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__(inputs)
        self.mean, self.log_std = torch.chunk(inputs, 2, dim=-1)
        self.std = self.log_std.exp()

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def deterministic_sample(self) -> torch.Tensor:
        return self.mean

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        actions = actions.reshape(self.mean.shape)
        z = (actions - self.mean) / self.std
        k = self.mean.shape[-1]
        return -0.5 * (z * z).sum(-1) - self.log_std.sum(-1) - 0.5 * k * _LOG_2PI

    def entropy(self) -> torch.Tensor:
        return (self.log_std + 0.5 * (_LOG_2PI + 1.0)).sum(-1)

    def kl(self, other: DiagGaussian) -> torch.Tensor:
        var_ratio_term = (self.std.pow(2) + (self.mean - other.mean).pow(2)) / (
            2.0 * other.std.pow(2)
        )
        return (other.log_std - self.log_std + var_ratio_term - 0.5).sum(-1)


class Deterministic(ActionDistribution):
    """A point mass at ``inputs`` (DDPG-style actors); ``sample()`` returns the inputs."""

    def sample(self) -> torch.Tensor:
        return self.inputs

    def deterministic_sample(self) -> torch.Tensor:
        return self.inputs

    def logp(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.inputs.shape[0], device=self.inputs.device)

    def entropy(self) -> torch.Tensor:
        return torch.zeros(self.inputs.shape[0], device=self.inputs.device)

    def kl(self, other: ActionDistribution) -> torch.Tensor:
        return torch.zeros(self.inputs.shape[0], device=self.inputs.device)


def get_dist_class(action_space: gym.Space) -> tuple[type[ActionDistribution], int]:
    """The distribution class for ``action_space`` and the model outputs it needs.

    ``Discrete(n)`` -> ``(Categorical, n)``; ``Box`` of shape ``s`` ->
    ``(DiagGaussian, 2 * prod(s))`` (mean and log-std per dimension; actions are
    unbounded samples, clipping to the bounds is the env runner's job).
    """
    if isinstance(action_space, gym.spaces.Discrete):
        if int(action_space.start) != 0:
            raise ValueError(
                f"Discrete action spaces must start at 0, got {action_space} (start={action_space.start})"
            )
        return Categorical, int(action_space.n)
    if isinstance(action_space, gym.spaces.Box):
        return DiagGaussian, 2 * int(np.prod(action_space.shape))
    raise ValueError(
        f"unsupported action space {action_space!r}: flowrl policies support Discrete and Box"
    )
