"""Evaluating trained agents: scripts/rollout.py and Agent.export_policy (TorchScript)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl import get_agent_class
from flowrl.envs.registry import EnvContext
from flowrl.cli.rollout import load_rollout, make_rollout_parser, rollout_main

# TorchScript is what loads without Python code; torch 2.x marks its API deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLLOUT = os.path.join(ROOT, "scripts", "rollout.py")
REMOTE = {"num_workers": 1, "num_cpus_per_worker": 0.5, "min_iter_time_s": 0}
SMALL = {"fcnet_hiddens": [16]}
SHORT_EPISODES = json.dumps({"env_config": {"max_episode_steps": 40}})
EPISODE_LINE = re.compile(r"Episode (\d+): return (-?[\d.]+), length (\d+)")

# Agents built for export only (no training): tiny nets, Ray only where the algorithm
# needs remote workers. "wild" randomizes the weights so that Box means leave the
# bounds and the export's clipping is exercised.
EXPORT_CASES = {
    "PG": ("PG", "CartPole-v1", {"model": SMALL}),
    "A2C-Pendulum": ("A2C", "Pendulum-v1", {"model": SMALL}),
    "A3C": ("A3C", "CartPole-v1", {**REMOTE, "model": SMALL}),
    "PPO-Pendulum-wild": ("PPO", "Pendulum-v1", {"model": {**SMALL, "free_log_std": True}}),
    "DQN": ("DQN", "CartPole-v1", {"model": SMALL, "hiddens": [16], "buffer_size": 1000}),
    "APEX": ("APEX", "CartPole-v1", {**REMOTE, "num_gpus": 0, "num_replay_buffer_shards": 1,
                                      "buffer_size": 1000, "model": SMALL, "hiddens": [16],
                                      "dueling": False}),
    "DDPG": ("DDPG", "Pendulum-v1", {"actor_hiddens": [16], "critic_hiddens": [16],
                                      "buffer_size": 1000}),
    "APEX_DDPG": ("APEX_DDPG", "Pendulum-v1", {**REMOTE, "num_gpus": 0,
                                                "num_replay_buffer_shards": 1,
                                                "buffer_size": 1000, "actor_hiddens": [16],
                                                "critic_hiddens": [16]}),
    "IMPALA": ("IMPALA", "CartPole-v1", {**REMOTE, "model": SMALL}),
    "ES": ("ES", "CartPole-v1", {"num_workers": 0, "noise_size": 10_000,
                                  "model": {"fcnet_hiddens": [8]}}),
    "ES-Pendulum-wild": ("ES", "Pendulum-v1", {"num_workers": 0, "noise_size": 10_000,
                                                "model": {"fcnet_hiddens": [8]}}),
    "DQN-Pong": ("DQN", "Pong", {"buffer_size": 1000}),
    "PPO-Breakout": ("PPO", "Breakout", {}),
}

# Runs in a fresh interpreter: every export must load and act with torch alone.
NO_FLOWRL_CHECK = r"""
import json, os, sys
import numpy as np
import torch
root = sys.argv[1]
for case in sorted(os.listdir(root)):
    folder = os.path.join(root, case)
    module = torch.jit.load(os.path.join(folder, "policy.pt"))
    obs = np.load(os.path.join(folder, "obs.npy"))
    expected = np.load(os.path.join(folder, "expected.npy"))
    got = module(torch.as_tensor(obs)).numpy()
    assert got.shape == expected.shape and got.dtype == expected.dtype, (case, got.shape)
    if np.issubdtype(got.dtype, np.integer):
        assert np.array_equal(got, expected), (case, got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=case)
    print("OK", case)
assert "flowrl" not in sys.modules, "the export check imported flowrl"
"""


def _real_observations(agent, count: int, seed: int = 0) -> np.ndarray:
    """Observations of a fresh env stepped with random actions."""
    env = agent.env_creator(EnvContext(agent.config["env_config"], worker_index=0))
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(count):
        rows.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return np.stack(rows)


def _greedy(agent, obs: np.ndarray) -> np.ndarray:
    """``compute_action(explore=False)`` per row, clipped to Box bounds as the sampler
    clips before stepping the env."""
    actions = np.stack([np.asarray(agent.compute_action(o, explore=False)) for o in obs])
    space = agent.get_policy().action_space
    if isinstance(space, gym.spaces.Box):
        actions = np.clip(actions, space.low, space.high).astype(np.float32)
    return actions


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per case: the export directory, a checkpoint, observations and greedy actions
    (built on first use, so any test may ask for any case)."""
    return {"root": tmp_path_factory.mktemp("exports"),
            "ckpts": tmp_path_factory.mktemp("export_ckpts"), "cases": {}}


