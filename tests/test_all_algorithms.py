"""Every algorithm trains, checkpoints and restores: Python API and scripts/train.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowrl import ALGORITHMS, Agent, get_agent_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE = {"num_workers": 1, "num_cpus_per_worker": 0.5, "min_iter_time_s": 0}

# The smallest configs that still run every branch of each plan once.
TINY = {
    "PG": ("CartPole-v1", {"train_batch_size": 200}),
    "A2C": ("CartPole-v1", {"train_batch_size": 160}),
    "A3C": ("CartPole-v1", {**REMOTE, "timesteps_per_iteration": 100}),
    "PPO": ("CartPole-v1", {"train_batch_size": 256, "sgd_minibatch_size": 64,
                            "rollout_fragment_length": 32, "num_sgd_iter": 1}),
    "DQN": ("CartPole-v1", {"learning_starts": 100, "timesteps_per_iteration": 300}),
    "APEX": ("CartPole-v1", {**REMOTE, "num_gpus": 0, "num_replay_buffer_shards": 1,
                             "buffer_size": 5000, "learning_starts": 100,
                             "train_batch_size": 32, "timesteps_per_iteration": 600,
                             "model": {"fcnet_hiddens": [32]}, "hiddens": [32]}),
    "IMPALA": ("CartPole-v1", {**REMOTE, "train_batch_size": 100,
                               "timesteps_per_iteration": 300}),
    "APPO": ("CartPole-v1", {**REMOTE, "train_batch_size": 100, "timesteps_per_iteration": 300,
                             "target_update_frequency": 200}),
    "ES": ("CartPole-v1", {"num_workers": 1, "num_cpus_per_worker": 0.5}),
    "DDPG": ("Pendulum-v1", {"learning_starts": 100, "timesteps_per_iteration": 300}),
    "SAC": ("Pendulum-v1", {"learning_starts": 100, "timesteps_per_iteration": 200,
                            "train_batch_size": 64, "training_intensity": 64,
                            "actor_hiddens": [64, 64], "critic_hiddens": [64, 64]}),
    "APEX_DDPG": ("Pendulum-v1", {**REMOTE, "num_gpus": 0, "num_replay_buffer_shards": 1,
                                  "buffer_size": 5000, "learning_starts": 100,
                                  "train_batch_size": 32, "timesteps_per_iteration": 600}),
}


def test_every_algorithm_is_registered():
    assert sorted(ALGORITHMS) == sorted(TINY)
    with pytest.raises(ValueError) as error:
        get_agent_class("R2D2")  # not an algorithm of flowrl
    for name in TINY:
        assert name in str(error.value)


@pytest.mark.parametrize("algorithm", sorted(TINY))
def test_python_api_train_save_restore(algorithm, ray_session, results_dir, tmp_path):
    env, config = TINY[algorithm]
    agent = get_agent_class(algorithm)(config={**config, "seed": 0}, env=env)
    result = agent.train()
    assert result["timesteps_total"] > 0 and result["training_iteration"] == 1
    path = agent.save(str(tmp_path / "ckpt"))
    env_obj = agent.workers.local_worker().env
    obs = [env_obj.observation_space.sample() for _ in range(5)]
    expected = [np.asarray(agent.compute_action(o, explore=False)) for o in obs]
    agent.stop()
    restored = Agent.from_checkpoint(path)
    assert type(restored).__name__ == type(agent).__name__
    assert restored.iteration == 1
    for o, e in zip(obs, expected):
        np.testing.assert_allclose(np.asarray(restored.compute_action(o, explore=False)), e,
                                   rtol=1e-5, atol=1e-6)
    assert restored.train()["training_iteration"] == 2
    restored.stop()


def run_train_file(experiments: dict, path, local_dir) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(experiments))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "-f", str(path),
         "--local-dir", str(local_dir), "--ray-num-cpus", "2", "--checkpoint-at-end"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)


def only_trial_dir(experiment_dir):
    (trial,) = [d for d in experiment_dir.iterdir() if d.is_dir()]
    return trial


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """scripts/train.py as users run it, twice, with one experiment per algorithm in one
    experiment file (one Ray start per run instead of one per algorithm): first one
    iteration and a checkpoint at the end, then each experiment restored from its
    checkpoint (the file's ``restore`` key) and trained to iteration 2."""
    root = tmp_path_factory.mktemp("cli_runs")
    first = run_train_file(
        {f"first-{name}": {"run": name, "env": env, "config": config,
                           "stop": {"training_iteration": 1}}
         for name, (env, config) in TINY.items()}, root / "first.json", root)
    checkpoints = {}
    for name in TINY:
        experiment_dir = root / f"first-{name}"
        if experiment_dir.is_dir():
            checkpoints[name] = [d for d in only_trial_dir(experiment_dir).iterdir()
                                 if d.name.startswith("checkpoint_")]
    second = run_train_file(
        {f"second-{name}": {"run": name, "env": TINY[name][0], "config": TINY[name][1],
                            "stop": {"training_iteration": 2},
                            "restore": str(found[0])}
         for name, found in checkpoints.items() if len(found) == 1},
        root / "second.json", root)
    return root, first, second, checkpoints


@pytest.mark.parametrize("algorithm", sorted(TINY))
def test_cli_train_checkpoint_restore(algorithm, cli_runs):
    root, first, second, checkpoints = cli_runs
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    (checkpoint,) = checkpoints.get(algorithm, [])
    assert (checkpoint / "flowrl_checkpoint.json").is_file()
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    first_results = [json.loads(line) for line in
                     open(only_trial_dir(root / f"first-{algorithm}") / "result.json")]
    trial = only_trial_dir(root / f"second-{algorithm}")
    results = [json.loads(line) for line in open(trial / "result.json")]
    assert results[-1]["training_iteration"] == 2
    # Continued from the checkpoint: its step count carries on from the first run's
    # (a fresh start would count only its own iteration's steps).
    assert results[0]["timesteps_total"] == \
        first_results[-1]["timesteps_total"] + results[0]["timesteps_this_iter"]
