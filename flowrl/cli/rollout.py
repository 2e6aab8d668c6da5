"""Run a trained policy from a checkpoint: ``python scripts/rollout.py CHECKPOINT ...``.

    python scripts/rollout.py ~/ray_results/PPO/PPO_CartPole-v1_0/checkpoint_000010 \\
        --episodes 5 --video-dir videos/ --out episodes.npz

Only the policy is rebuilt (no Ray, no remote workers, no replay actors): the env from
``config["env"]``, the algorithm's policy class with the stored config, and the
policy's weights from the checkpoint. Atari short names (``"Pong"``) run with
``training=False``: unclipped rewards and whole games, so the printed returns are
game scores. A recurrent policy (``model.use_lstm``) carries its state, previous action
and reward from step to step, from the initial state at each episode's start, as in
training. See ``--help`` for every option and the ``--out`` file format.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROLLOUT_EXAMPLES = """examples:
  python scripts/rollout.py ~/ray_results/PPO/PPO_CartPole-v1_0/checkpoint_000010
  python scripts/rollout.py CHECKPOINT --run DQN --env Pong --steps 2000 --no-render
  python scripts/rollout.py CHECKPOINT --episodes 3 --video-dir videos/ --out episodes.npz
  python scripts/rollout.py CHECKPOINT --config '{"env_config": {"max_episode_steps": 200}}'
  python scripts/rollout.py CHECKPOINT --episodes 3 --seed 7 --out episodes.npz

CHECKPOINT is a directory written by Agent.save() or a Tune trial (checkpoint_<n>/);
a trial directory picks its latest checkpoint. The config comes from params.json in the
checkpoint, or next to it, or one folder up.

--out FILE is a NumPy .npz archive (no pickled objects: np.load(FILE) reads it) with
all episodes' steps concatenated in order:
  obs               [N, *obs_shape]   observation each action was taken in
  actions           [N, *act_shape]   action sent to the env
                    (Dict / Tuple spaces: [N] structured records, one field per key
                    or index, e.g. obs["image"]; parts without an array form, such
                    as Text, are left out)
  rewards           [N] float64
  terminateds       [N] bool          truncateds [N] bool
  episode_lengths   [E] int64         split the step arrays with
                                      np.split(a, np.cumsum(episode_lengths)[:-1])
  episode_returns   [E] float64       episode_finished [E] bool (False: cut by --steps)
  algorithm, env    0-d strings