def _export_case(case: str, exports: dict, request) -> dict:
    if case in exports["cases"]:
        return exports["cases"][case]
    algorithm, env, config = EXPORT_CASES[case]
    if config.get("num_workers", 0) > 0:
        request.getfixturevalue("ray_session")
    agent = get_agent_class(algorithm)(config={**config, "seed": 0}, env=env,
                                       log_to_disk=False)
    try:
        policy = agent.get_policy()
        obs = _real_observations(agent, 12)
        if algorithm == "ES":  # non-trivial filter statistics
            policy.filter.record(obs * 3.0 + 1.0)
            policy.filter.merge_buffer(policy.filter.pop_buffer())
        if case.endswith("-wild"):
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in policy.model.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 2.0)
        expected = _greedy(agent, obs)
        folder = exports["root"] / case
        path = agent.export_policy(str(folder))
        np.save(folder / "obs.npy", obs)
        np.save(folder / "expected.npy", expected)
        ckpt = agent.save(str(exports["ckpts"] / case))
    finally:
        agent.stop()
    info = {"path": path, "obs": obs, "expected": expected, "ckpt": ckpt,
            "algorithm": algorithm, "env": env}
    exports["cases"][case] = info
    return info


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_gives_the_greedy_actions(case, exports, request, capsys):
    info = _export_case(case, exports, request)
    module = torch.jit.load(info["path"])
    for rows in (slice(None), slice(0, 1), slice(2, 7)):  # the batch size is dynamic
        got = module(torch.as_tensor(info["obs"][rows])).numpy()
        expected = info["expected"][rows]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if got.dtype == np.int64:
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if case.endswith("-wild"):  # some actions were clipped to the bounds
        assert np.any(np.isclose(np.abs(info["expected"]), 2.0))
    meta = json.load(open(os.path.join(os.path.dirname(info["path"]), "policy.json")))
    assert meta["algorithm"] == info["algorithm"] and meta["env"] == info["env"]
    assert meta["observation_space"]["shape"] == list(info["obs"].shape[1:])
    assert meta["observation_space"]["dtype"] == info["obs"].dtype.name
    assert meta["action_space"]["type"] in ("Discrete", "Box")

    # rollout.py's policy (rebuilt from the checkpoint alone) acts the same way.
    setup = load_rollout(info["ckpt"], render=False)
    try:
        actions, _ = setup.policy.compute_actions(info["obs"], explore=False)
        if actions.dtype == np.int64:
            np.testing.assert_array_equal(actions, info["expected"])
        else:
            space = setup.env.action_space
            np.testing.assert_allclose(np.clip(actions, space.low, space.high),
                                       info["expected"], rtol=1e-5, atol=1e-5)
    finally:
        setup.env.close()
    assert rollout_main([info["ckpt"], "--run", info["algorithm"], "--steps", "5",
                         "--no-render"]) == 0
    assert "Episode 1:" in capsys.readouterr().out


