"""Torch policies, models, action distributions and trajectory postprocessing."""

from flowrl.policies.a2c import A2CTorchPolicy, a2c_loss
from flowrl.policies.distributions import Categorical, DiagGaussian, Deterministic, get_dist_class
from flowrl.policies.models import MODEL_DEFAULTS, get_model, register_custom_model
from flowrl.policies.pg import PGTorchPolicy, pg_loss
from flowrl.policies.policy import Policy
from flowrl.policies.postprocessing import compute_advantages, discount_cumsum
from flowrl.policies.ppo import (
    PPOTorchPolicy,
    ppo_surrogate_loss,
    ppo_total_loss,
    ppo_value_loss,
)

__all__ = [
    "Policy",
    "PGTorchPolicy",
    "A2CTorchPolicy",
    "PPOTorchPolicy",
    "pg_loss",
    "a2c_loss",
    "ppo_surrogate_loss",
    "ppo_value_loss",
    "ppo_total_loss",
    "Categorical",
    "DiagGaussian",
    "Deterministic",
    "get_dist_class",
    "MODEL_DEFAULTS",
    "get_model",
    "register_custom_model",
    "compute_advantages",
    "discount_cumsum",
]
