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
import re
import shutil
import sys
from typing import Any, Callable, NamedTuple
from urllib.parse import unquote, urlparse

import yaml

TRAIN_EXAMPLES = """examples:
  python scripts/train.py --run PPO --env CartPole-v1 --stop '{"episode_reward_mean": 150}'
  python scripts/train.py --run DQN --env CartPole-v0
  python scripts/train.py --run APEX --env Breakout
  python scripts/train.py --env=PongDeterministic-v4 --run=A2C \\
      --config '{"num_workers": 2, "monitor": true}'
  python scripts/train.py -f flowrl/tuned_examples/cartpole-ppo.yaml
  python scripts/train.py -f sweep.yaml --num-samples 3 --ray-num-cpus 2
  python scripts/train.py --run PPO --env CartPole-v1 --experiment-name long \\
      --checkpoint-freq 10 --keep-checkpoints-num 3
  python scripts/train.py --run PPO --env CartPole-v1 --experiment-name long --resume
  python scripts/train.py --run PPO --env CartPole-v1 \
      --callbacks 'ray.air.integrations.wandb:WandbLoggerCallback={"project": "flowrl"}'
  # on a cluster (after `ray start --head` here and `ray start --address=...` on the
  # other machines): results and checkpoints in storage every node can reach
  python scripts/train.py -f flowrl/tuned_examples/pong-apex.yaml --ray-address auto \
      --storage-path s3://my-bucket/experiments --checkpoint-freq 10

Each trial writes params.json, result.json, progress.csv, a TensorBoard event file
(tensorboard --logdir ~/ray_results) and checkpoint_<n>/ directories under
<storage-path>/<experiment-name>/<trial>/. Evaluate a checkpoint with scripts/rollout.py.
Running on a cluster: docs/cluster.md.
"""

DEFAULT_STORAGE_PATH = "~/ray_results"
# "s3://bucket/x", "gs://...", "file:///...", "hdfs://host/..." (RFC 3986 scheme).
_URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_storage_uri(path: str) -> bool:
    """True for a storage URI (``s3://bucket/experiments``, ``gs://...``,
    ``file:///mnt/results``, any ``scheme://``), False for a plain path."""
    return bool(_URI_PATTERN.match(path))


