"""ONNX export (``agent.export_policy(dir, format="onnx")``): for every algorithm that
exports, after one tiny training iteration, onnxruntime gives the greedy actions of
``agent.compute_action(obs, explore=False)`` on 100 real observations; also Box,
MultiDiscrete, Tuple / Dict actions, nested and masked observations, images, the
observation filter, recurrent policies (state in, state out), the metadata, loading
without flowrl or torch, the missing-extra error and the export's own check."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

onnxruntime = pytest.importorskip(
    "onnxruntime", reason="ONNX export needs the onnx extra: pip install 'flowrl[onnx]'")
onnx = pytest.importorskip("onnx")

import spaces_envs  # noqa: E402
from test_all_algorithms import TINY  # noqa: E402  one-iteration configs of every algorithm

from flowrl import get_agent_class  # noqa: E402
from flowrl.data.actions import ActionLayout  # noqa: E402
from flowrl.data.spaces import leaf_paths  # noqa: E402
from flowrl.envs.registry import EnvContext  # noqa: E402
from flowrl.policies.export import LeafInputs  # noqa: E402
from flowrl.policies.onnx_export import ONNX_OPSET, to_onnx  # noqa: E402

NUM_OBS = 100
REMOTE = {"num_workers": 1, "num_cpus_per_worker": 0.5, "min_iter_time_s": 0}
PPO_TINY = {"train_batch_size": 128, "sgd_minibatch_size": 64, "num_sgd_iter": 1,
            "rollout_fragment_length": 64, "model": {"fcnet_hiddens": [32]}}
DQN_TINY = {"learning_starts": 50, "timesteps_per_iteration": 100, "train_batch_size": 16,
            "buffer_size": 1000, "rollout_fragment_length": 50,
            "model": {"fcnet_hiddens": [32]}, "hiddens": [32]}
DDPG_TINY = {"learning_starts": 50, "timesteps_per_iteration": 100, "train_batch_size": 16,
             "buffer_size": 1000, "actor_hiddens": [32], "critic_hiddens": [32]}
ES_TINY = {**REMOTE, "episodes_per_batch": 4, "train_batch_size": 100,
           "noise_size": 1_000_000, "model": {"fcnet_hiddens": [8]}}
LSTM = {"use_lstm": True, "lstm_cell_size": 16, "fcnet_hiddens": [16],
        "lstm_use_prev_action": True, "lstm_use_prev_reward": True}

# Every registered algorithm with its one-iteration config from test_all_algorithms
# (which checks that TINY names them all), then the spaces and model features.
CASES: dict[str, tuple[str, Any, dict]] = {
    name: (name, env, config) for name, (env, config) in TINY.items()}
CASES.update({
    "A2C-box-filter": ("A2C", "Pendulum-v1", {"train_batch_size": 160,
                                              "observation_filter": "MeanStdFilter"}),
    "PPO-multidiscrete": ("PPO", spaces_envs.TwoDialsEnv, PPO_TINY),
    "PPO-tuple-obs-dict-actions": ("PPO", spaces_envs.MixedActionEnv, PPO_TINY),
    "IMPALA-dict-obs": ("IMPALA", spaces_envs.CueEnv, {**REMOTE, "train_batch_size": 100,
                                                      "timesteps_per_iteration": 100}),
    "PPO-masked": ("PPO", spaces_envs.MaskedGreedEnv, PPO_TINY),
    "DQN-masked": ("DQN", spaces_envs.MaskedGreedEnv, DQN_TINY),
    "PPO-image": ("PPO", spaces_envs.ImageGoalEnv, {**PPO_TINY, "model": {},
                                                   "env_config": {"shape": (3, 8, 8),
                                                                  "channels_first": True}}),
    "DDPG-dict-obs": ("DDPG", spaces_envs.DictPendulum, DDPG_TINY),
    "DDPG-filter": ("DDPG", "Pendulum-v1", {**DDPG_TINY, "observation_filter": "MeanStdFilter"}),
    "ES-box": ("ES", "Pendulum-v1", ES_TINY),
    "ES-multidiscrete": ("ES", spaces_envs.TwoDialsEnv, ES_TINY),
})
RECURRENT_CASES: dict[str, tuple[str, Any, dict]] = {
    "PPO-lstm": ("PPO", spaces_envs.StatelessCartPole, {**PPO_TINY, "model": LSTM}),
    "A2C-lstm-box": ("A2C", "Pendulum-v1", {"train_batch_size": 160, "model": LSTM}),
    "PG-lstm-dict-obs": ("PG", spaces_envs.CueEnv, {"train_batch_size": 200,
                                                    "model": {**LSTM,
                                                              "lstm_use_prev_reward": False}}),
}

# Runs in a fresh interpreter: the exports act with onnxruntime alone.
NO_TORCH_CHECK = r"""
import os, sys
import numpy as np
import onnxruntime
root = sys.argv[1]
for case in sorted(os.listdir(root)):
    folder = os.path.join(root, case)
    session = onnxruntime.InferenceSession(os.path.join(folder, "policy.onnx"))
    feeds = dict(np.load(os.path.join(folder, "feeds.npz")))
    expected = np.load(os.path.join(folder, "expected.npy"))
    (got,) = session.run(None, feeds)
    assert got.shape == expected.shape, (case, got.shape, expected.shape)
    if np.issubdtype(got.dtype, np.integer):
        assert np.array_equal(got, expected), case
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=case)
    print("OK", case)
