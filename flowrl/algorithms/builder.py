"""Build an Agent class from a plan, and register it like the built-in algorithms.

    from flowrl import build_agent
    from flowrl.plans.ppo import DEFAULT_CONFIG
    from flowrl.policies.ppo import PPOTorchPolicy

    def execution_plan(workers, config, metrics):
        rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
        train_op = rollouts.combine(ConcatBatches(config["train_batch_size"], metrics)) \\
                           .for_each(TrainOneStep(workers, metrics))
        return StandardMetricsReporting(train_op, workers, config, metrics)

    MyPPO = build_agent("MyPPO", DEFAULT_CONFIG, PPOTorchPolicy, execution_plan)
    agent = MyPPO(env="CartPole-v1")            # or: get_agent_class("MyPPO")
    # scripts/train.py --run path/to/my_plan.py:MyPPO --env CartPole-v1

The returned class is a plain :class:`~flowrl.algorithms.agent.Agent` subclass: ``train()``,
``save()``/``restore()``, ``compute_action()``, evaluation, callbacks and the Tune
Trainable all come with it.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

from ray import tune

from flowrl.algorithms.agent import Agent
from flowrl.algorithms.registry import add_user_algorithm, user_algorithms
from flowrl.algorithms.trainable import make_trainable
from flowrl.flow import Metrics, Plan
from flowrl.workers.worker_set import WorkerSet

ExecutionPlan = Callable[[WorkerSet, dict, Metrics], Plan]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def build_agent(name: str, default_config: dict, policy: type | Callable[[dict], type],
                execution_plan: ExecutionPlan | None = None,
                training_step: Callable[[Agent], dict] | None = None,
                validate_config: Callable[[dict], None] | None = None,
                register: bool = True) -> type:
    """A new Agent class named ``name`` that runs ``execution_plan`` (or ``training_step``).

    Args:
        name: the algorithm's name (``--run NAME``, Tune's ``"run": NAME``, checkpoints).
        default_config: the algorithm's defaults; COMMON_CONFIG fills the rest, and
            unknown user keys are rejected against the union of both.
        policy: a Policy class, or ``fn(config) -> Policy class``.
        execution_plan: ``fn(workers, config, metrics) -> Plan`` whose results are
            one result dict per iteration (usually the value of
            StandardMetricsReporting, extended with ``.owning(...)`` for threads or
            actors the plan starts and ``.saving(name=...)`` for state to checkpoint).
        training_step: alternatively, ``fn(agent) -> result dict`` run once per
            ``train()`` (the imperative escape hatch).
        validate_config: ``fn(config)`` raising ``ValueError`` for bad values.
        register: make ``get_agent_class(name)``, ``scripts/train.py --run`` and Tune
            (in this process) know the class.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"build_agent: name must be an identifier-like string, got {name!r}")
    if (execution_plan is None) == (training_step is None):
        raise ValueError(f"build_agent({name!r}): give exactly one of execution_plan= or "
                         "training_step=")
    if not isinstance(default_config, dict):
        raise TypeError(f"build_agent({name!r}): default_config must be a dict, got "
                        f"{type(default_config).__name__}")
    if not callable(policy):
        raise TypeError(f"build_agent({name!r}): policy must be a Policy class or a "
                        f"function of the config, got {policy!r}")
    namespace: dict[str, Any] = {"_name": name, "_default_config": dict(default_config),
                                 "__doc__": f"{name}: an Agent built with build_agent()."}
    if isinstance(policy, type):
        namespace["_policy_class"] = policy
    else:
        namespace["get_policy_class"] = classmethod(lambda cls, config: policy(config))
    if execution_plan is not None:
        namespace["execution_plan"] = staticmethod(execution_plan)
    else:
        namespace["training_step"] = lambda self: training_step(self)
    if validate_config is not None:
        namespace["validate_config"] = classmethod(lambda cls, config: validate_config(config))
    agent_cls = type(name.replace(".", "_").replace("-", "_"), (Agent,), namespace)
    # Pickled by reference from the caller's module when Tune ships it to a trial.
    agent_cls.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)
    if register:
        register_agent(agent_cls)
    return agent_cls


def register_agent(agent_cls: type) -> None:
    """Makes an Agent subclass known by its ``_name`` to get_agent_class, the CLI and
    Tune (also for hand-written subclasses)."""
    add_user_algorithm(agent_cls._name, agent_cls)
    tune.register_trainable(agent_cls._name, make_trainable(agent_cls))


def load_algorithm(spec: str) -> str:
    """Imports ``"path/to/file.py:NAME"`` or ``"package.module:NAME"`` (a module that
    calls build_agent, or defines an Agent subclass NAME) and returns the algorithm's
    name. Plain names are returned unchanged."""
    from flowrl.imports import is_import_string, load_module
    if not is_import_string(spec):
        return spec
    where, name = spec.split(":")
    module = load_module(where, f"--run {spec}")
    if name in user_algorithms():
        return name
    value = getattr(module, name, None)
    if isinstance(value, type) and issubclass(value, Agent):
        if value._name not in user_algorithms():
            register_agent(value)
        return value._name
    raise ValueError(f"--run {spec!r}: {where} registered no algorithm named {name!r} "
                     f"(known there: {', '.join(sorted(user_algorithms())) or 'none'})")
