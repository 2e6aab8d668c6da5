"""Algorithm names -> Agent classes (imported lazily)."""

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
}


def get_agent_class(name: str) -> type:
    """``get_agent_class("PPO") -> PPOAgent``; unknown names raise ``ValueError``.

    Names registered with :func:`flowrl.build_agent` in this process resolve too.
    """
    from flowrl.builder import user_algorithms
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