assert "torch" not in sys.modules and "flowrl" not in sys.modules
"""


def _make(algorithm: str, env: Any, config: dict, request) -> Any:
    if config.get("num_workers", 0) > 0:
        request.getfixturevalue("ray_session")
    return get_agent_class(algorithm)(config={**config, "seed": 0}, env=env,
                                      log_to_disk=False)


def _env(agent) -> gym.Env:
    return agent.env_creator(EnvContext(agent.config["env_config"], worker_index=0))


def _real_observations(agent, count: int, seed: int = 0) -> list[Any]:
    """Observations of a fresh env stepped with random actions."""
    env = _env(agent)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(count):
        rows.append(obs)
        # A masked env raises on an illegal action: sample a legal one.
        mask = obs.get("action_mask") if isinstance(obs, dict) else None
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample(mask=mask))
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return rows


def _leaf(obs: Any, path: tuple) -> Any:
    for key in path:
        obs = obs[key]
    return obs


def _feeds(meta: dict, space: gym.Space, observations: list[Any]) -> dict[str, np.ndarray]:
    """The ONNX inputs for a list of observations: ``obs``, or one per leaf, each in the
    dtype ``policy.json`` gives (that of the env's space)."""
    names = [entry["name"] for entry in meta["inputs"] if entry["name"].startswith("obs")]
    dtypes = {entry["name"]: entry["dtype"] for entry in meta["inputs"]}
    if len(names) == 1 and names[0] == "obs":
        columns = {"obs": np.stack([np.asarray(o) for o in observations])}
    else:
        paths = leaf_paths(space)
        assert names == [".".join(["obs", *map(str, path)]) for path in paths]
        columns = {name: np.stack([np.asarray(_leaf(o, path)) for o in observations])
                   for name, path in zip(names, paths)}
    for name, column in columns.items():
        # Integers of a Discrete leaf come from the env as Python ints: int64.
        assert column.dtype.kind == np.dtype(dtypes[name]).kind, (name, column.dtype)
    return {name: np.ascontiguousarray(column, dtype=dtypes[name])
            for name, column in columns.items()}


def _greedy_row(agent, action: Any) -> np.ndarray:
    """An action of ``compute_action`` as the export returns it: Box actions clipped to
    the bounds (as the sampler clips), Tuple / Dict actions as flat rows."""
    space = agent.get_policy().action_space
    layout = ActionLayout(space)
    if layout.nested:
        return layout.from_env(layout.to_env(layout.from_env(action), clip=True))
    if isinstance(space, gym.spaces.Box):
        return np.clip(np.asarray(action), space.low, space.high).astype(space.dtype)
    return np.asarray(action)


def _assert_same(got: np.ndarray, expected: np.ndarray, case: str) -> None:
    assert got.shape == expected.shape, (case, got.shape, expected.shape)
    if np.issubdtype(got.dtype, np.integer):
        np.testing.assert_array_equal(got, expected.astype(got.dtype), err_msg=case)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=case)


