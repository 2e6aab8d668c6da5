"""DDPG / TD3 (Lillicrap et al. 2016; Fujimoto et al. 2018): the DQN plan with a
deterministic actor-critic policy and soft target updates.

    (1) store:  rollouts(bulk_sync) -> StoreToReplay -> BroadcastWeights
    (2) replay: Replay -> TrainOneStep -> UpdatePriorities
                -> UpdateTargetNetwork(every target_network_update_freq; 0 = every step,
                   each call blending the targets by tau)
    Concurrently([1, 2], round_robin, output_indexes=[1] (0-based: results of 2),
                 weights from training_intensity)

TD3's options (twin Q, target policy smoothing, delayed actor updates) are on by default.
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.plans import dqn
from flowrl.policies.ddpg import DDPGTorchPolicy

# DQN keys with no meaning for an actor-critic policy.
_DQN_ONLY = ("hiddens", "dueling", "double_q", "adam_epsilon", "exploration_config", "lr")

DEFAULT_CONFIG: dict = with_common_config({
    **{k: v for k, v in dqn.DEFAULT_CONFIG.items() if k not in _DQN_ONLY},
    "num_workers": 0,
    "rollout_fragment_length": 4,
    "train_batch_size": 128,
    "training_intensity": 128,     # one 128-row update per sampled step
    "n_step": 1,
    "actor_hiddens": [256, 256],
    "critic_hiddens": [256, 256],
    "actor_hidden_activation": "relu",
    "critic_hidden_activation": "relu",
    "actor_lr": 1e-3,
    "critic_lr": 1e-3,
    "tau": 0.005,
    "target_network_update_freq": 0,
    "twin_q": True,
    "policy_delay": 2,
    "smooth_target_policy": True,
    "target_noise": 0.2,
    "target_noise_clip": 0.5,
    "use_huber": False,
    "huber_threshold": 1.0,
    "l2_reg": 0.0,
    "grad_clip": None,
    "buffer_size": 100_000,
    "learning_starts": 1000,
    "prioritized_replay": False,
    "exploration_config": {"type": "gaussian", "scale": 0.1, "initial_scale": 1.0,
                           "final_scale": 1.0, "scale_timesteps": 10000,
                           "random_timesteps": 1000, "ou_theta": 0.15, "ou_sigma": 0.2,
                           "ou_base_scale": 0.1},
    "timesteps_per_iteration": 1000,
})


def validate_ddpg_config(config: dict) -> None:
    dqn.validate_dqn_config(config)
    require(0 < config["tau"] <= 1, f"tau={config['tau']!r} must be in (0, 1].")
    require(config["policy_delay"] >= 1,
            f"policy_delay={config['policy_delay']!r} must be >= 1.")
    require(config["exploration_config"]["type"] in ("gaussian", "ou"),
            f"exploration_config.type={config['exploration_config']['type']!r}; expected "
            "'gaussian' or 'ou'.")


class DDPGAgent(Agent):
    """DDPG / TD3; the plan is :func:`flowrl.plans.dqn.execution_plan`."""

    _name = "DDPG"
    _default_config = DEFAULT_CONFIG
    _policy_class = DDPGTorchPolicy
    execution_plan = staticmethod(dqn.execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        validate_ddpg_config(config)
