"""Env registry, EnvContext, and creation of gymnasium envs from names.

    register_env("my_env", lambda ctx: MyEnv(ctx["size"]))
    creator = make_env_creator("my_env")        # or "CartPole-v1", or an env class
    env = creator(EnvContext({"size": 3}, worker_index=1))

Envs written against the old gym API (``reset() -> obs``, 4-tuple ``step``) are
wrapped by :class:`OldGymAPIAdapter` automatically.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

import gymnasium as gym

from flowrl.envs.atari import resolve_short_name  # importing it registers the ALE ids
from flowrl.envs.context import EnvContext
from flowrl.envs.compat import ensure_gymnasium_env
from flowrl.imports import is_import_string, load_object

EnvCreator = Callable[["EnvContext"], Any]

_ENV_CREATORS: dict[str, EnvCreator] = {}


def register_env(name: str, env_creator: EnvCreator) -> None:
    """Registers ``env_creator(env_context) -> env`` under ``name``.

    The name can then be used as ``env`` in any config, CLI call or Tune experiment.
    Registration is per process; remote workers receive the creator function itself,
    so registering in the driver is enough.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_env: name must be a non-empty string, got {name!r}")
    if not callable(env_creator):
        raise TypeError(f"register_env({name!r}, ...): env_creator must be callable, "
                        f"got {type(env_creator).__name__}")
    _ENV_CREATORS[name] = env_creator
    # Tune trials run in other processes: Ray's registry carries the creator there.
    from ray.tune.registry import register_env as tune_register_env
    tune_register_env(name, env_creator)


def registered_envs() -> list[str]:
    """Names registered with :func:`register_env`."""
    return sorted(_ENV_CREATORS)


def _unknown_env_error(name: str) -> ValueError:
    known = list(_ENV_CREATORS) + list(gym.registry.keys())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"Unknown env {name!r}: it is neither registered with flowrl.register_env() "
        f"nor a gymnasium env id.{hint}"
    )


def make_env_creator(env: Any) -> EnvCreator:
    """Returns a creator ``fn(EnvContext) -> gymnasium.Env`` for ``env``.

    ``env`` may be a name given to :func:`register_env`, a gymnasium id
    (``"CartPole-v1"``), a short Atari name (``"Breakout"``, when Atari support is
    installed), gymnasium's ``"module:EnvId"`` (``"minigrid:MiniGrid-Empty-5x5-v0"``:
    the module is imported, in every worker too, to register the id), an env class /
    callable taking the ``EnvContext``, or an import string naming one
    (``"examples/custom_env.py:SimpleCorridor"``).
    Unknown names fail here, before any worker starts.
    """
    if env is None:
        raise ValueError("No env given: pass env=... to the agent or set config['env'] "
                         "(e.g. 'CartPole-v1').")
    if isinstance(env, str):
        if env in _ENV_CREATORS:
            creator = _ENV_CREATORS[env]
        elif env in gym.registry:
            creator = _GymnasiumCreator(env)
        elif _is_module_env_id(env):
            # gymnasium's "module:EnvId" (e.g. "minigrid:MiniGrid-Empty-5x5-v0"): the
            # module registers the id on import; gym.make does the same in each worker.
            _check_module_env_id(env)
            creator = _GymnasiumCreator(env)
        elif is_import_string(env):
            # "path/to/file.py:MyEnv" or "package.module:MyEnv": an env class or a
            # creator function, usable from scripts/train.py --env / --config.
            creator = load_object(env)
            if not callable(creator):
                raise ValueError(f"env {env!r} is not a class or function")
        else:
            creator = _from_tune_registry(env) or _resolve_extra_names(env)
            if creator is None:
                raise _unknown_env_error(env)
    elif inspect.isclass(env) or callable(env):
        creator = env
    else:
        raise ValueError(f"env must be a name or a callable, got {env!r}")
    return _CompatCreator(creator)


def _is_module_env_id(name: str) -> bool:
    """``"package.module:EnvId"`` whose EnvId is not a Python name (so not an import
    string of a class or function): gymnasium's form for an env a module registers."""
    if name.count(":") != 1:
        return False
    module, env_id = name.split(":")
    return (bool(module) and bool(env_id) and not env_id.isidentifier()
            and all(part.isidentifier() for part in module.split(".")))


def _check_module_env_id(name: str) -> None:
    """Imports the module of ``"module:EnvId"``; ValueError unless it registers EnvId."""
    import importlib
    module, env_id = name.split(":")
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(
            f"env {name!r}: module {module!r}, which should register {env_id!r} with "
            f"gymnasium, cannot be imported ({e}); install it, or give the env id alone "
            "if it is registered already") from e
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"env {name!r}: importing {module!r} registered no gymnasium env "
                         f"{env_id!r}.{hint}")


def _from_tune_registry(name: str) -> EnvCreator | None:
    """A creator registered in the driver, seen from a Tune trial's process."""
    import ray
    if not ray.is_initialized():
        return None
    from ray.tune.registry import ENV_CREATOR, _global_registry
    if _global_registry.contains(ENV_CREATOR, name):
        return _global_registry.get(ENV_CREATOR, name)
    return None


def _resolve_extra_names(name: str) -> EnvCreator | None:
    """Short names (Atari games: "Breakout" -> DeepMind-preprocessed ALE); None if unknown."""
    return resolve_short_name(name)


class _GymnasiumCreator:
    """Picklable creator for a gymnasium id; env_config entries become make() kwargs."""

    def __init__(self, env_id: str):
        self.env_id = env_id

    def __call__(self, ctx: EnvContext):
        return gym.make(self.env_id, **dict(ctx))

    def __repr__(self) -> str:
        return f"gymnasium.make({self.env_id!r})"


class _CompatCreator:
    """Wraps any creator so that its env speaks the gymnasium API."""

    def __init__(self, creator: EnvCreator):
        self.creator = creator

    def __call__(self, ctx: EnvContext):
        return ensure_gymnasium_env(self.creator(ctx))

    def __repr__(self) -> str:
        return repr(self.creator)