def _check_metadata(meta: dict, session: Any, case: str, algorithm: str) -> None:
    assert meta["format"] == "onnx" and meta["file"] == "policy.onnx"
    assert meta["algorithm"] == algorithm and meta["iteration"] == 1
    assert meta["opset"] == ONNX_OPSET and meta["batch_axis"] == "batch"
    for listed, actual in ((meta["inputs"], session.get_inputs()),
                           (meta["outputs"], session.get_outputs())):
        assert [entry["name"] for entry in listed] == [value.name for value in actual]
        for entry, value in zip(listed, actual):
            assert entry["shape"] == value.shape, (case, entry, value.shape)
            assert entry["shape"][0] == "batch"
            assert all(isinstance(d, int) for d in entry["shape"][1:]), (case, entry)
            ort_type = {"float32": "float", "float64": "double"}.get(entry["dtype"],
                                                                      entry["dtype"])
            assert value.type == f"tensor({ort_type})", (case, entry, value.type)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The folder every test case exports into (``NO_TORCH_CHECK`` reads them all)."""
    return tmp_path_factory.mktemp("onnx_exports")


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_gives_the_greedy_actions(case, exported, request):
    algorithm, env, config = CASES[case]
    agent = _make(algorithm, env, config, request)
    try:
        agent.train()
        folder = exported / case
        path = agent.export_policy(str(folder), format="onnx")
        assert path == str(folder / "policy.onnx")
        policy = agent.get_policy()
        observations = _real_observations(agent, NUM_OBS)
        expected = np.stack([_greedy_row(agent, agent.compute_action(o, explore=False))
                             for o in observations])
    finally:
        agent.stop()
    meta = json.loads((folder / "policy.json").read_text())
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    _check_metadata(meta, session, case, algorithm)
    assert not meta["recurrent"]
    feeds = _feeds(meta, policy.observation_space, observations)
    (got,) = session.run(None, feeds)
    assert got.dtype.name == meta["outputs"][0]["dtype"]
    _assert_same(got, expected, case)
    for rows in (slice(0, 1), slice(3, 10)):  # the batch size is dynamic
        (part,) = session.run(None, {name: value[rows] for name, value in feeds.items()})
        _assert_same(part, expected[rows], case)
    if isinstance(policy.action_space, (gym.spaces.Tuple, gym.spaces.Dict)):
        layout = ActionLayout(policy.action_space)
        for row in got:
            assert policy.action_space.contains(layout.to_env(row, clip=False))
    if "masked" in case:
        masks = feeds["obs.action_mask"]
        assert np.all(masks[np.arange(NUM_OBS), got] == 1)
    np.savez(folder / "feeds.npz", **feeds)
    np.save(folder / "expected.npy", expected)


def test_exports_run_with_onnxruntime_alone(exported, tmp_path, request):
    """Whatever test_onnx_gives_the_greedy_actions exported (in this process) runs in
    a fresh interpreter that imports neither torch nor flowrl; run on its own, this test
    makes the first case's export itself."""
    cases = sorted(p.name for p in exported.iterdir() if (p / "feeds.npz").exists())
    if not cases:
        test_onnx_gives_the_greedy_actions(next(iter(CASES)), exported, request)
        cases = sorted(p.name for p in exported.iterdir() if (p / "feeds.npz").exists())
    out = subprocess.run([sys.executable, "-c", NO_TORCH_CHECK, str(exported)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("OK ") == len(cases)


@pytest.mark.parametrize("case", list(RECURRENT_CASES))
def test_recurrent_onnx_threads_the_state_like_compute_action(case, request, tmp_path):
    """One step per call, batches of one: the export's actions and state follow
    ``compute_action(obs, state, prev_action, prev_reward)`` over several episodes."""
    algorithm, env_name, config = RECURRENT_CASES[case]
    agent = _make(algorithm, env_name, config, request)
    try:
        agent.train()
        path = agent.export_policy(str(tmp_path / case), format="onnx")
        meta = json.loads((tmp_path / case / "policy.json").read_text())
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        _check_metadata(meta, session, case, algorithm)
        assert meta["recurrent"] and len(meta["state"]) == 2  # LSTM: h, c
        extra = ["state_in_0", "state_in_1", "prev_actions"] + (
            ["prev_rewards"] if config["model"]["lstm_use_prev_reward"] else [])
        names = [entry["name"] for entry in meta["inputs"]]
        assert names[-len(extra):] == extra
        assert all(name.startswith("obs") for name in names[:-len(extra)])
        assert [entry["name"] for entry in meta["outputs"]] == [
            "actions", "state_out_0", "state_out_1"]
        dtypes = {entry["name"]: entry["dtype"] for entry in meta["inputs"]}
        policy = agent.get_policy()
        action_shape = [int(d) for d in ActionLayout(policy.action_space).shape]
        env = _env(agent)
        steps, episodes = 0, 0
        while steps < NUM_OBS:
            obs, _ = env.reset(seed=100 + episodes)
            episodes += 1
            state, prev_action, prev_reward = None, None, None
            onnx_state = [np.zeros((1, part["shape"][1]), np.float32)
                          for part in meta["state"]]
            onnx_prev = (np.zeros([1, *action_shape], dtypes["prev_actions"]),
                         np.zeros(1, np.float32))
            while steps < NUM_OBS:
                action, state = agent.compute_action(obs, state, prev_action, prev_reward,
                                                     explore=False)
                feeds = _feeds(meta, policy.observation_space, [obs])
                feeds.update({f"state_in_{i}": part for i, part in enumerate(onnx_state)})
                feeds["prev_actions"] = onnx_prev[0]
                if "prev_rewards" in dtypes:
                    feeds["prev_rewards"] = onnx_prev[1]
                got, *onnx_state = session.run(None, feeds)
                _assert_same(got[0], _greedy_row(agent, action), case)
                for mine, theirs in zip(onnx_state, state):
                    np.testing.assert_allclose(mine[0], theirs, rtol=1e-4, atol=1e-5)
                obs, reward, terminated, truncated, _ = env.step(action)
                steps += 1
                if terminated or truncated:
                    break
                prev_action, prev_reward = action, reward
                # The export takes back what it returned: clipped Box actions (the same
                # as the agent's while the mean is inside the bounds, as here).
                onnx_prev = (got.astype(dtypes["prev_actions"]),
                             np.array([reward], np.float32))
        env.close()
        assert episodes >= 1
    finally:
        agent.stop()


def test_onnx_needs_the_extra(monkeypatch, request, tmp_path):
    agent = _make("PG", "CartPole-v1", {"model": {"fcnet_hiddens": [8]}}, request)
    try:
        with pytest.raises(ValueError, match="'torchscript' or 'onnx'"):
            agent.export_policy(str(tmp_path / "x"), format="tflite")
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
        with pytest.raises(ImportError, match=r"onnx.*flowrl\[onnx\]"):
            agent.export_policy(str(tmp_path / "onnx"), format="onnx")
        assert not (tmp_path / "onnx").exists()
        # TorchScript needs neither.
        assert agent.export_policy(str(tmp_path / "ts")).endswith("policy.pt")
    finally:
        agent.stop()


class _BakesTheBatchSize(nn.Module):
    """Turns the batch size into a Python int: tracing keeps the example's size."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.argmax(obs, dim=-1) + torch.zeros(int(obs.shape[0]), dtype=torch.int64)


def test_an_export_that_differs_from_the_eager_module_is_refused():
    space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    with pytest.raises(RuntimeError, match="ONNX export of _BakesTheBatchSize"):
        to_onnx(_BakesTheBatchSize(), space)


class _ReadsOneLeaf(nn.Module):
    """A model of a Dict observation that ignores its ``"unused"`` leaf."""

    def forward(self, obs: dict) -> torch.Tensor:
        return torch.argmax(obs["used"], dim=-1)


def test_a_leaf_the_model_ignores_stays_an_input():
    """The exporter drops unread inputs; the export keeps one input per leaf anyway."""
    space = gym.spaces.Dict({"unused": gym.spaces.Discrete(3),
                             "used": gym.spaces.Box(-1.0, 1.0, (4,), np.float32)})
    model = onnx.load_from_string(to_onnx(LeafInputs(_ReadsOneLeaf(), space), space))
    inputs = [(value.name, value.type.tensor_type.elem_type,
               [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim])
              for value in model.graph.input]
    assert inputs == [("obs.unused", onnx.TensorProto.INT64, ["batch"]),
                      ("obs.used", onnx.TensorProto.FLOAT, ["batch", 4])]
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    used = np.eye(4, dtype=np.float32)[[2, 0, 3]]
    (got,) = session.run(None, {"obs.unused": np.zeros(3, np.int64), "obs.used": used})
    np.testing.assert_array_equal(got, [2, 0, 3])
