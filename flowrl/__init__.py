"""flowrl: distributed reinforcement learning as short, readable dataflow plans.

    import flowrl
    from flowrl.plans.ppo import PPOAgent, DEFAULT_CONFIG
    agent = PPOAgent(config=DEFAULT_CONFIG.copy(), env="CartPole-v1")
    print(agent.train()["episode_reward_mean"])

Importing flowrl registers every algorithm with Ray Tune under its short name, so
``tune.run_experiments({"exp": {"run": "PPO", ...}})`` works.
"""

from __future__ import annotations

import importlib
from typing import Any

from flowrl.version import __version__

# Public names, imported on first use: Ray worker processes import this package when
# they unpickle a RolloutWorker, and must not pay for Tune and every plan each time.
_LAZY = {
    "Agent": "flowrl.algorithms.agent",
    "build_agent": "flowrl.algorithms.builder",
    "DefaultCallbacks": "flowrl.workers.callbacks",
    "MultiAgentEnv": "flowrl.envs",
    "EnvContext": "flowrl.envs",
    "register_env": "flowrl.envs",
    "register_custom_model": "flowrl.policies.models",
    "ALGORITHMS": "flowrl.algorithms.registry",
    "get_agent_class": "flowrl.algorithms.registry",
    "DEFAULT_POLICY_ID": "flowrl.data.sample_batch",
    "MultiAgentBatch": "flowrl.data.sample_batch",
    "SampleBatch": "flowrl.data.sample_batch",
    "get_trainable_class": "flowrl.algorithms.trainable",
    "register_trainables": "flowrl.algorithms.trainable",
    "Plan": "flowrl.flow",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowrl' has no attribute {name!r}")


def _inside_ray_worker() -> bool:
    """True in a Ray worker process (an actor or task), where Tune is not needed."""
    try:
        import ray._private.worker as ray_worker
        return ray_worker.global_worker.mode == ray_worker.WORKER_MODE
    except Exception:  # an unknown Ray layout: behave like a driver
        return False


if not _inside_ray_worker():
    from flowrl.algorithms.trainable import register_trainables as _register

    _register()
