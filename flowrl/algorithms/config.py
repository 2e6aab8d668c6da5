"""COMMON_CONFIG, deep merging, and validation of user configs.

    config = merge_config(COMMON_CONFIG, PPO_DEFAULT_CONFIG)  # algorithm defaults
    config = merge_config(config, {"lr": 1e-3}, check_keys=True)  # user config

Unknown keys fail with the closest valid key, or, for keys of RLlib's configs that
flowrl spells differently (:data:`RENAMED_KEYS`), with flowrl's name for them; wrong
types fail naming the key, the value and the expected type. All of it happens before
any worker starts.
"""

from __future__ import annotations

import copy
import difflib
import json
from typing import Any, NamedTuple

from flowrl.workers.callbacks import DefaultCallbacks, resolve_callbacks
from flowrl.policies.filters import check_filter_name
from flowrl.policies.models import MODEL_DEFAULTS

# Keys whose values are free-form dicts owned by the user (not validated inside).
# ``evaluation_config`` is not free-form: its keys are checked against the top level.
FREE_FORM_KEYS = {"env_config", "custom_model_config"}

# Overrides of the top-level config used by Agent.evaluate(); checked like the top level.
EVALUATION_CONFIG_KEY = "evaluation_config"

COMMON_CONFIG: dict[str, Any] = {
    # -- environment --------------------------------------------------------------
    "env": None,                  # name, gymnasium id, or env class
    "env_config": {},             # passed to the env creator inside an EnvContext
    "clip_actions": True,         # clip Box actions to the space bounds when stepping
    # -- rollouts -----------------------------------------------------------------
    "num_workers": 0,             # remote rollout actors; 0 = sample in this process
    "num_envs_per_worker": 1,     # envs stepped together, one batched forward pass
    "rollout_fragment_length": 200,  # steps per env per sample() call
    "batch_mode": "truncate_episodes",  # or "complete_episodes"
    "explore": True,
    "seed": None,
    # Accepted for RLlib configs; flowrl's models and losses are PyTorch only.
    "framework": "torch",
    # -- training -----------------------------------------------------------------
    "gamma": 0.99,
    "lr": 1e-4,
    # Piecewise-linear [[timestep, value], ...] over sampled steps; overrides lr (every
    # optimizer of the policy) and entropy_coeff where set (flowrl.policies.schedules).
    "lr_schedule": None,
    "entropy_coeff_schedule": None,
    "train_batch_size": 200,
    "grad_clip": None,
    "model": copy.deepcopy(MODEL_DEFAULTS),
    # "MeanStdFilter": normalize Box observations by a running mean/std that the learner
    # updates from each train batch and sends with the weights; or "NoFilter".
    "observation_filter": "NoFilter",
    # -- resources ----------------------------------------------------------------
    "num_gpus": 0,                # GPUs for the learner (the driver / Tune trial)
    "num_cpus_for_driver": 1,
    # "auto": the CPUs left after the driver shared among the workers, at most 1 each,
    # so that e.g. num_workers=2 runs on a 2-core laptop instead of waiting forever.
    "num_cpus_per_worker": "auto",
    "num_gpus_per_worker": 0,    # > 0: a remote worker's policy acts on its GPU
    # 0: the driver learns, on one device. N >= 1: N learner actors train data-parallel
    # copies of the policies (each a shard of every train batch, gradients averaged:
    # gloo on CPUs, NCCL on GPUs); num_gpus is then 0 or N (one GPU per learner).
    # 1 = one learner actor (its own process / GPU, no all-reduce).
    "num_learners": 0,
    "num_cpus_per_learner": 1,
    # -- reporting ----------------------------------------------------------------
    "timesteps_per_iteration": 0,  # at least this many sampled steps per train()
    "min_iter_time_s": 0,          # at least this long per train()
    "metrics_smoothing_episodes": 100,
    "evaluation_interval": None,   # run evaluation every N train() calls
    "evaluation_num_episodes": 10,
    # 0: evaluate in this process (train() waits for it). N > 0: N remote RolloutWorkers
    # with the evaluation config play the episodes, split among them, while the
    # iteration trains (see Agent.evaluate).
    "evaluation_num_workers": 0,
    # Overrides of this config for evaluation: same keys (unknown ones fail), e.g.
    # {"env_config": {...}, "explore": True}; "explore" defaults to False there.
    "evaluation_config": {},
    # -- callbacks and videos -----------------------------------------------------
    "callbacks": DefaultCallbacks,  # a DefaultCallbacks subclass or "module.path:Class"
    "monitor": False,              # mp4 videos of some episodes in <logdir>/videos
    # -- multi-agent (envs that are flowrl.envs.MultiAgentEnv) -----------------------
    "multiagent": {
        # {policy_id: None | {"policy_class", "observation_space", "action_space",
        #  "config"}}, or a list of ids; None parts come from the algorithm and the env.
        "policies": None,
        # agent_id -> policy_id: a function, an import string "file.py:fn", or a dict.
        "policy_mapping_fn": None,
        "policies_to_train": None,  # None = all
    },
    # -- reliability --------------------------------------------------------------
    "checkpoint_replay_buffer": False,  # save replay contents with checkpoints
    "recreate_failed_workers": True,
    "max_worker_restarts": 100,
    "log_level": "WARN",
}


