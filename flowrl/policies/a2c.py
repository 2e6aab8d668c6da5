"""Advantage actor-critic (A2C / A3C) loss and policy.

``loss = -mean(logp * A) + vf_loss_coeff * 0.5 * mean((V - targets)^2)
- entropy_coeff * mean(entropy)``, with GAE (``use_gae``, ``lambda``) or
n-step advantages from :func:`compute_advantages`, and global-norm gradient
clipping (``grad_clip``).
"""

from __future__ import annotations

from typing import Any

import torch

from flowrl.policies.policy import Policy, TensorDict
from flowrl.data.sample_batch import SampleBatch

__all__ = ["a2c_loss", "A2CTorchPolicy"]


def a2c_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor | None,
    value_targets: torch.Tensor | None,
    entropy: torch.Tensor,
    vf_loss_coeff: float,
    entropy_coeff: float,
) -> tuple[torch.Tensor, TensorDict]:
    """Total A2C loss and its (detached, unscaled) parts.

    ``values`` / ``value_targets`` may be ``None`` (no critic): the value term is 0.
    The returned ``vf_loss`` stat is ``0.5 * mean((V - targets)^2)`` before
    ``vf_loss_coeff``.
    """
    policy_loss = -(logp * advantages).mean()
    mean_entropy = entropy.mean()
    total = policy_loss - entropy_coeff * mean_entropy
    stats: TensorDict = {"policy_loss": policy_loss.detach(), "entropy": mean_entropy.detach()}
    if values is not None and value_targets is not None:
        vf_loss = 0.5 * (values - value_targets).pow(2).mean()
        total = total + vf_loss_coeff * vf_loss
        stats["vf_loss"] = vf_loss.detach()
    return total, stats


class A2CTorchPolicy(Policy):
    """A2C/A3C policy.

    Reads ``vf_loss_coeff``, ``entropy_coeff``, ``grad_clip``, ``use_gae``,
    ``lambda`` and ``use_critic`` (without a critic: no value loss, plain returns).
    """

    DEFAULT_CONFIG: dict[str, Any] = {
        **Policy.DEFAULT_CONFIG,
        "lr": 1e-4,
        "grad_clip": 40.0,
        "vf_loss_coeff": 0.5,
        "entropy_coeff": 0.01,
    }

    def __init__(self, observation_space, action_space, config: dict[str, Any]) -> None:
        super().__init__(observation_space, action_space, config)
        columns = [SampleBatch.OBS, SampleBatch.ACTIONS, SampleBatch.ADVANTAGES]
        if self.has_critic:
            columns.append(SampleBatch.VALUE_TARGETS)
        self.loss_columns = tuple(columns)

    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        dist_inputs, values = self.model_outputs(train_batch)
        dist = self.dist_class(dist_inputs)
        return a2c_loss(
            logp=dist.logp(train_batch[SampleBatch.ACTIONS]),
            advantages=train_batch[SampleBatch.ADVANTAGES],
            values=values if self.has_critic else None,
            value_targets=train_batch.get(SampleBatch.VALUE_TARGETS),
            entropy=dist.entropy(),
            vf_loss_coeff=float(self.config["vf_loss_coeff"]),
            entropy_coeff=self.entropy_coeff,
        )
