"""Proximal Policy Optimization (Schulman et al. 2017): losses and policy.

Per minibatch::

    ratio        = exp(logp - old_logp)
    policy_loss  = -mean(min(A * ratio, A * clip(ratio, 1 - clip_param, 1 + clip_param)))
    kl           = mean(KL(old || new))                 # from action_dist_inputs
    vf_loss      = mean(max((V - T)^2, (V_old + clip(V - V_old, -vf_clip, vf_clip) - T)^2))
    total        = policy_loss + kl_coeff * kl + vf_loss_coeff * vf_loss
                   - entropy_coeff * mean(entropy)

``kl_coeff`` adapts toward ``kl_target`` after each train batch
(:meth:`PPOTorchPolicy.update_kl`). Advantages are standardized per train batch
by a separate operator before ``learn_on_batch``.
"""

from __future__ import annotations

from typing import Any

import torch

from flowrl.policies.policy import Policy, TensorDict
from flowrl.data.sample_batch import SampleBatch

__all__ = ["ppo_surrogate_loss", "ppo_value_loss", "ppo_total_loss", "PPOTorchPolicy"]


def ppo_surrogate_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_param: float
) -> torch.Tensor:
    """Negated clipped surrogate objective, averaged over the batch."""
    ratio = torch.exp(logp - old_logp)
    unclipped = advantages * ratio
    clipped = advantages * torch.clamp(ratio, 1.0 - clip_param, 1.0 + clip_param)
    return -torch.minimum(unclipped, clipped).mean()


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    value_targets: torch.Tensor,
    vf_clip_param: float | None,
) -> torch.Tensor:
    """Clipped value loss: mean of the larger of the plain and clipped squared errors.

    ``vf_clip_param=None`` turns clipping off (plain mean squared error).
    """
    plain = (values - value_targets).pow(2)
    if vf_clip_param is None:
        return plain.mean()
    clipped_values = old_values + torch.clamp(values - old_values, -vf_clip_param, vf_clip_param)
    clipped = (clipped_values - value_targets).pow(2)
    return torch.maximum(plain, clipped).mean()


def ppo_total_loss(
    policy_loss: torch.Tensor,
    vf_loss: torch.Tensor | None,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    kl_coeff: float,
    vf_loss_coeff: float,
    entropy_coeff: float,
) -> torch.Tensor:
    """``policy_loss + kl_coeff kl + vf_loss_coeff vf_loss - entropy_coeff entropy``.

    ``kl`` and ``entropy`` are batch means; ``vf_loss=None`` means no critic.
    """
    total = policy_loss - entropy_coeff * entropy
    if kl_coeff:
        total = total + kl_coeff * kl
    if vf_loss is not None:
        total = total + vf_loss_coeff * vf_loss
    return total


class PPOTorchPolicy(Policy):
    """PPO policy.

    Reads ``clip_param``, ``vf_clip_param``, ``kl_coeff`` (initial value),
    ``kl_target``, ``vf_loss_coeff``, ``entropy_coeff``, ``grad_clip``,
    ``use_gae``, ``lambda``, ``use_critic``. The current ``kl_coeff`` is part of
    :meth:`get_state`.
    """

    DEFAULT_CONFIG: dict[str, Any] = {
        **Policy.DEFAULT_CONFIG,
        "lr": 5e-5,
        "lambda": 1.0,
        "clip_param": 0.3,
        "vf_clip_param": None,  # off: an absolute clip depends on the reward scale
        "kl_coeff": 0.2,
        "kl_target": 0.01,
        "vf_loss_coeff": 1.0,
        "entropy_coeff": 0.0,
    }

    def __init__(self, observation_space, action_space, config: dict[str, Any]) -> None:
        super().__init__(observation_space, action_space, config)
        self.kl_coeff: float = float(self.config["kl_coeff"])
        self.kl_target: float = float(self.config["kl_target"])
        columns = [
            SampleBatch.OBS,
            SampleBatch.ACTIONS,
            SampleBatch.ADVANTAGES,
            SampleBatch.ACTION_LOGP,
            SampleBatch.ACTION_DIST_INPUTS,
        ]
        if self.has_critic:
            columns += [SampleBatch.VALUE_TARGETS, SampleBatch.VF_PREDS]
        self.loss_columns = tuple(columns)

    def loss(self, train_batch: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        dist_inputs, values = self.model_outputs(train_batch)
        dist = self.dist_class(dist_inputs)
        old_dist = self.dist_class(train_batch[SampleBatch.ACTION_DIST_INPUTS])
        logp = dist.logp(train_batch[SampleBatch.ACTIONS])

        policy_loss = ppo_surrogate_loss(
            logp,
            train_batch[SampleBatch.ACTION_LOGP],
            train_batch[SampleBatch.ADVANTAGES],
            float(self.config["clip_param"]),
        )
        # Entropy first: it caches dist's probabilities with grad enabled, before
        # the KL below may run under no_grad.
        entropy = dist.entropy().mean()
        if self.kl_coeff:
            kl = old_dist.kl(dist).mean()
        else:
            with torch.no_grad():  # reported only; no need to backprop through it
                kl = old_dist.kl(dist).mean()
        vf_loss = None
        if self.has_critic:
            vf_clip = self.config.get("vf_clip_param")
            vf_loss = ppo_value_loss(
                values,
                train_batch[SampleBatch.VF_PREDS],
                train_batch[SampleBatch.VALUE_TARGETS],
                None if vf_clip is None else float(vf_clip),
            )
        total = ppo_total_loss(
            policy_loss,
            vf_loss,
            kl,
            entropy,
            kl_coeff=self.kl_coeff,
            vf_loss_coeff=float(self.config["vf_loss_coeff"]),
            entropy_coeff=self.entropy_coeff,
        )
        stats: TensorDict = {
            "policy_loss": policy_loss.detach(),
            "kl": kl.detach(),
            "entropy": entropy.detach(),
        }
        if vf_loss is not None:
            stats["vf_loss"] = vf_loss.detach()
        return total, stats

    def _extra_learn_stats(self) -> dict[str, float]:
        return {"cur_kl_coeff": self.kl_coeff}

    def update_kl(self, sampled_kl: float) -> float:
        """Adapt ``kl_coeff``: x1.5 if ``kl > 2 kl_target``, x0.5 if ``kl < kl_target / 2``.

        Returns the new coefficient.
        """
        if sampled_kl > 2.0 * self.kl_target:
            self.kl_coeff *= 1.5
        elif sampled_kl < 0.5 * self.kl_target:
            self.kl_coeff *= 0.5
        return self.kl_coeff

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        state["kl_coeff"] = float(self.kl_coeff)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if "kl_coeff" in state:
            self.kl_coeff = float(state["kl_coeff"])