# Numeric keys whose integer defaults also accept fractions.
FRACTIONAL_KEYS = {"num_gpus", "num_cpus_for_driver", "num_cpus_per_worker",
                   "num_gpus_per_worker", "num_cpus_per_learner", "min_iter_time_s"}


def _type_name(value: Any) -> str:
    return type(value).__name__


# Resource keys that may be "auto": resolved from the cluster by resolve_auto_resources().
AUTO_KEYS = {"num_workers", "num_gpus", "num_cpus_per_worker", "num_replay_buffer_shards"}

# Switches that also take "auto" (on where it applies).
BOOL_OR_AUTO_KEYS = {"normalize_rewards"}


def _check_type(key: str, value: Any, default: Any) -> None:
    """Raises if ``value`` does not fit the type of the key's default."""
    if default is None or value is None:
        return
    if isinstance(default, type):
        # A class-valued key (callbacks) takes a class or an import path; its resolver
        # in validate_common checks the value and says what exactly is wrong.
        return
    if key.rsplit(".", 1)[-1] in BOOL_OR_AUTO_KEYS:
        if isinstance(value, bool) or value == "auto":
            return
        raise ValueError(f"Config key {key!r} has value {value!r}; expected True, False "
                         "or 'auto'.")
    if key.rsplit(".", 1)[-1] in AUTO_KEYS and "auto" in (value, default):
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return
        raise ValueError(f"Config key {key!r} has value {value!r}; expected a number or "
                         "'auto'.")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int) and key.rsplit(".", 1)[-1] not in FRACTIONAL_KEYS:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"Config key {key!r} has value {value!r} of type "
                         f"{_type_name(value)}; expected {_type_name(default)} "
                         f"(like the default {default!r}).")


class Renamed(NamedTuple):
    """A key of RLlib's old configs and what flowrl calls it.

    ``new``: flowrl's keys, in order of preference; the message names the first one the
    algorithm has (``sgd_stepsize`` is ``stepsize`` for ES, ``lr`` elsewhere). Empty for
    settings that have no counterpart. ``origin``: where the old name comes from.
    ``note``: what to write instead, when more than the new name is needed.
    """

    new: tuple[str, ...]
    origin: str
    note: str = ""


