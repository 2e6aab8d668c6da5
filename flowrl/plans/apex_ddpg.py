"""Ape-X DDPG: the Ape-X plan (:mod:`flowrl.plans.apex`) with the DDPG/TD3 policy and
per-worker exploration noise scales ``0.4 ** (1 + 7 i / (N - 1))``.
"""

from __future__ import annotations

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.config import require, with_common_config
from flowrl.plans import apex, ddpg

DEFAULT_CONFIG: dict = with_common_config({
    **{k: v for k, v in apex.DEFAULT_CONFIG.items() if k not in ddpg._DQN_ONLY},
    **{k: v for k, v in ddpg.DEFAULT_CONFIG.items() if k not in apex.DEFAULT_CONFIG},
    "n_step": 3,
    "train_batch_size": 512,
    "rollout_fragment_length": 50,
    "buffer_size": 1_000_000,
    # Sampled steps before the learner starts: enough for a varied first replay, small
    # enough that a 50k-step run on a classic-control task still trains (was 50k).
    "learning_starts": 10_000,
    "target_network_update_freq": 0,  # soft update (tau) after every learner result
    "prioritized_replay": True,
    "per_worker_exploration": True,
    "worker_side_prioritization": True,
    "grad_clip": None,
    "exploration_config": ddpg.DEFAULT_CONFIG["exploration_config"],
})


class ApexDDPGAgent(Agent):
    """Ape-X DDPG; the plan is :func:`flowrl.plans.apex.execution_plan`."""

    _name = "APEX_DDPG"
    _default_config = DEFAULT_CONFIG
    _policy_class = ddpg.DDPGTorchPolicy
    execution_plan = staticmethod(apex.execution_plan)

    @classmethod
    def validate_config(cls, config: dict) -> None:
        ddpg.validate_ddpg_config(config)
        require(config["num_workers"] >= 1,
                f"num_workers={config['num_workers']!r}: Ape-X needs remote workers (>= 1).")
