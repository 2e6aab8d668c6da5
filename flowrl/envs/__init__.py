"""Environment creation: registry, EnvContext, old-gym-API adapter."""

from flowrl.envs.compat import OldGymAPIAdapter, ensure_gymnasium_env
from flowrl.envs.registry import EnvContext, make_env_creator, register_env, registered_envs

__all__ = ["EnvContext", "OldGymAPIAdapter", "ensure_gymnasium_env", "make_env_creator",
           "register_env", "registered_envs"]