# Keys of RLlib's configs (0.x to 2.x) that flowrl spells differently, each checked
# against RLlib's own configs and deprecation messages. Only keys that the algorithm
# does not know are looked up here, so a flowrl key is never reported as renamed.
# Nested keys are written as paths ("model.custom_options").
RENAMED_KEYS: dict[str, Renamed] = {
    # RLlib 0.x PPO (and the policy-gradient agents of that time)
    "sgd_stepsize": Renamed(("stepsize", "lr"), "RLlib 0.x's name for the SGD step size"),
    "sgd_batchsize": Renamed(("sgd_minibatch_size",), "RLlib 0.x PPO's SGD minibatch size"),
    "timesteps_per_batch": Renamed(("train_batch_size",), "RLlib 0.x's train batch size"),
    # RLlib 0.x common config
    "sample_batch_size": Renamed(("rollout_fragment_length",),
                                 "RLlib's name before 0.8 for the rollout fragment length"),
    "gpu": Renamed(("num_gpus",), "an old RLlib switch", "It takes 0, 1 or a fraction."),
    "gpu_fraction": Renamed(("num_gpus",), "an old RLlib setting",
                            "It takes a fraction such as 0.5 as well."),
    "use_gpu_for_workers": Renamed(("num_gpus_per_worker",), "an old RLlib switch",
                                   "It takes a number, e.g. 1."),
    "multiagent.policy_graphs": Renamed(("multiagent.policies",),
                                        "RLlib's name before 0.7 for the policy map"),
    "optimizer": Renamed(
        (), "RLlib's policy-optimizer sub-dict",
        "its settings are top-level keys in flowrl: write e.g. "
        "\"num_replay_buffer_shards\": 4 and \"max_weight_sync_delay\": 400 next to "
        "\"num_workers\" (APEX), and drop the dict."),
    # Deep-learning framework switches: flowrl runs PyTorch only.
    "use_pytorch": Renamed(("framework",), "RLlib 0.8's torch switch",
                           "flowrl always runs PyTorch: drop the key, or write "
                           "\"framework\": \"torch\"."),
    "eager": Renamed(("framework",), "RLlib 0.8's TensorFlow-eager switch",
                     "flowrl runs PyTorch only: drop the key, or write "
                     "\"framework\": \"torch\"."),
    "eager_tracing": Renamed((), "a TensorFlow-only RLlib setting",
                             "flowrl runs PyTorch only: drop the key."),
    "tf_session_args": Renamed((), "a TensorFlow-only RLlib setting",
                               "flowrl runs PyTorch only: drop the key."),
    "local_tf_session_args": Renamed((), "a TensorFlow-only RLlib setting",
                                     "flowrl runs PyTorch only: drop the key."),
    # RLlib 1.x model config
    "model.custom_options": Renamed(("model.custom_model_config",),
                                    "RLlib's name before 1.0 for custom model options"),
    "model.lstm_use_prev_action_reward": Renamed(
        ("model.lstm_use_prev_action",),
        "RLlib's one switch (before 1.x) for the previous action and reward",
        "Set model.lstm_use_prev_reward as well."),
    # RLlib 1.x / 2.x names of settings whose flowrl names are the older RLlib ones
    "record_env": Renamed(("monitor",), "RLlib 1.x's name for recording videos"),
    "metrics_num_episodes_for_smoothing": Renamed(("metrics_smoothing_episodes",),
                                                  "RLlib 1.x/2.x's name"),
    "min_time_s_per_reporting": Renamed(("min_iter_time_s",), "RLlib 1.x's name"),
    "min_time_s_per_iteration": Renamed(("min_iter_time_s",), "RLlib 2.x's name"),
    "min_sample_timesteps_per_reporting": Renamed(("timesteps_per_iteration",),
                                                  "RLlib 1.x's name"),
    "min_sample_timesteps_per_iteration": Renamed(("timesteps_per_iteration",),
                                                  "RLlib 2.x's name"),
    "evaluation_duration": Renamed(("evaluation_num_episodes",), "RLlib 1.x/2.x's name",
                                   "flowrl always counts whole episodes."),
    "num_rollout_workers": Renamed(("num_workers",), "RLlib 2.x's name"),
    "num_env_runners": Renamed(("num_workers",), "RLlib 2.x's name"),
    "num_envs_per_env_runner": Renamed(("num_envs_per_worker",), "RLlib 2.x's name"),
    "num_cpus_per_env_runner": Renamed(("num_cpus_per_worker",), "RLlib 2.x's name"),
    "num_gpus_per_env_runner": Renamed(("num_gpus_per_worker",), "RLlib 2.x's name"),
    "num_gpus_per_learner": Renamed(
        ("num_gpus",), "RLlib 2.x's per-learner GPU count",
        "flowrl's num_gpus counts all GPUs: with num_learners N, set num_gpus: N (one GPU "
        "per learner) or 0."),
    "evaluation_num_env_runners": Renamed(("evaluation_num_workers",), "RLlib 2.x's name"),
    "num_epochs": Renamed(("num_sgd_iter",), "RLlib 2.x's name for PPO's SGD epochs"),
    "num_steps_sampled_before_learning_starts": Renamed(("learning_starts",),
                                                        "RLlib 2.x's name"),
}


