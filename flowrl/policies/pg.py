"""Vanilla policy gradient (REINFORCE): ``loss = -mean(logp(a) * return)``.

No critic: advantages are the discounted returns of each fragment, bootstrapped
with 0 at its end (on termination that is exact; on truncation it is a
biased but simple choice, since there is no value function to bootstrap from).
"""

from __future__ import annotations

from typing import Any

import torch

from flowrl.policies.policy import Policy, TensorDict
from flowrl.data.sample_batch import SampleBatch

__all__ = ["pg_loss", "PGTorchPolicy"]


def pg_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``-mean(logp * advantages)`` over the batch."""
    return -(logp * advantages).mean()


class PGTorchPolicy(Policy):
    """Policy gradient without a critic (``vf_preds`` are not produced)."""

    DEFAULT_CONFIG: dict[str, Any] = {
        **Policy.DEFAULT_CONFIG,
        "lr": 4e-4,
        "use_critic": False,
        "use_gae": False,
    }
    loss_columns = (SampleBatch.OBS, SampleBatch.ACTIONS, SampleBatch.ADVANTAGES)

    def __init__(self, observation_space, action_space, config: dict[str, Any]) -> None:
        super().__init__(observation_space, action_space, config)
        self.has_critic = False  # PG never uses a value function, whatever the config says

    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        dist_inputs, _ = self.model_outputs(train_batch)
        logp = self.dist_class(dist_inputs).logp(train_batch[SampleBatch.ACTIONS])
        policy_loss = pg_loss(logp, train_batch[SampleBatch.ADVANTAGES])
        return policy_loss, {"policy_loss": policy_loss.detach()}