def test_exports_load_and_act_without_flowrl(exports, request, tmp_path):
    for case in EXPORT_CASES:
        _export_case(case, exports, request)
    out = subprocess.run([sys.executable, "-c", NO_FLOWRL_CHECK, str(exports["root"])],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("OK ") == len(EXPORT_CASES)


@pytest.fixture(scope="module")
def cartpole_checkpoint(tmp_path_factory):
    """A PPO agent trained for two tiny iterations on CartPole, saved."""
    root = tmp_path_factory.mktemp("cartpole")
    config = {"train_batch_size": 128, "sgd_minibatch_size": 64, "num_sgd_iter": 1,
              "rollout_fragment_length": 64, "model": {"fcnet_hiddens": [32]}, "seed": 0}
    agent = get_agent_class("PPO")(config=config, env="CartPole-v1",
                                   logdir=str(root / "log"))
    try:
        for _ in range(2):
            agent.train()
        path = agent.save(str(root / "checkpoint_000002"))
    finally:
        agent.stop()
    return path


def _episode_lines(text: str) -> list[tuple[int, float, int]]:
    return [(int(n), float(r), int(length)) for n, r, length in EPISODE_LINE.findall(text)]


def test_rollout_script_videos_episodes_and_export(cartpole_checkpoint, tmp_path):
    videos, out_file = tmp_path / "videos", tmp_path / "episodes.npz"
    result = subprocess.run(
        [sys.executable, ROLLOUT, cartpole_checkpoint, "--run", "PPO", "--env",
         "CartPole-v1", "--episodes", "2", "--no-render", "--video-dir", str(videos),
         "--out", str(out_file), "--config", SHORT_EPISODES],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    episodes = _episode_lines(result.stdout)
    assert [n for n, _, _ in episodes] == [1, 2]
    assert all(0 < length <= 40 and r == length for _, r, length in episodes)  # CartPole
    mean = float(re.search(r"Mean return: (-?[\d.]+)", result.stdout).group(1))
    assert mean == pytest.approx(np.mean([r for _, r, _ in episodes]), abs=0.01)

    files = sorted(videos.glob("*.mp4"))
    assert len(files) == 2
    from moviepy import VideoFileClip
    for file, (_, _, length) in zip(files, episodes):
        data = file.read_bytes()
        assert len(data) > 1000 and data[4:8] == b"ftyp"
        clip = VideoFileClip(str(file))
        frames = sum(1 for _ in clip.iter_frames())
        clip.close()
        assert abs(frames - (length + 1)) <= 1  # the reset frame plus one per step

    saved = np.load(out_file)  # no pickled objects (allow_pickle is off by default)
    lengths = saved["episode_lengths"]
    assert list(lengths) == [length for _, _, length in episodes]
    assert saved["obs"].shape == (lengths.sum(), 4) and saved["obs"].dtype == np.float32
    assert saved["actions"].shape == (lengths.sum(),)
    per_episode = np.split(saved["rewards"], np.cumsum(lengths)[:-1])
    np.testing.assert_allclose([r.sum() for r in per_episode], [r for _, r, _ in episodes])
    assert saved["episode_finished"].all() and str(saved["algorithm"]) == "PPO"

    # The export of the same agent acts like it on the rollout's real observations,
    # in a process that never imports flowrl.
    from flowrl import Agent
    agent = Agent.from_checkpoint(cartpole_checkpoint, log_to_disk=False)
    try:
        folder = tmp_path / "export" / "PPO-CartPole"
        agent.export_policy(str(folder))
        obs = saved["obs"]
        np.save(folder / "obs.npy", obs)
        np.save(folder / "expected.npy", _greedy(agent, obs))
        np.testing.assert_array_equal(np.load(folder / "expected.npy"), saved["actions"])
    finally:
        agent.stop()
    out = subprocess.run([sys.executable, "-c", NO_FLOWRL_CHECK, str(tmp_path / "export")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def test_rollout_tune_trial_layout(cartpole_checkpoint, tmp_path, capsys):
    """Tune trials: params.json (the user's config only) in the trial directory, one
    folder up from checkpoint_<n>/."""
    trial = tmp_path / "PPO_CartPole-v1_0"
    checkpoint = trial / "checkpoint_000002"
    shutil.copytree(cartpole_checkpoint, checkpoint)
    os.remove(checkpoint / "params.json")
    (trial / "params.json").write_text(json.dumps(
        {"env": "CartPole-v1", "model": {"fcnet_hiddens": [32]}, "seed": 0}))
    assert rollout_main([str(checkpoint), "--episodes", "1", "--no-render",
                         "--config", SHORT_EPISODES]) == 0
    assert len(_episode_lines(capsys.readouterr().out)) == 1
    # The trial directory itself: its latest checkpoint.
    shutil.copytree(checkpoint, trial / "checkpoint_000001")
    assert rollout_main([str(trial), "--steps", "7", "--no-render"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint_000002" in text and sum(length for *_, length in
                                               _episode_lines(text)) == 7


def test_rollout_atari_checkpoint(exports, request, capsys):
    info = _export_case("DQN-Pong", exports, request)
    assert rollout_main([info["ckpt"], "--steps", "50", "--no-render"]) == 0
    episodes = _episode_lines(capsys.readouterr().out)
    assert sum(length for *_, length in episodes) == 50
    setup = load_rollout(info["ckpt"], render=False)
    try:
        # Evaluation env: whole games with true scores (no life loss, no reward clipping).
        env, names = setup.env, []
        while isinstance(env, gym.Wrapper):
            names.append(type(env).__name__)
            env = env.env
        assert "SignReward" not in names and "EpisodicLife" not in names
        assert setup.env.observation_space.shape == (84, 84, 4)
    finally:
        setup.env.close()


def test_rollout_bad_input_is_one_error_line(cartpole_checkpoint, tmp_path, capsys):
    missing = subprocess.run([sys.executable, ROLLOUT, str(tmp_path / "nope"), "--no-render"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]

    cases = {
        ("--run", "DQN"): "written by PPO",
        ("--run", "PPPO"): "Unknown algorithm",
        ("--config", "{not json"): "JSON",
        ("--config", "[1, 2]"): "JSON object",
        ("--config", '{"lrr": 0.1}'): "lrr",
        ("--steps", "0"): "--steps",
    }
    for extra, message in cases.items():
        assert rollout_main([cartpole_checkpoint, "--no-render", *extra]) == 2, extra
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rollout.py: error:"), captured.err
        assert message in lines[0], lines[0]
        assert "Episode" not in captured.out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rollout_main([str(empty), "--no-render"]) == 2
    assert "not a flowrl checkpoint" in capsys.readouterr().err


def test_rollout_without_display_notes_it_and_runs(cartpole_checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert rollout_main([cartpole_checkpoint, "--steps", "20", "--explore"]) == 0
    text = capsys.readouterr().out
    assert "No display found" in text and "(exploring)" in text
    assert sum(length for *_, length in _episode_lines(text)) == 20


def test_rollout_help_documents_every_flag():
    text = make_rollout_parser().format_help()
    for flag in ("--run", "--env", "--steps", "--episodes", "--no-render", "--video-dir",
                 "--out", "--config", "--explore", "examples:", "episode_lengths"):
        assert flag in text
