"""Command line: ``flowrl train ...`` (same as ``python scripts/train.py ...``).

    python scripts/train.py --run PPO --env CartPole-v1 --stop '{"episode_reward_mean": 150}'
    python scripts/train.py -f flowrl/tuned_examples/cartpole-ppo.yaml

Experiments run through Ray Tune; each trial directory holds params.json, result.json,
progress.csv, a TensorBoard event file and checkpoint_<n>/ directories.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

TRAIN_EXAMPLES = """examples:
  python scripts/train.py --run PPO --env CartPole-v1 --stop '{"episode_reward_mean": 150}'
  python scripts/train.py --run PPO --env CartPole-v1 --config '{"num_workers": 1, "lr": 1e-3}'
  python scripts/train.py -f flowrl/tuned_examples/cartpole-ppo.yaml
"""


def _json_arg(name: str):
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{name} must be a JSON object: {e}") from e
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{name} must be a JSON object, got {text!r}")
        return value
    return parse


def make_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowrl train", description="Train a flowrl agent with Ray Tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES)
    p.add_argument("--run", help="algorithm: PG, A2C, PPO, ...")
    p.add_argument("--env", help="env name: a gymnasium id (CartPole-v1) or a registered name")
    p.add_argument("--config", type=_json_arg("--config"), default={},
                   help="algorithm config overrides as JSON")
    p.add_argument("--stop", type=_json_arg("--stop"), default={},
                   help='stop criteria as JSON, e.g. \'{"episode_reward_mean": 150}\'')
    p.add_argument("-f", "--config-file", help="YAML/JSON experiment file (overrides "
                   "--run/--env/--config/--stop)")
    p.add_argument("--checkpoint-freq", type=int, default=0,
                   help="checkpoint every N iterations (0 = off)")
    p.add_argument("--checkpoint-at-end", action="store_true",
                   help="checkpoint when the trial ends")
    p.add_argument("--keep-checkpoints-num", type=int, default=None,
                   help="keep only the N most recent checkpoints")
    p.add_argument("--num-samples", type=int, default=1, help="trials per config")
    p.add_argument("--experiment-name", default=None, help="default: the algorithm name")
    p.add_argument("--local-dir", default=os.path.expanduser("~/ray_results"),
                   help="results root (default: ~/ray_results)")
    p.add_argument("--restore", default=None, help="checkpoint directory to start from")
    p.add_argument("--resume", action="store_true", help="resume the named experiment")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster")
    p.add_argument("--ray-num-cpus", type=int, default=None)
    p.add_argument("--ray-num-gpus", type=int, default=None,
                   help="default: the GPUs GPUtil finds")
    p.add_argument("--local-mode", action="store_true", help="run Ray in local mode")
    p.add_argument("-v", "--verbose", action="count", default=1)
    return p


def _detect_gpus() -> int:
    try:
        import GPUtil
        return len(GPUtil.getGPUs())
    except Exception:  # no nvidia-smi, no driver: no GPUs
        return 0


def _first_candidate(value: Any) -> Any:
    """A concrete value standing in for a Tune search space (for early validation)."""
    if isinstance(value, dict):
        if set(value) == {"grid_search"}:
            return _first_candidate(value["grid_search"][0])
        return {k: _first_candidate(v) for k, v in value.items()}
    if hasattr(value, "sample") and type(value).__module__.startswith("ray.tune"):
        return value.sample()
    return value


def _experiments_from_args(args: argparse.Namespace) -> dict:
    if args.config_file:
        with open(args.config_file) as f:
            experiments = yaml.safe_load(f)
        if not isinstance(experiments, dict) or not experiments:
            raise ValueError(f"{args.config_file}: expected a mapping of experiment names "
                             "to specs")
        return experiments
    if not args.run:
        raise ValueError("Give --run ALGORITHM (and --env ENV), or -f EXPERIMENT_FILE.")
    spec = {"run": args.run, "config": dict(args.config), "stop": args.stop}
    if args.env:
        spec["env"] = args.env
    return {args.experiment_name or args.run: spec}


def _normalize_spec(name: str, spec: dict, args: argparse.Namespace) -> dict:
    """Fills CLI defaults and validates algorithm, env and config before Tune starts."""
    from flowrl.envs.registry import make_env_creator
    from flowrl.registry import get_agent_class

    spec = dict(spec)
    config = dict(spec.get("config", {}))
    if "env" in spec:
        config["env"] = spec.pop("env")
    agent_cls = get_agent_class(spec.get("run"))
    check: dict = _first_candidate(config)
    merged = agent_cls.merge_config(check)  # raises on bad keys/values
    make_env_creator(merged["env"])  # raises on unknown env ids
    spec["config"] = config
    checkpoint_config = dict(spec.pop("checkpoint_config", {}))
    checkpoint_config.setdefault("checkpoint_frequency",
                                 spec.pop("checkpoint_freq", args.checkpoint_freq))
    checkpoint_config.setdefault("checkpoint_at_end",
                                 spec.pop("checkpoint_at_end", args.checkpoint_at_end))
    keep = spec.pop("keep_checkpoints_num", args.keep_checkpoints_num)
    if keep is not None:
        checkpoint_config.setdefault("num_to_keep", keep)
    spec["checkpoint_config"] = checkpoint_config
    spec.setdefault("storage_path", os.path.abspath(os.path.expanduser(
        spec.pop("local_dir", args.local_dir))))
    spec.setdefault("num_samples", args.num_samples)
    if args.restore:
        spec["restore"] = args.restore
    return spec


def _resolve_auto(spec: dict) -> None:
    """Writes the cluster-resolved values of "auto" resource keys into the trial config,
    so they are printed and recorded in params.json."""
    from flowrl.config import AUTO_KEYS, COMMON_CONFIG
    from flowrl.registry import get_agent_class

    agent_cls = get_agent_class(spec["run"])
    config = spec["config"]
    defaults = {**COMMON_CONFIG, **agent_cls._default_config}
    auto_keys = [k for k in AUTO_KEYS if config.get(k, defaults.get(k)) == "auto"]
    if not auto_keys:
        return
    merged = agent_cls.merge_config(_first_candidate(config))
    for key in auto_keys:
        config[key] = merged[key]
    print(f"flowrl: {spec['run']} resources resolved for this cluster: "
          + ", ".join(f"{k}={config[k]}" for k in sorted(auto_keys)), flush=True)


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/train.py`` / ``flowrl train``; returns the exit code."""
    parser = make_train_parser()
    args = parser.parse_args(argv)
    try:
        experiments = {name: _normalize_spec(name, spec, args)
                       for name, spec in _experiments_from_args(args).items()}
    except (ValueError, FileNotFoundError) as e:
        print(f"flowrl train: error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import tune

    import flowrl  # noqa: F401  (registers the trainables)

    if not ray.is_initialized():
        init_args = {"include_dashboard": False}
        if args.ray_address:
            init_args["address"] = args.ray_address
        else:
            init_args["num_cpus"] = args.ray_num_cpus
            init_args["num_gpus"] = (args.ray_num_gpus if args.ray_num_gpus is not None
                                     else _detect_gpus())
        if args.local_mode:
            init_args["local_mode"] = True
        ray.init(**init_args)
    for spec in experiments.values():
        _resolve_auto(spec)
    try:
        trials = tune.run_experiments(experiments, resume=args.resume or None,
                                      verbose=args.verbose, raise_on_failed_trial=False)
    except ValueError as e:  # e.g. a resource request the cluster can never meet
        print(f"flowrl train: error: {e}", file=sys.stderr)
        return 2
    failed = [t for t in trials if t.status == "ERROR"]
    for trial in trials:
        last = trial.last_result or {}
        print(f"{trial.trial_id}: {trial.status}, iterations="
              f"{last.get('training_iteration')}, episode_reward_mean="
              f"{last.get('episode_reward_mean')}, dir={getattr(trial, 'path', trial.local_path)}")
        if trial.checkpoint is not None:
            print(f"  last checkpoint: {trial.checkpoint.path}")
    if failed:
        for trial in failed:
            print(f"Trial {trial.trial_id} failed; error file: {trial.error_file}",
                  file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``flowrl train ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: flowrl train [options]   (flowrl train --help for the options)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    print(f"flowrl: unknown command {command!r}; expected 'train'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