def _rename_error(name: str, value: Any, known: list[str]) -> ValueError | None:
    """The error for an RLlib key that flowrl spells differently (None if it is not one).

    ``name``: the key's path (``"model.custom_options"``; ``evaluation_config.`` in
    front is ignored). ``known``: the keys of the dict it was found in.
    """
    path = name.removeprefix(f"{EVALUATION_CONFIG_KEY}.")
    renamed = RENAMED_KEYS.get(path)
    if renamed is None:
        return None
    prefix = path.rpartition(".")[0]
    local = {f"{prefix}.{k}" if prefix else k for k in known}
    has = [new for new in renamed.new if new in local]
    note = f" {renamed.note}" if renamed.note else ""
    if has:
        new = has[0]
        example = ""
        if isinstance(value, (bool, int, float, str)) and not note:
            example = f": write {{{json.dumps(new.rpartition('.')[2])}: {json.dumps(value)}}}"
        return ValueError(f"Config key {name!r} is {renamed.origin}; flowrl calls it "
                          f"{new!r}{example}.{note}")
    if renamed.new:
        return ValueError(f"Config key {name!r} is {renamed.origin}; flowrl calls it "
                          f"{renamed.new[0]!r}, a setting this algorithm does not have.{note}")
    return ValueError(f"Config key {name!r} is {renamed.origin}; {renamed.note}")


def _unknown_key_error(key: str, known: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown config key {key!r}{where}.{hint} "
                      f"Valid keys: {', '.join(sorted(known))}.")


