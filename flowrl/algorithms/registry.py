"""Algorithm names -> Agent classes: the built-in ones (imported lazily by path) and
those registered in this process (:func:`flowrl.build_agent`).

The built-in table names each algorithm's plan module by string, so this module imports
nothing of flowrl: the Agent shell can use it (``Agent.from_checkpoint``) while the plan
modules, which subclass the shell, sit above it.
"""

from __future__ import annotations

import difflib
import importlib

ALGORITHMS: dict[str, str] = {
    "PG": "flowrl.plans.pg:PGAgent",
    "A2C": "flowrl.plans.a2c:A2CAgent",
    "PPO": "flowrl.plans.ppo:PPOAgent",
    "A3C": "flowrl.plans.a3c:A3CAgent",
    "DQN": "flowrl.plans.dqn:DQNAgent",
    "APEX": "flowrl.plans.apex:ApexAgent",
    "DDPG": "flowrl.plans.ddpg:DDPGAgent",
    "APEX_DDPG": "flowrl.plans.apex_ddpg:ApexDDPGAgent",
    "ES": "flowrl.plans.es:ESAgent",
    "IMPALA": "flowrl.plans.impala:ImpalaAgent",
    "APPO": "flowrl.plans.appo:APPOAgent",
    "SAC": "flowrl.plans.sac:SACAgent",
}


# Algorithms defined by users in this process: name -> Agent class.
_USER_ALGORITHMS: dict[str, type] = {}


def add_user_algorithm(name: str, agent_cls: type) -> None:
    """Makes ``get_agent_class(name)`` return ``agent_cls`` in this process (see
    :func:`flowrl.algorithms.builder.register_agent`, which also tells Tune)."""
    if name in ALGORITHMS:
        raise ValueError(f"{name!r} is a built-in algorithm; choose another name")
    _USER_ALGORITHMS[name] = agent_cls


def user_algorithms() -> dict[str, type]:
    """Algorithms registered in this process with :func:`flowrl.build_agent`."""
    return dict(_USER_ALGORITHMS)


def get_agent_class(name: str) -> type:
    """``get_agent_class("PPO") -> PPOAgent``; unknown names raise ``ValueError``.

    Names registered with :func:`flowrl.build_agent` in this process resolve too.
    """
    users = user_algorithms()
    if name in users:
        return users[name]
    if name not in ALGORITHMS:
        known = list(ALGORITHMS) + list(users)
        close = difflib.get_close_matches(str(name).upper(), known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown algorithm {name!r}.{hint} "
                         f"Known algorithms: {', '.join(known)}.")
    module_name, class_name = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
