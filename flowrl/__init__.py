"""flowrl: distributed reinforcement learning as short, readable dataflow plans.

    import flowrl
    from flowrl.plans.ppo import PPOAgent, DEFAULT_CONFIG
    agent = PPOAgent(config=DEFAULT_CONFIG.copy(), env="CartPole-v1")
    print(agent.train()["episode_reward_mean"])

Importing flowrl registers every algorithm with Ray Tune under its short name, so
``tune.run_experiments({"exp": {"run": "PPO", ...}})`` works.
"""

__version__ = "0.1.0"

from flowrl.agent import Agent  # noqa: E402
from flowrl.envs import EnvContext, register_env  # noqa: E402
from flowrl.policies.models import register_custom_model  # noqa: E402
from flowrl.registry import ALGORITHMS, get_agent_class  # noqa: E402
from flowrl.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch  # noqa: E402
from flowrl.trainable import get_trainable_class, register_trainables  # noqa: E402

register_trainables()

__all__ = ["ALGORITHMS", "Agent", "DEFAULT_POLICY_ID", "EnvContext", "MultiAgentBatch",
           "SampleBatch", "__version__", "get_agent_class", "get_trainable_class",
           "register_custom_model", "register_env"]