"""

_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")


class RolloutError(Exception):
    """Bad input to the rollout (printed as one error line, exit code 2)."""


# --------------------------------------------------------------------------- arguments


def make_rollout_parser() -> argparse.ArgumentParser:
    """The argument parser of ``scripts/rollout.py``."""
    p = argparse.ArgumentParser(
        prog="rollout.py", description="Run a trained flowrl policy from a checkpoint and "
        "print each episode's return.", epilog=ROLLOUT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint directory (from Agent.save() or a Tune trial)")
    p.add_argument("--run", metavar="ALGO", help="algorithm (PPO, DQN, ...); optional: the checkpoint names "
                   "it, and a different one is an error")
    p.add_argument("--env", metavar="ENV", help="env to run in (default: the checkpoint's env)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="stop after this many env steps in total")
    p.add_argument("--episodes", type=int, default=None, metavar="N",
                   help="stop after this many episodes (default: 10 when --steps is not "
                   "given; with both, whichever limit comes first)")
    p.add_argument("--no-render", action="store_true",
                   help="do not render to the screen (default: render when a display exists)")
    p.add_argument("--video-dir", default=None, metavar="DIR",
                   help="record one mp4 per episode into this directory "
                   "(episode_000000.mp4 is the first)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="save the episodes (obs, actions, rewards) to this .npz file")
    p.add_argument("--config", default="{}", metavar="JSON",
                   help="config overrides as a JSON object, merged over the stored config")
    p.add_argument("--explore", action="store_true",
                   help="act with exploration (default: greedy / deterministic actions)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="reset episode i (from 0) with seed N + i, so that the episodes "
                   "can be replayed (default: unseeded)")
    return p


def _parse_overrides(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RolloutError(f"--config must be a JSON object: {e} in {text!r}") from e
    if not isinstance(value, dict):
        raise RolloutError(f"--config must be a JSON object, got {text!r}")
    return value


# ------------------------------------------------------------------------ checkpoints


def resolve_checkpoint(path: str) -> str:
    """The checkpoint directory for ``path``: a checkpoint, its manifest, or a trial
    directory (its highest-numbered ``checkpoint_<n>``)."""
    from flowrl.algorithms.checkpoint import MANIFEST_FILE, find_checkpoint_dir
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full) and not os.path.isfile(os.path.join(full, MANIFEST_FILE)):
        found = []
        for name in os.listdir(full):
            match = _CHECKPOINT_DIR.match(name)
            if match and os.path.isfile(os.path.join(full, name, MANIFEST_FILE)):
                found.append((int(match.group(1)), name))
        if found:
            return os.path.join(full, max(found)[1])
    return find_checkpoint_dir(full)


def find_params(checkpoint_dir: str) -> str:
    """``params.json`` in the checkpoint, next to it, or one folder up (Tune trials)."""
    from flowrl.algorithms.checkpoint import PARAMS_FILE
    parent = os.path.dirname(checkpoint_dir)
    for folder in (checkpoint_dir, parent, os.path.dirname(parent)):
        candidate = os.path.join(folder, PARAMS_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise RolloutError(f"No {PARAMS_FILE} found in {checkpoint_dir!r}, next to it or one "
                       "folder up: the config the policy was trained with is needed.")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise RolloutError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(value, dict):
        raise RolloutError(f"{path} does not hold a JSON object.")
    return {k: v for k, v in value.items() if not k.startswith("__")}  # Tune bookkeeping


# --------------------------------------------------------------------------- the setup


@dataclass
class RolloutSetup:
    """Everything :func:`run_rollout` needs, built by :func:`load_rollout`."""

    algorithm: str
    env_name: Any
    config: dict
    env: Any
    policy: Any
    checkpoint: str
    render_mode: str | None = None  # what the env renders: "human", "rgb_array" or None
    render_note: str | None = None


def _display_available() -> bool:
    if sys.platform.startswith(("win", "darwin")):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _make_env(creator: Any, env_config: dict, render_mode: str | None) -> tuple[Any, bool]:
    """``(env, rendering)``: the env with ``render_mode`` if it accepts it, else without."""
    from flowrl.envs.registry import EnvContext
    if render_mode is not None:
        try:
            env = creator(EnvContext({**env_config, "render_mode": render_mode},
                                     worker_index=0))
            if getattr(env, "render_mode", None) == render_mode:
                return env, True
            env.close()
        except Exception:  # noqa: BLE001  envs that take no render_mode: run without
            pass
    return creator(EnvContext(env_config, worker_index=0)), False


def _load_policy(agent_cls: type, config: dict, env: Any, checkpoint: str,
                 manifest: dict) -> Any:
    """The algorithm's policy for ``env``'s spaces with the checkpoint's state."""
    from flowrl.algorithms.checkpoint import read_policy_states
    from flowrl.data.sample_batch import DEFAULT_POLICY_ID

    # As RolloutWorker builds the local worker's policy: index 0.
    policy_config = {**config, "worker_index": 0, "num_workers": 0}
    policy_cls = agent_cls.get_policy_class(config)
    policy = policy_cls(env.observation_space, env.action_space, policy_config)
    states = read_policy_states(checkpoint, manifest)
    if DEFAULT_POLICY_ID not in states:
        raise RolloutError(f"{checkpoint!r} holds no policy {DEFAULT_POLICY_ID!r} "
                           f"(it has {sorted(states)}).")
    try:
        policy.set_state(states[DEFAULT_POLICY_ID])
    except (RuntimeError, KeyError, ValueError) as e:
        raise RolloutError(f"The checkpoint's policy does not fit env {config['env']!r} "
                           f"(observation space {env.observation_space}, action space "
                           f"{env.action_space}): {e}") from e
    return policy