def resolve_storage_path(path: str) -> str:
    """The results root handed to Tune.

    A URI goes through unchanged: Tune (through pyarrow) opens it, so that every node of
    a cluster writes checkpoints to the same bucket or share. A plain path is expanded
    (``~``) and made absolute against the working directory, since trials run in
    directories of their own.
    """
    if is_storage_uri(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def local_folder_of(storage_path: str) -> str | None:
    """The local folder a resolved storage path names: the path itself, or the path of
    a ``file://`` URI (``file:///tmp/results`` -> ``/tmp/results``); None for remote
    storage (``s3://``, ``gs://``, ...)."""
    if not is_storage_uri(storage_path):
        return storage_path
    parsed = urlparse(storage_path)
    if parsed.scheme.lower() == "file" and parsed.netloc in ("", "localhost"):
        return unquote(parsed.path)
    return None


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


class CallbackSpec(NamedTuple):
    """One ``--callbacks`` value: the import string and the keyword arguments."""

    path: str
    kwargs: dict


def _callback_arg(text: str) -> CallbackSpec:
    """``"module:Class"``, ``"path/file.py:Class"``, either followed by ``=JSON``."""
    path, _, kwargs_text = text.partition("=")
    kwargs: dict = {}
    if kwargs_text:
        try:
            kwargs = json.loads(kwargs_text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(
                f"--callbacks {text!r}: the keyword arguments after '=' must be a JSON "
                f"object: {e}") from e
        if not isinstance(kwargs, dict):
            raise argparse.ArgumentTypeError(
                f"--callbacks {text!r}: the keyword arguments after '=' must be a JSON "
                "object, e.g. '{\"project\": \"flowrl\"}'")
    from flowrl.imports import is_import_string
    if not is_import_string(path):
        raise argparse.ArgumentTypeError(
            f"--callbacks {text!r}: expected an import string 'package.module:Class' or "
            "'path/to/file.py:Class', optionally followed by =JSON keyword arguments")
    return CallbackSpec(path, kwargs)


def load_callbacks(specs: list[CallbackSpec]) -> Callable[[], list]:
    """Checks each ``--callbacks`` class (a ``ray.tune.Callback`` subclass that can be
    built with its keyword arguments) and returns a function making fresh instances,
    one set per Tune run. Raises ``ValueError`` naming the bad value."""
    from ray.tune import Callback

    from flowrl.imports import load_object
    classes = []
    for spec in specs:
        cls = load_object(spec.path)
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            what = f"the class {cls.__name__}" if isinstance(cls, type) \
                else f"a {type(cls).__name__}"
            raise ValueError(f"--callbacks {spec.path!r} names {what}, not a "
                             "ray.tune.Callback subclass (Tune's LoggerCallback classes, "
                             "e.g. ray.air.integrations.wandb:WandbLoggerCallback, are ones)")
        classes.append((spec, cls))

    def make() -> list:
        made = []
        for spec, cls in classes:
            try:
                made.append(cls(**spec.kwargs))
            except Exception as e:  # a missing tracker package, a wrong keyword, ...
                raise ValueError(f"--callbacks {spec.path!r} with {spec.kwargs}: "
                                 f"{type(e).__name__}: {e}") from e
        return made

    make()  # built once here, so that a bad argument fails before Tune starts
    return make


def make_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowrl train", description="Train a flowrl agent with Ray Tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES)
    p.add_argument("--run", metavar="ALGO",
                   help="algorithm: PG, A2C, A3C, PPO, DQN, APEX, DDPG, APEX_DDPG, IMPALA, "
                        "ES (e.g. --run PPO), or one of your own built with build_agent: "
                        "--run examples/custom_plan.py:PPOWithLogging")
    p.add_argument("--env", help="a gymnasium id, an Atari short name or a registered env "
                                 "(e.g. --env CartPole-v1, --env Breakout)")
    p.add_argument("--config", type=_json_arg("--config"), default={}, metavar="JSON",
                   help='algorithm config overrides as JSON '
                        '(e.g. --config \'{"num_workers": 2, "lr": 0.001}\')')
    p.add_argument("--stop", type=_json_arg("--stop"), default={}, metavar="JSON",
                   help='stop when any result key reaches its value '
                        '(e.g. --stop \'{"episode_reward_mean": 150, '
                        '"timesteps_total": 100000}\'); default: run until stopped')
    p.add_argument("-f", "--config-file", metavar="FILE",
                   help="YAML or JSON experiments file: {name: {run, env, stop, config, "
                        "...}}, several experiments allowed; replaces --run/--env/--config/"
                        "--stop (e.g. -f flowrl/tuned_examples/cartpole-ppo.yaml)")
    p.add_argument("--checkpoint-freq", type=int, default=None, metavar="N",
                   help="checkpoint every N iterations; 0 = never (e.g. --checkpoint-freq 10)")
    p.add_argument("--checkpoint-at-end", action="store_true",
                   help="also checkpoint when a trial ends")
    p.add_argument("--keep-checkpoints-num", type=int, default=None, metavar="N",
                   help="keep only the N most recent checkpoints of each trial "
                        "(e.g. --keep-checkpoints-num 3); default: keep all")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="trials per config; with grid_search, per grid point "
                        "(e.g. --num-samples 3 runs three seeds)")
    p.add_argument("--experiment-name", default=None, metavar="NAME",
                   help="results folder under --storage-path (default: the algorithm "
                        "name, or the experiment's name in -f FILE; e.g. "
                        "--experiment-name long)")
    p.add_argument("--storage-path", default=None, metavar="DIR_OR_URI",
                   help="results root: trials go to <DIR_OR_URI>/<experiment-name>/. A "
                        "folder (joined to the working directory, ~ expanded) or a storage "
                        "URI passed to Tune unchanged, which every node of a cluster can "
                        "reach (default: ~/ray_results; e.g. --storage-path "
                        "s3://my-bucket/experiments, gs://my-bucket/experiments, "
                        "file:///mnt/shared/results or /tmp/results)")
    p.add_argument("--local-dir", default=None, metavar="DIR_OR_URI",
                   help="the earlier name of --storage-path, same meaning "
                        "(e.g. --local-dir /tmp/results)")
    p.add_argument("--restore", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint directory, on a file system the "
                        "trial's node can read (e.g. --restore "
                        "~/ray_results/PPO/PPO_CartPole-v1_.../checkpoint_000010)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted experiment (same --experiment-name and "
                        "--storage-path, a URI included) from the last checkpoint of each "
                        "trial")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join a running Ray cluster instead of starting one, from a "
                        "node of that cluster: auto (the cluster `ray start` started on "
                        "this machine, or $RAY_ADDRESS) or the head's host:port (e.g. "
                        "--ray-address auto, --ray-address 192.168.1.2:6379); see "
                        "docs/cluster.md")
    p.add_argument("--ray-num-cpus", type=int, default=None, metavar="N",
                   help="CPUs for the Ray instance started here (default: all; "
                        "e.g. --ray-num-cpus 2); not with --ray-address")
    p.add_argument("--ray-num-gpus", type=int, default=None, metavar="N",
                   help="GPUs for the Ray instance started here (default: the GPUs GPUtil "
                        "finds; e.g. --ray-num-gpus 0 to train on the CPU); not with "
                        "--ray-address")
    p.add_argument("--local-mode", action="store_true",
                   help="run everything in one process (Ray local mode) for debugging "
                        "with breakpoints")
    p.add_argument("--callbacks", type=_callback_arg, action="append", default=[],
                   metavar="IMPORT[=JSON]",
                   help="a Tune callback (e.g. an experiment tracker's logger callback) "
                        "by import string, built with the optional JSON keyword "
                        "arguments after '='; repeat the flag for several (e.g. "
                        "--callbacks 'ray.air.integrations.wandb:WandbLoggerCallback="
                        "{\"project\": \"flowrl\"}', --callbacks "
                        "ray.air.integrations.mlflow:MLflowLoggerCallback, or a file: "
                        "--callbacks my_callbacks.py:MyCallback)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="default: one progress line per iteration; -v adds Tune's status "
                        "table, -vv also Tune's per-result detail")
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
            try:
                experiments = yaml.safe_load(f)  # JSON is YAML too
            except yaml.YAMLError as e:
                raise ValueError(f"{args.config_file} is not valid YAML/JSON: {e}") from e
        if not isinstance(experiments, dict) or not experiments or not all(
                isinstance(spec, dict) for spec in experiments.values()):
            raise ValueError(f"{args.config_file}: expected a mapping of experiment names "
                             "to specs, e.g. {cartpole-ppo: {run: PPO, env: CartPole-v1, "
                             "stop: {...}, config: {...}}}")
        if args.experiment_name:
            if len(experiments) > 1:
                raise ValueError(f"--experiment-name names one experiment, but "
                                 f"{args.config_file} holds {len(experiments)}: "
                                 f"{', '.join(experiments)}")
            experiments = {args.experiment_name: next(iter(experiments.values()))}
        return experiments
    if not args.run:
        raise ValueError("Give --run ALGORITHM (and --env ENV), or -f EXPERIMENT_FILE.")
    spec = {"run": args.run, "config": dict(args.config), "stop": args.stop}
    if args.env:
        spec["env"] = args.env
    # "examples/my_plan.py:MyAlgo" -> experiment "MyAlgo"
    return {args.experiment_name or args.run.rsplit(":", 1)[-1]: spec}