def merge_config(base: dict, overrides: dict | None, check_keys: bool = False,
                 _path: str = "") -> dict:
    """Deep-merges ``overrides`` into a copy of ``base``.

    Dict-valued keys merge recursively (so ``{"model": {"fcnet_hiddens": [32]}}`` keeps
    the other model keys). With ``check_keys``, keys unknown to ``base`` and values
    of the wrong type raise ``ValueError``.
    """
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        name = f"{_path}{key}"
        if check_keys and key not in base:
            raise _rename_error(name, value, list(base)) or _unknown_key_error(
                name, list(base), f" in {_path.rstrip('.')!r}" if _path else "")
        default = base.get(key)
        if check_keys:
            _check_type(name, value, default)
            if key == EVALUATION_CONFIG_KEY and not _path:
                _check_evaluation_config(base, value)
        if key == EVALUATION_CONFIG_KEY and isinstance(default, dict) and \
                isinstance(value, dict):
            # Overrides of overrides: merged, but checked above against the top level.
            merged[key] = merge_config(default, value)
        elif isinstance(default, dict) and isinstance(value, dict) and \
                key not in FREE_FORM_KEYS:
            merged[key] = merge_config(default, value, check_keys, f"{name}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_evaluation_config(top: dict, overrides: dict) -> None:
    """Checks ``evaluation_config`` keys and types against the top-level config."""
    where = f" in {EVALUATION_CONFIG_KEY!r}"
    for key, value in overrides.items():
        name = f"{EVALUATION_CONFIG_KEY}.{key}"
        if key == EVALUATION_CONFIG_KEY or key not in top:
            raise _rename_error(name, value, list(top)) or _unknown_key_error(
                key, [k for k in top if k != EVALUATION_CONFIG_KEY], where)
        _check_type(name, value, top[key])
        if isinstance(top[key], dict) and isinstance(value, dict) and \
                key not in FREE_FORM_KEYS:
            merge_config(top[key], value, check_keys=True, _path=f"{name}.")


def with_common_config(algorithm_defaults: dict) -> dict:
    """:data:`COMMON_CONFIG` deep-merged with an algorithm's defaults: the full config a
    plan module exposes as ``DEFAULT_CONFIG`` (so ``DEFAULT_CONFIG["model"]`` works).

        DEFAULT_CONFIG = with_common_config({"lr": 3e-4, "num_sgd_iter": 10})
    """
    return merge_config(COMMON_CONFIG, algorithm_defaults)


# Frameworks of RLlib configs that flowrl cannot run, named in the error.
OTHER_FRAMEWORKS = ("tf", "tf2", "tfe", "jax")


def check_framework(framework: Any) -> None:
    """``framework`` must be ``"torch"``: flowrl's models and losses are PyTorch only."""
    if framework == "torch":
        return
    what = "is a framework flowrl does not run" if framework in OTHER_FRAMEWORKS \
        else "is unknown"
    raise ValueError(f"framework={framework!r} {what}: flowrl's models and losses are "
                     "PyTorch only. Set \"framework\": \"torch\" (or leave the key out).")


def require(condition: bool, message: str) -> None:
    """Raises ``ValueError(message)`` unless ``condition`` holds (config checks)."""
    if not condition:
        raise ValueError(message)


def _available_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the running Ray cluster, else of this machine."""
    import ray
    if ray.is_initialized():
        cluster = ray.cluster_resources()
        return cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    import os

    import torch
    return float(os.cpu_count() or 1), float(torch.cuda.device_count())


def resolve_auto_resources(config: dict,
                           cluster: tuple[float, float] | None = None) -> dict:
    """Replaces ``"auto"`` resource values with numbers that fit the cluster (or machine).

    ``num_gpus``: 1 if a GPU exists, else 0 (with ``num_learners`` N: N if the cluster
    has N GPUs, else 0). ``num_workers``: one per CPU left after the
    driver, at least 2. ``num_cpus_per_worker``: the CPUs left after the driver shared
    among the rollout and evaluation workers, at most 1; on a cluster with no CPU left
    after the driver (1 CPU, ``num_cpus_for_driver: 1``) the workers share all of its
    CPUs instead, since 0 would be no valid share (a Tune trial, which also reserves
    the driver's CPU, then gets a clear "asks for N CPUs" error).
    ``num_replay_buffer_shards``: one per 4 workers, 1 to 4.
    ``cluster``: ``(CPUs, GPUs)`` to size for; by default the running Ray cluster's,
    else this machine's.
    Returns the dict of resolved keys (empty when nothing was "auto").
    """
    if not any(config.get(key) == "auto" for key in AUTO_KEYS):
        return {}
    cpus, gpus = cluster if cluster is not None else _available_resources()
    resolved = {}
    if config.get("num_gpus") == "auto":
        learners = config.get("num_learners", 0)
        if learners > 0:  # one GPU per learner, or CPU learners
            resolved["num_gpus"] = learners if gpus >= learners else 0
        else:
            resolved["num_gpus"] = 1 if gpus >= 1 else 0
    spare = max(cpus - config["num_cpus_for_driver"], 0.0)
    if config.get("num_workers") == "auto":
        resolved["num_workers"] = max(2, int(spare))
    workers = resolved.get("num_workers", config.get("num_workers"))
    if config.get("num_cpus_per_worker") == "auto":
        # Evaluation workers take the same per-worker share as rollout workers.
        sharing = workers + (config.get("evaluation_num_workers") or 0)
        pool = spare if spare > 0 else cpus  # nothing spare: share the driver's CPUs
        per_worker = min(1.0, pool / max(sharing, 1))
        resolved["num_cpus_per_worker"] = per_worker if per_worker < 1 else 1
    if config.get("num_replay_buffer_shards") == "auto":
        resolved["num_replay_buffer_shards"] = max(1, min(4, workers // 4))
    config.update(resolved)
    return resolved


def _validate_learners(config: dict) -> None:
    """``num_learners`` / ``num_cpus_per_learner`` and how ``num_gpus`` goes with them:
    never more GPUs than learners can use."""
    learners, gpus = config["num_learners"], config["num_gpus"]
    require(learners >= 0, f"num_learners={learners!r} must be >= 0.")
    require(config["num_cpus_per_learner"] > 0,
            f"num_cpus_per_learner={config['num_cpus_per_learner']!r} must be > 0.")
    if learners == 0:
        require(gpus <= 1,
                f"num_gpus={gpus!r}, but with num_learners=0 the driver learns on one "
                f"device and the other GPUs would sit idle. Set num_learners: {int(gpus)} "
                f"to train {int(gpus)} data-parallel learners, one per GPU, or num_gpus: 1.")
    else:
        require(gpus == 0 or gpus == learners,
                f"num_learners={learners} with num_gpus={gpus!r}: each learner takes one "
                f"whole GPU, so num_gpus must be {learners} (GPU learners, NCCL) or 0 (CPU "
                "learners, gloo).")


def validate_common(config: dict) -> None:
    """Checks of COMMON_CONFIG values that any algorithm relies on."""
    for key in ("num_envs_per_worker", "rollout_fragment_length", "train_batch_size"):
        require(config[key] >= 1, f"{key}={config[key]!r} must be >= 1.")
    require(config["num_workers"] >= 0, f"num_workers={config['num_workers']!r} must be >= 0.")
    require(config["batch_mode"] in ("truncate_episodes", "complete_episodes"),
            f"batch_mode={config['batch_mode']!r}; expected 'truncate_episodes' or "
            "'complete_episodes'.")
    require(0.0 <= config["gamma"] <= 1.0, f"gamma={config['gamma']!r} must be in [0, 1].")
    require(config["lr"] >= 0, f"lr={config['lr']!r} must be >= 0.")
    for key in ("num_gpus", "num_gpus_per_worker", "num_cpus_for_driver",
                "timesteps_per_iteration", "min_iter_time_s", "max_worker_restarts"):
        require(config[key] >= 0, f"{key}={config[key]!r} must be >= 0.")
    require(config["num_cpus_per_worker"] > 0 or config["num_workers"] == 0,
            f"num_cpus_per_worker={config['num_cpus_per_worker']!r} must be > 0 (fractions "
            "like 0.5 are fine).")
    require(config["metrics_smoothing_episodes"] >= 1,
            f"metrics_smoothing_episodes={config['metrics_smoothing_episodes']!r} must be "
            ">= 1.")
    clip = config["grad_clip"]
    require(clip is None or clip > 0, f"grad_clip={clip!r} must be None (off) or > 0.")
    require(config["num_gpus"] == 0 or config["num_gpus"] <= 1 or
            float(config["num_gpus"]).is_integer(),
            f"num_gpus={config['num_gpus']!r}: fractions are allowed only below 1.")
    _validate_learners(config)
    interval = config["evaluation_interval"]
    require(interval is None or (isinstance(interval, int) and interval >= 1),
            f"evaluation_interval={interval!r} must be None or an int >= 1.")
    num_eval = config["evaluation_num_episodes"]
    require(num_eval >= 1, f"evaluation_num_episodes={num_eval!r} must be >= 1.")
    eval_workers = config["evaluation_num_workers"]
    require(eval_workers >= 0, f"evaluation_num_workers={eval_workers!r} must be >= 0.")
    check_framework(config["framework"])
    check_filter_name(config["observation_filter"])
    from flowrl.workers.multi_agent_sampler import validate_multiagent
    validate_multiagent(config)
    # Import paths become classes here, so a bad one fails before any worker starts.
    config["callbacks"] = resolve_callbacks(config["callbacks"])
    eval_config = config[EVALUATION_CONFIG_KEY]
    if "callbacks" in eval_config:
        eval_config["callbacks"] = resolve_callbacks(eval_config["callbacks"],
                                                     f"{EVALUATION_CONFIG_KEY}.callbacks")
