"""Environment creation: registry, EnvContext, old-gym-API adapter, multi-agent envs."""

from flowrl.envs.compat import OldGymAPIAdapter, ensure_gymnasium_env
from flowrl.envs.multi_agent import MultiAgentEnv, MultiCartPole, ParallelEnvAdapter
from flowrl.envs.pettingzoo_aec import AECEnvAdapter
from flowrl.envs.registry import EnvContext, make_env_creator, register_env, registered_envs

__all__ = ["AECEnvAdapter", "EnvContext", "MultiAgentEnv", "MultiCartPole", "OldGymAPIAdapter",
           "ParallelEnvAdapter", "ensure_gymnasium_env", "make_env_creator", "register_env",
           "registered_envs"]