def _absolute_import_paths(config: dict) -> None:
    """Tune trials run in their own directories: file paths in the import strings of
    ``env``, ``callbacks`` and ``model.custom_model`` become absolute
    (``"examples/custom_env.py:SimpleCorridor"`` -> ``"/abs/examples/..."``)."""
    from flowrl.imports import absolute_import_string
    for key in ("env", "callbacks"):
        if isinstance(config.get(key), str):
            config[key] = absolute_import_string(config[key])
    model = config.get("model")
    if isinstance(model, dict) and isinstance(model.get("custom_model"), str):
        config["model"] = {**model,
                           "custom_model": absolute_import_string(model["custom_model"])}


def _normalize_spec(name: str, spec: dict, args: argparse.Namespace) -> dict:
    """Fills CLI defaults and validates algorithm, env and config before Tune starts."""
    from flowrl.algorithms.builder import load_algorithm
    from flowrl.envs.registry import make_env_creator
    from flowrl.algorithms.registry import get_agent_class

    spec = dict(spec)
    config = dict(spec.get("config", {}))
    if "env" in spec:
        config["env"] = spec.pop("env")
    _absolute_import_paths(config)
    spec["run"] = load_algorithm(str(spec.get("run")))  # "file.py:NAME" registers NAME
    agent_cls = get_agent_class(spec["run"])
    check: dict = _first_candidate(config)
    merged = agent_cls.merge_config(check)  # raises on bad keys/values
    make_env_creator(merged["env"])  # raises on unknown env ids
    spec["config"] = config
    # Flags given on the command line win over the file's values; then the defaults.
    def option(key: str, flag_value: Any, default: Any) -> Any:
        from_file = spec.pop(key, None)
        if flag_value is not None:
            return flag_value
        return default if from_file is None else from_file

    checkpoint_config = dict(spec.pop("checkpoint_config", {}))
    checkpoint_config["checkpoint_frequency"] = option(
        "checkpoint_freq", args.checkpoint_freq, checkpoint_config.get("checkpoint_frequency", 0))
    checkpoint_config["checkpoint_at_end"] = option(
        "checkpoint_at_end", args.checkpoint_at_end or None,
        checkpoint_config.get("checkpoint_at_end", False))
    keep = option("keep_checkpoints_num", args.keep_checkpoints_num,
                  checkpoint_config.get("num_to_keep"))
    if keep is not None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep_checkpoints_num={keep!r} must be an int >= 1")
        checkpoint_config["num_to_keep"] = keep
    spec["checkpoint_config"] = checkpoint_config
    # A file may say local_dir (the older name) or storage_path.
    root = option("local_dir", args.storage_path or args.local_dir,
                  spec.pop("storage_path", None) or DEFAULT_STORAGE_PATH)
    spec["storage_path"] = resolve_storage_path(str(root))
    spec["num_samples"] = option("num_samples", args.num_samples, 1)
    if args.restore:
        if is_storage_uri(args.restore):
            # Tune takes --restore as a local path and would join the URI to the
            # working directory.
            raise ValueError(
                f"--restore {args.restore}: give a checkpoint directory on a file system "
                "the trial's node can read (copy a checkpoint down from cloud storage "
                "first), or continue an experiment kept at a URI with --resume and the "
                "same --storage-path and --experiment-name")
        spec["restore"] = args.restore
    return spec