def load_rollout(checkpoint: str, run: str | None = None, env: str | None = None,
                 overrides: dict | None = None, render: bool = False,
                 record_video: bool = False) -> RolloutSetup:
    """Builds the env and the checkpoint's policy (weights loaded), nothing else.

    Raises :class:`RolloutError` (or ``ValueError`` / ``FileNotFoundError``) with a
    message fit for one error line when the input is wrong.
    """
    from flowrl.algorithms.checkpoint import read_manifest
    from flowrl.algorithms.config import COMMON_CONFIG, merge_config
    from flowrl.envs.atari import AtariCreator
    from flowrl.envs.registry import make_env_creator
    from flowrl.algorithms.registry import get_agent_class

    checkpoint = resolve_checkpoint(checkpoint)
    manifest = read_manifest(checkpoint)
    algorithm = manifest.get("algorithm")
    if run is not None:
        get_agent_class(run)  # an unknown name fails with the known ones listed
        if algorithm is not None and run != algorithm:
            raise RolloutError(f"--run {run} does not match the checkpoint: {checkpoint!r} "
                               f"was written by {algorithm}.")
        algorithm = algorithm or run
    if algorithm is None:
        raise RolloutError(f"{checkpoint!r} does not name its algorithm: pass --run.")
    agent_cls = get_agent_class(algorithm)

    params = _read_json(find_params(checkpoint))
    overrides = dict(overrides or {})
    base = merge_config(COMMON_CONFIG, agent_cls._default_config)
    # The stored config was validated when training started; the overrides are new.
    merge_config(base, overrides, check_keys=True)
    config = merge_config(merge_config(base, params), overrides)
    env_name = env if env is not None else config.get("env") or manifest.get("env")
    if env_name is None:
        raise RolloutError("The checkpoint's config names no env: pass --env.")
    config["env"] = env_name
    creator = make_env_creator(env_name)

    env_config = dict(config.get("env_config") or {})
    if isinstance(getattr(creator, "creator", None), AtariCreator) and \
            "training" not in (overrides.get("env_config") or {}):
        env_config["training"] = False  # unclipped rewards, whole games (all lives)
    render_note = None
    display = _display_available()
    if render and not display:
        render_note = ("No display found: running without rendering "
                       "(pass --no-render to silence this note).")
    elif render and record_video:
        render_note = "Rendering to the screen is off while recording videos."
    render_mode = "rgb_array" if record_video else ("human" if render and display else None)
    if render_mode == "rgb_array" and not display:
        # pygame-drawn frames (classic control) need no window; without this SDL looks
        # for a display and prints an error line.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env_obj, rendering = _make_env(creator, env_config, render_mode)
    if render_mode is not None and not rendering:
        what = "record videos" if record_video else "render to the screen"
        render_note = f"The env does not support render_mode={render_mode!r}: cannot {what}."

    try:
        policy = _load_policy(agent_cls, config, env_obj, checkpoint, manifest)
    except BaseException:
        env_obj.close()
        raise
    return RolloutSetup(algorithm, env_name, config, env_obj, policy, checkpoint,
                        render_mode if rendering else None, render_note)


# ------------------------------------------------------------------------- the rollout


@dataclass
class Episode:
    """One episode's steps (``finished=False`` when ``--steps`` cut it)."""

    obs: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    terminateds: list = field(default_factory=list)
    truncateds: list = field(default_factory=list)
    finished: bool = False

    @property
    def total_reward(self) -> float:
        return float(np.sum(self.rewards)) if self.rewards else 0.0

    @property
    def length(self) -> int:
        return len(self.rewards)


