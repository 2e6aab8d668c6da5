"""SAC (Haarnoja et al. 2018; discrete actions: Christodoulou 2019): the DQN replay plan
with the SAC policy (:mod:`flowrl.policies.sac`), as DDPG uses it.

    (1) store:  rollouts(bulk_sync) -> StoreToReplay -> BroadcastWeights
    (2) replay: Replay -> TrainOneStep -> UpdatePriorities
                -> UpdateTargetNetwork(every target_network_update_freq; 0 = every step,
                   each call blending the target critics by tau)
    Concurrently([1, 2], round_robin, output_indexes=[1] (0-based: results of 2),
                 weights from training_intensity)

Defaults follow the SAC paper (two 256-unit layers, Adam 3e-4 for actor, critics and
temperature, batch 256, tau 0.005, one gradient step per sampled step) with a 100k
buffer and 1000 uniform random steps before learning starts.
"""

from __future__ import annotations

import math

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.plans import dqn
from flowrl.policies.sac import SACTorchPolicy

# DQN keys with no meaning for SAC.
_DQN_ONLY = ("hiddens", "dueling", "double_q", "adam_epsilon", "exploration_config", "lr",
             "per_worker_exploration", "worker_side_prioritization")

# The common keys stay (``lr`` too: SAC ignores it for actor_lr / critic_lr / alpha_lr).
DEFAULT_CONFIG: dict = with_common_config({
    **{k: v for k, v in dqn.DEFAULT_CONFIG.items() if k not in _DQN_ONLY},
    "num_workers": 0,
    "rollout_fragment_length": 1,
    "train_batch_size": 256,
    "training_intensity": 256,     # one 256-row update per sampled step
    "n_step": 1,
    "actor_hiddens": [256, 256],
    "critic_hiddens": [256, 256],
    "actor_hidden_activation": "relu",
    "critic_hidden_activation": "relu",
    "actor_lr": 3e-4,
    "critic_lr": 3e-4,
    "alpha_lr": 3e-4,              # 0 keeps alpha at initial_alpha
    "tau": 0.005,
    "target_network_update_freq": 0,
    "twin_q": True,
    "initial_alpha": 1.0,
    "target_entropy": None,        # None or "auto": -dim(A) for Box, 0.5 log(n) for Discrete
    "l2_reg": 0.0,
    "grad_clip": None,
    "buffer_size": 100_000,
    "learning_starts": 1000,
    "prioritized_replay": False,
    "exploration_config": {"random_timesteps": 1000},
    "timesteps_per_iteration": 1000,
})


def validate_sac_config(config: dict) -> None:
    """Checks SAC's keys (and the replay plan's) before any worker starts."""
    dqn.validate_dqn_config(config)
    require(0 < config["tau"] <= 1, f"tau={config['tau']!r} must be in (0, 1].")
    for key in ("actor_lr", "critic_lr", "alpha_lr", "l2_reg"):
        require(config[key] >= 0, f"{key}={config[key]!r} must be >= 0.")
    require(config["initial_alpha"] > 0,
            f"initial_alpha={config['initial_alpha']!r} must be > 0 (alpha = exp(log_alpha)).")
    entropy = config["target_entropy"]
    require(entropy is None or entropy == "auto" or (
        isinstance(entropy, (int, float)) and not isinstance(entropy, bool)
        and math.isfinite(entropy)),
            f"target_entropy={entropy!r}; expected a number, 'auto' or None (= 'auto').")
    for key in ("actor_hiddens", "critic_hiddens"):
        require(all(isinstance(h, int) and h >= 1 for h in config[key]),
                f"{key}={config[key]!r} must be a list of positive layer sizes.")
    require(config["target_network_update_freq"] >= 0,
            f"target_network_update_freq={config['target_network_update_freq']!r} must be "
            ">= 0 (0: a soft update after every train step).")
    require(config["exploration_config"]["random_timesteps"] >= 0,
            "exploration_config.random_timesteps="
            f"{config['exploration_config']['random_timesteps']!r} must be >= 0.")
    model = config["model"]
    require(not model.get("use_lstm"),
            "SAC replays single transitions and has no recurrent replay; model.use_lstm is "
            "for the on-policy algorithms PPO, A2C, A3C, PG and IMPALA.")


class SACAgent(Agent):
    """SAC; the plan is :func:`flowrl.plans.dqn.execution_plan`."""

    _name = "SAC"
    _default_config = DEFAULT_CONFIG
    _policy_class = SACTorchPolicy
    execution_plan = staticmethod(dqn.execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        validate_sac_config(config)