def build_experiments(args: argparse.Namespace) -> dict[str, dict]:
    """The experiments ``flowrl train`` hands to ``tune.run_experiments``, one spec per
    name, from parsed flags (``make_train_parser().parse_args(argv)``): algorithm, env
    and config checked, CLI defaults filled in, and ``storage_path`` resolved (URIs
    unchanged, plain paths absolute). Raises ``ValueError`` on bad input."""
    if args.storage_path and args.local_dir and args.storage_path != args.local_dir:
        raise ValueError(f"--storage-path {args.storage_path} and --local-dir "
                         f"{args.local_dir} name two results roots; --local-dir is the "
                         "earlier name of --storage-path: give one of them")
    if args.ray_address and (args.ray_num_cpus is not None or args.ray_num_gpus is not None):
        raise ValueError("--ray-num-cpus / --ray-num-gpus size a Ray instance started "
                         "here; with --ray-address the cluster's own resources apply "
                         "(set them with `ray start --num-cpus N --num-gpus N`)")
    return {name: _normalize_spec(name, spec, args)
            for name, spec in _experiments_from_args(args).items()}


def _resolve_auto(spec: dict) -> None:
    """Writes the cluster-resolved values of "auto" resource keys into the trial config,
    so they are printed and recorded in params.json."""
    from flowrl.algorithms.config import AUTO_KEYS, COMMON_CONFIG
    from flowrl.algorithms.registry import get_agent_class

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
        experiments = build_experiments(args)
        if args.callbacks and args.local_mode:
            raise ValueError("--callbacks are Tune callbacks; --local-mode runs without "
                             "Tune: leave one of them out")
        user_callbacks = load_callbacks(args.callbacks)
    except (ValueError, FileNotFoundError) as e:
        print(f"flowrl train: error: {e}", file=sys.stderr)
        return 2

    if args.local_mode:
        return _run_local(experiments, args)

    import ray
    from ray import tune

    from flowrl.algorithms.trainable import register_trainables
    register_trainables()  # trials look the algorithms up by name

    if not ray.is_initialized():
        init_args: dict[str, Any] = {"include_dashboard": False}
        # ray.init reads $RAY_ADDRESS too, and then refuses num_cpus / num_gpus.
        address = args.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            init_args["address"] = address
        else:
            init_args["num_cpus"] = args.ray_num_cpus
            init_args["num_gpus"] = (args.ray_num_gpus if args.ray_num_gpus is not None
                                     else _detect_gpus())
        try:
            ray.init(**init_args)
        except ConnectionError as e:
            if not address:
                raise
            print(f"flowrl train: error: {join_error(address, e)}", file=sys.stderr)
            return 2
    _warn_local_storage_on_cluster(experiments)
    for spec in experiments.values():
        _resolve_auto(spec)
    from flowrl.algorithms.trainable import tune_callbacks

    # Our callbacks write result.json, progress.csv and TensorBoard scalars under plain
    # names; Tune's automatic loggers would write a second, "ray/tune/"-prefixed copy.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Tune snapshots the experiment state (which checkpoint each trial has) every 10 s
    # or more; a driver killed in between resumes from an older checkpoint, or from
    # scratch. Every 2 s bounds that loss at the cost of a small JSON write.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    trials: list[tuple[Any, str]] = []  # (trial, its experiment's storage_path)
    # One Tune run per experiment, in file order: Ray 2.x Tune keeps one experiment
    # directory per run, and the files of a second experiment in the same run are lost.
    for name, spec in experiments.items():
        try:
            trials += [(trial, spec["storage_path"]) for trial in tune.run_experiments(
                {name: spec}, resume=args.resume or None, verbose=min(args.verbose, 2),
                raise_on_failed_trial=False,
                callbacks=tune_callbacks(progress=True) + user_callbacks())]
        except ValueError as e:  # e.g. a resource request the cluster can never meet
            print(f"flowrl train: error: {e}", file=sys.stderr)
            return 2
    return _report(trials)