def _replace_atomically(path: str, write: Any) -> None:
    """``write(tmp_path)``, then rename the temporary sibling onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _video_fps(env: Any) -> float | None:
    """Real-time speed for Atari (60 emulator frames/s, ``frame_skip`` per step); None
    (the env's ``render_fps``) for other envs."""
    from flowrl.envs.atari import AtariFrames
    inner = env
    while inner is not None:
        if isinstance(inner, AtariFrames):
            return 60.0 / inner.frame_skip
        inner = getattr(inner, "env", None)
    return None


def save_episodes(path: str, episodes: list[Episode], algorithm: str, env_name: Any) -> None:
    """Writes the ``--out`` .npz archive (format in ``--help``), atomically."""
    steps = [e for e in episodes if e.length]

    def stacked(column: str, dtype: Any = None) -> np.ndarray:
        rows = [np.asarray(x) for e in steps for x in getattr(e, column)]
        if not rows:
            return np.zeros(0, dtype=dtype or np.float64)
        return np.stack(rows).astype(dtype) if dtype else np.stack(rows)

    arrays = {
        "obs": stacked("obs"), "actions": stacked("actions"),
        "rewards": stacked("rewards", np.float64),
        "terminateds": stacked("terminateds", bool), "truncateds": stacked("truncateds", bool),
        "episode_lengths": np.array([e.length for e in episodes], dtype=np.int64),
        "episode_returns": np.array([e.total_reward for e in episodes], dtype=np.float64),
        "episode_finished": np.array([e.finished for e in episodes], dtype=bool),
        "algorithm": np.array(str(algorithm)), "env": np.array(str(env_name)),
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy adds no ".npz" to the name
            np.savez_compressed(f, **arrays)

    _replace_atomically(path, write)


def _clip_box_parts(space: Any, action: Any) -> Any:
    """``action`` of a Dict / Tuple ``space`` with its Box parts clipped to their bounds."""
    import gymnasium as gym
    if isinstance(space, gym.spaces.Dict):
        return {key: _clip_box_parts(sub, action[key]) for key, sub in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(_clip_box_parts(sub, part) for sub, part in zip(space.spaces, action))
    if isinstance(space, gym.spaces.Box):
        return np.clip(action, space.low, space.high)
    return action


def _step_row(packer: Any, value: Any) -> Any:
    """One step's value as kept for ``--out``: a record for a Dict / Tuple space (so
    that the steps stack into a record array), else a copied array."""
    return packer.pack_one(value)[0] if packer.nested else np.array(value, copy=True)


def run_rollout(setup: RolloutSetup, steps: int | None = None, episodes: int | None = None,
                explore: bool = False, video_dir: str | None = None,
                keep_steps: bool = False, log: Any = print,
                seed: int | None = None) -> list[Episode]:
    """Runs the policy until ``steps`` env steps or ``episodes`` episodes (whichever
    comes first; 10 episodes when both are None); prints each episode's return.

    A recurrent policy's state (and previous action / reward, when its model uses
    them) is carried step by step and reset at each episode's start (and at an Atari
    lost life, as in training). With ``seed``, episode ``i`` (from 0) is reset with
    ``seed + i``.

    Box actions (and Box parts of Dict / Tuple actions) are clipped to the bounds when
    ``clip_actions`` is on, as in training. Observations of any space the policy takes
    (Dict / Tuple, masked observations) are passed to it as the env returns them.
    With ``video_dir`` (and an env rendering ``rgb_array``) each episode is recorded
    to ``episode_<n>.mp4`` (n from 0) by wrapping ``setup.env`` in an
    :class:`~flowrl.envs.video.EpisodeVideoRecorder`; close ``setup.env`` afterwards.
    Returns the episodes (their steps only with ``keep_steps``).
    """
    from flowrl.algorithms.agent import EpisodeActor, compute_policy_action
    from flowrl.data.spaces import ObservationPacker, is_nested
    from flowrl.envs.episodes import EpisodeRunner, EpisodeStep

    if steps is None and episodes is None:
        episodes = 10
    if video_dir and setup.render_mode == "rgb_array":
        from flowrl.envs.video import EpisodeVideoRecorder
        # Replaces setup.env: closing it finishes a video whose episode was cut.
        setup.env = EpisodeVideoRecorder(setup.env, video_dir, episode_trigger=lambda i: True,
                                         name_prefix="episode", fps=_video_fps(setup.env))
    policy = setup.policy
    clip = bool(setup.config.get("clip_actions", True))
    runner = EpisodeRunner(setup.env, clip_actions=clip)
    action_space = setup.env.action_space
    # Steps kept for --out: nested values as records, which stack without object arrays.
    obs_packer = ObservationPacker(setup.env.observation_space)
    action_packer = ObservationPacker(action_space)

    actor = EpisodeActor(functools.partial(compute_policy_action, policy), policy.recurrent,
                         explore)

    def act(obs: Any) -> Any:
        action = actor(obs)
        if clip and is_nested(action_space):  # the runner clips plain Box actions only
            action = _clip_box_parts(action_space, action)
        return action
    done_episodes: list[Episode] = []
    total_steps = 0

    def limit_reached() -> bool:
        return ((steps is not None and total_steps >= steps)
                or (episodes is not None and len(done_episodes) >= episodes))

    while not limit_reached():
        episode = Episode()

        def record(step: EpisodeStep, episode: Episode = episode) -> None:
            actor.observe(step)
            if keep_steps:
                episode.obs.append(_step_row(obs_packer, step.obs))
                episode.actions.append(_step_row(action_packer, step.env_action))
                episode.terminateds.append(step.terminated)
                episode.truncateds.append(step.truncated)
            episode.rewards.append(step.reward)

        actor.reset()
        result = runner.run(act, max_steps=None if steps is None else steps - total_steps,
                            seed=None if seed is None else seed + len(done_episodes),
                            on_step=record)
        total_steps += result.num_steps
        episode.finished = result.finished
        done_episodes.append(episode)
        number = len(done_episodes)
        cut = "" if episode.finished else " (cut by --steps)"
        log(f"Episode {number}: return {episode.total_reward:.2f}, length "
            f"{episode.length}{cut}")
    return done_episodes


def _summary(episodes: list[Episode]) -> str:
    finished = [e for e in episodes if e.finished]
    if finished:
        mean = float(np.mean([e.total_reward for e in finished]))
        return f"Mean return: {mean:.2f} over {len(finished)} finished episodes"
    if episodes:
        mean = float(np.mean([e.total_reward for e in episodes]))
        return f"Mean return: {mean:.2f} (no episode finished within --steps)"
    return "Mean return: n/a (no steps run)"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__


def rollout_main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/rollout.py``; returns the exit code (2 on bad input)."""
    args = make_rollout_parser().parse_args(argv)
    prog = "rollout.py"
    try:
        if args.steps is not None and args.steps < 1:
            raise RolloutError(f"--steps must be >= 1, got {args.steps}")
        if args.episodes is not None and args.episodes < 1:
            raise RolloutError(f"--episodes must be >= 1, got {args.episodes}")
        overrides = _parse_overrides(args.config)
        setup = load_rollout(args.checkpoint, run=args.run, env=args.env,
                             overrides=overrides, render=not args.no_render,
                             record_video=args.video_dir is not None)
    except (RolloutError, ValueError, FileNotFoundError, NotADirectoryError,
            ImportError) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if setup.render_note:
        print(setup.render_note)
    print(f"Running {setup.algorithm} from {setup.checkpoint} in {setup.env_name} "
          f"({'exploring' if args.explore else 'greedy'})", flush=True)
    try:
        episodes = run_rollout(setup, steps=args.steps, episodes=args.episodes,
                               explore=args.explore, video_dir=args.video_dir,
                               keep_steps=args.out is not None,
                               log=lambda line: print(line, flush=True), seed=args.seed)
    except KeyboardInterrupt:  # the usual way to end a long on-screen rollout
        print("Interrupted.", file=sys.stderr)
        return 130
    finally:
        setup.env.close()
    print(_summary(episodes))
    if args.out:
        save_episodes(args.out, episodes, setup.algorithm, setup.env_name)
        print(f"Episodes saved to {args.out}")
    videos = getattr(setup.env, "videos", None)
    if videos is not None:
        print(f"{len(videos)} video{'' if len(videos) == 1 else 's'} in {args.video_dir}")
    return 0
