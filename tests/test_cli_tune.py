"""The CLI end to end (a real subprocess) and Ray Tune sweeps."""

import json
import os
import subprocess
import sys

import pytest
import ray
from ray import tune

import flowrl  # noqa: F401  (registers the trainables)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
FAST_PPO = {"train_batch_size": 512, "rollout_fragment_length": 64, "num_sgd_iter": 2}


def run_train(*args, timeout=600):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_trains_and_writes_trial_files(tmp_path):
    out = run_train("--run", "PPO", "--env", "CartPole-v1",
                    "--stop", '{"training_iteration": 2}', "--config", json.dumps(FAST_PPO),
                    "--checkpoint-at-end", "--local-dir", str(tmp_path),
                    "--ray-num-cpus", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (trial_dir,) = [d for d in (tmp_path / "PPO").iterdir() if d.is_dir()]
    files = os.listdir(trial_dir)
    for name in ("params.json", "result.json", "progress.csv"):
        assert name in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    checkpoints = [f for f in files if f.startswith("checkpoint_")]
    assert checkpoints
    assert os.path.isfile(trial_dir / checkpoints[0] / "flowrl_checkpoint.json")
    results = [json.loads(line) for line in open(trial_dir / "result.json")]
    assert [r["training_iteration"] for r in results] == [1, 2]
    assert results[-1]["timesteps_total"] == 1024


@pytest.mark.parametrize("args, message", [
    (["--run", "PPOO", "--env", "CartPole-v1"], "Unknown algorithm 'PPOO'. Did you mean 'PPO'?"),
    (["--run", "PPO", "--env", "CartPoles-v1"], "Unknown env 'CartPoles-v1'"),
    (["--run", "PPO", "--env", "CartPole-v1", "--config", '{"lrr": 0.1}'],
     "Unknown config key 'lrr'. Did you mean 'lr'?"),
    (["--run", "PPO", "--env", "CartPole-v1", "--config", "{lr: 1}"],
     "--config must be a JSON object"),
])
def test_cli_bad_input_gives_one_clear_error(args, message):
    out = run_train(*args, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_resource_request_beyond_cluster_fails_fast(tmp_path):
    out = run_train("--run", "PPO", "--env", "CartPole-v1", "--config",
                    '{"num_workers": 4, "num_cpus_per_worker": 1}', "--local-dir", str(tmp_path),
                    "--ray-num-cpus", "2", timeout=240)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "asks for 5 CPUs" in text and "has 2" in text


def test_tune_grid_sweep_runs_three_trials(ray_session, tmp_path):
    trials = tune.run_experiments(
        {"sweep": {"run": "PPO", "env": "CartPole-v1",
                   "stop": {"training_iteration": 2},
                   "storage_path": str(tmp_path),
                   "config": {**FAST_PPO, "lr": tune.grid_search([1e-3, 3e-4, 1e-4])}}},
        verbose=0)
    assert len(trials) == 3
    assert all(t.status == "TERMINATED" for t in trials)
    assert sorted(t.config["lr"] for t in trials) == [1e-4, 3e-4, 1e-3]
    assert all(t.last_result["training_iteration"] == 2 for t in trials)
    assert all(t.last_result["timesteps_total"] == 1024 for t in trials)
    assert ray.is_initialized()


def test_tuned_examples_are_valid_experiments():
    import glob

    import yaml

    from flowrl import get_agent_class

    files = glob.glob(os.path.join(ROOT, "flowrl", "tuned_examples", "*.yaml"))
    assert len(files) >= 3
    for path in files:
        for name, spec in yaml.safe_load(open(path)).items():
            config = get_agent_class(spec["run"]).merge_config(
                {**spec["config"], "env": spec["env"]})
            assert config["env"] == spec["env"], (path, name)
            assert spec["stop"], (path, name)


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "flowrl.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--checkpoint-freq" in out.stdout


def _tuned_experiments():
    import glob

    import yaml

    for path in sorted(glob.glob(os.path.join(ROOT, "flowrl", "tuned_examples", "*.yaml"))):
        for name, spec in yaml.safe_load(open(path)).items():
            yield pytest.param(spec, id=name)


NON_ATARI = [p for p in _tuned_experiments()
             if p.values[0]["env"].split("-")[0] in ("CartPole", "Pendulum")]


def test_every_yaml_is_accounted_for():
    ids = [p.id for p in _tuned_experiments()]
    assert len(ids) >= 20 and len(NON_ATARI) >= 10
    for algo in ("apex", "dqn", "impala", "ppo", "a2c"):
        assert f"pong-{algo}" in ids and f"breakout-{algo}" in ids


@pytest.mark.parametrize("spec", NON_ATARI)
def test_tuned_example_runs_one_iteration(ray_session, spec):
    from flowrl import get_agent_class

    agent = get_agent_class(spec["run"])(config=spec["config"], env=spec["env"],
                                         log_to_disk=False)
    try:
        result = agent.train()
    finally:
        agent.stop()
    assert result["training_iteration"] == 1 and result["timesteps_total"] > 0