def join_error(address: str, error: BaseException) -> str:
    """One line saying why joining the Ray cluster at ``address`` failed.

    A cluster that ``ray start`` began with token authentication (Ray's default when a
    token exists on that machine) turns away a driver without the token, and Ray sends
    none to an address given explicitly unless ``RAY_AUTH_MODE=token``: say so.
    """
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = f"cannot join the Ray cluster at {address}: {' '.join(str(error).split())}"
    if any("AuthenticationError" in type(c).__name__ or "InvalidAuthToken" in str(c)
           for c in chain):
        text += (". The cluster uses token authentication: set RAY_AUTH_MODE=token "
                 "and give the cluster's token as RAY_AUTH_TOKEN (or in "
                 "~/.ray/auth_token); Ray sends no token to an explicit address "
                 "otherwise")
    return text


def _warn_local_storage_on_cluster(experiments: dict) -> None:
    """On a cluster of several nodes, a plain results folder must be on a shared file
    system: trials on other nodes write their checkpoints to the same path there, and
    Tune fails the first checkpoint of a node that cannot see it."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    local = sorted({spec["storage_path"] for spec in experiments.values()
                    if not is_storage_uri(spec["storage_path"])})
    if nodes > 1 and local:
        print(f"flowrl: the cluster has {nodes} nodes and results go to "
              f"{', '.join(local)}: every node must reach it at that path (a shared file "
              "system such as NFS), or give --storage-path s3://bucket/experiments "
              "(gs://, ...). See docs/cluster.md.", flush=True)


def _stop_reached(stop: dict, result: dict) -> bool:
    from flowrl.algorithms.result_logger import flatten_result
    flat = flatten_result(result)
    return any(key in flat and flat[key] is not None and flat[key] >= value
               for key, value in stop.items())


def _run_local(experiments: dict, args: argparse.Namespace) -> int:
    """``--local-mode``: each experiment runs in this process, one after the other,
    with ``num_workers=0`` (and ``evaluation_num_workers=0``) and no Tune, so
    breakpoints and profilers see everything.

    (Ray removed its own local mode; this is the debugging path it used to provide.)
    The trial directory, result files and checkpoints are the same as under Tune.
    """
    import datetime

    from flowrl.algorithms.registry import get_agent_class
    from flowrl.algorithms.result_logger import progress_line

    for name, spec in experiments.items():
        config = spec["config"]
        if _first_candidate(config) != config or spec["num_samples"] != 1:
            print(f"flowrl train: error: --local-mode runs one trial per experiment; "
                  f"{name!r} has a search space or num_samples > 1", file=sys.stderr)
            return 2
        folder = local_folder_of(spec["storage_path"])
        if folder is None:
            print(f"flowrl train: error: --local-mode writes results to a local folder, "
                  f"not to {spec['storage_path']}: give a folder or a file:// URI",
                  file=sys.stderr)
            return 2
        # One process: evaluation, if any, runs in it too.
        config = {**config, "num_workers": 0, "evaluation_num_workers": 0}
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        logdir = os.path.join(folder, name,
                              f"{spec['run']}_{config['env']}_{stamp}".replace("/", "_"))
        every = spec["checkpoint_config"]["checkpoint_frequency"]
        keep = spec["checkpoint_config"].get("num_to_keep")
        saved: list[str] = []
        agent = get_agent_class(spec["run"])(config=config, logdir=logdir)
        try:
            if spec.get("restore"):
                agent.restore(spec["restore"])
            print(f"flowrl: {name}: one process, num_workers=0, results in {logdir}",
                  flush=True)
            while True:
                result = agent.train()
                print(progress_line(name, result), flush=True)
                done = bool(spec["stop"]) and _stop_reached(spec["stop"], result)
                if (every and agent.iteration % every == 0) or (
                        done and spec["checkpoint_config"]["checkpoint_at_end"]):
                    saved.append(agent.save())
                    print(f"  checkpoint: {saved[-1]}", flush=True)
                    while keep and len(saved) > keep:  # the newest is never deleted
                        shutil.rmtree(saved.pop(0), ignore_errors=True)
                if done:
                    break
        finally:
            agent.stop()
    return 0


def _location(fs_path: str, storage_path: str) -> str:
    """A path on the experiment's storage written as a URI again: Tune's paths drop the
    scheme (``s3://bucket/exp`` -> ``bucket/exp``; ``hdfs://host/exp`` -> ``/exp``).
    ``fs_path`` lies under ``storage_path``."""
    if local_folder_of(storage_path) is not None:
        return fs_path
    parsed = urlparse(storage_path)
    for root in (parsed.netloc + parsed.path, parsed.path):  # bucket-style, host-style
        root = root.rstrip("/")
        if root and fs_path.startswith(root + "/"):
            return parsed._replace(path=parsed.path.rstrip("/")
                                   + fs_path[len(root):]).geturl()
    return f"{parsed.scheme}://{fs_path}"


def _report(trials: list[tuple[Any, str]]) -> int:
    """Prints where each trial's results are; failed trials with their traceback."""
    failed = [t for t, _ in trials if t.status == "ERROR"]
    for trial, storage_path in trials:
        last = trial.last_result or {}
        print(f"{trial}: {trial.status}, iterations={last.get('training_iteration')}, "
              f"timesteps={last.get('timesteps_total')}, "
              f"episode_reward_mean={last.get('episode_reward_mean')}, "
              f"dir={_location(trial.path, storage_path)}")
        if trial.checkpoint is not None:
            print(f"  last checkpoint: {_location(trial.checkpoint.path, storage_path)}")
    for trial in failed:
        print(f"Trial {trial} failed; error file: {trial.error_file}", file=sys.stderr)
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                print(f.read(), file=sys.stderr)
    return 1 if failed else 0
