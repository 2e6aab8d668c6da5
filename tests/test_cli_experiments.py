"""scripts/train.py as users run it: experiment files, sweeps, --resume after a kill,
--local-mode, the acceptance commands of the docs, TensorBoard names, and every flag.

Each test runs the real script in a subprocess (its own Ray instance on 2 CPUs).
"""

import glob
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
ROLLOUT = os.path.join(ROOT, "scripts", "rollout.py")
TINY_PG = {"num_envs_per_worker": 1, "rollout_fragment_length": 100,
           "train_batch_size": 100, "batch_mode": "truncate_episodes"}


def run_script(script, *args, timeout=300):
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    return out, out.stdout + out.stderr


def trial_dirs(experiment_dir):
    return sorted(d for d in glob.glob(os.path.join(experiment_dir, "*"))
                  if os.path.isdir(d))


def results_of(trial_dir):
    with open(os.path.join(trial_dir, "result.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def tensorboard_tags(trial_dir):
    """Scalar tags of the trial's TensorBoard event files (TFRecord framing:
    length u64, crc u32, payload, crc u32)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in glob.glob(os.path.join(trial_dir, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_experiment_file_with_two_experiments_json_and_num_samples(tmp_path):
    experiments = {
        "pg-small": {"run": "PG", "env": "CartPole-v1",
                     "stop": {"training_iteration": 1}, "config": TINY_PG},
        "a2c-small": {"run": "A2C", "env": "CartPole-v1",
                      "stop": {"training_iteration": 1}, "config": {"num_envs_per_worker": 2}},
    }
    path = tmp_path / "two.json"
    path.write_text(json.dumps(experiments))
    out, text = run_script(TRAIN, "-f", str(path), "--num-samples", "2",
                           "--local-dir", str(tmp_path / "results"), "--ray-num-cpus", "2")
    assert out.returncode == 0, text[-4000:]
    for name in experiments:
        dirs = trial_dirs(tmp_path / "results" / name)
        assert len(dirs) == 2, (name, dirs)
        for d in dirs:
            assert [r["training_iteration"] for r in results_of(d)] == [1]
    assert text.count("TERMINATED") == 4


def test_grid_search_from_yaml_runs_three_trials_on_two_cpus(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"pg-sweep": {
        "run": "PG", "env": "CartPole-v1", "stop": {"training_iteration": 2},
        "config": {**TINY_PG, "lr": {"grid_search": [0.01, 0.004, 0.001]}}}}))
    out, text = run_script(TRAIN, "-f", str(path), "--local-dir", str(tmp_path),
                           "--ray-num-cpus", "2")
    assert out.returncode == 0, text[-4000:]
    dirs = trial_dirs(tmp_path / "pg-sweep")
    assert len(dirs) == 3  # 1 CPU per trial: two at once, the third queued, none hung
    assert sorted(json.load(open(os.path.join(d, "params.json")))["lr"] for d in dirs) == \
        [0.001, 0.004, 0.01]
    assert all(results_of(d)[-1]["training_iteration"] == 2 for d in dirs)


def test_progress_lines_tensorboard_names_and_keep_checkpoints(tmp_path):
    out, text = run_script(TRAIN, "--run", "PPO", "--env", "CartPole-v1",
                           "--config", json.dumps({"train_batch_size": 256,
                                                   "rollout_fragment_length": 32,
                                                   "num_sgd_iter": 1}),
                           "--stop", '{"training_iteration": 4}', "--checkpoint-freq", "1",
                           "--keep-checkpoints-num", "2", "--experiment-name", "named",
                           "--local-dir", str(tmp_path), "--ray-num-cpus", "2",
                           "--ray-num-gpus", "0", "-v")
    assert out.returncode == 0, text[-4000:]
    # One readable line per iteration with iteration, timesteps, reward, throughput.
    lines = [line for line in out.stdout.splitlines() if re.search(r"  iter \d+  ts ", line)]
    assert len(lines) == 4, out.stdout[-3000:]
    assert re.search(r"iter 4  ts 1,024  reward [\d.]+  [\d,]+ sampled/s  [\d,]+ trained/s",
                     lines[-1])
    (trial,) = trial_dirs(tmp_path / "named")
    checkpoints = sorted(glob.glob(os.path.join(trial, "checkpoint_*")))
    assert len(checkpoints) == 2  # --keep-checkpoints-num 2 of 4, the newest kept
    assert os.path.basename(checkpoints[-1]) == "checkpoint_000003"
    tags = tensorboard_tags(trial)
    for tag in ("episode_reward_mean", "timesteps_total", "episode_len_mean",
                "info/learner/default_policy/entropy", "info/learner/default_policy/kl",
                "info/learner/default_policy/policy_loss", "timers/sampled_steps_per_s"):
        assert tag in tags, sorted(tags)
    assert not any(t.startswith("ray/tune/") for t in tags)  # one copy, plain names


def test_resume_continues_a_killed_experiment_from_its_last_checkpoint(tmp_path):
    config = {**TINY_PG, "min_iter_time_s": 0.3}
    args = ["--run", "PG", "--env", "CartPole-v1", "--config", json.dumps(config),
            "--stop", '{"training_iteration": 30}', "--checkpoint-freq", "3",
            "--experiment-name", "resume-me", "--local-dir", str(tmp_path),
            "--ray-num-cpus", "2"]
    first = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            dirs = trial_dirs(tmp_path / "resume-me")
            if dirs and len(glob.glob(os.path.join(dirs[0], "checkpoint_*"))) >= 2:
                time.sleep(5)  # > the CLI's 2 s experiment-state period: it is recorded
                break
            assert first.poll() is None, "the first run ended before it was killed"
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint within 180 s")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
        first.wait()
    (trial,) = trial_dirs(tmp_path / "resume-me")

    out, text = run_script(TRAIN, *args, "--resume")
    assert out.returncode == 0, text[-4000:]
    iterations = [int(m) for m in re.findall(r"  iter (\d+)  ts ", out.stdout)]
    # It restarts from a checkpoint (every 3 iterations), not from iteration 1.
    assert iterations and iterations[0] > 3 and (iterations[0] - 1) % 3 == 0, iterations
    assert iterations[-1] == 30
    results = results_of(trial)
    assert results[-1]["training_iteration"] == 30
    # result.json keeps the killed run's lines too (Tune appends): the resumed run's
    # lines start at the last occurrence of its first iteration.
    start = max(i for i, r in enumerate(results) if r["training_iteration"] == iterations[0])
    steps = [r["timesteps_total"] for r in results[start:]]
    assert [r["training_iteration"] for r in results[start:]] == list(range(iterations[0], 31))
    assert steps == sorted(steps) and steps[0] > 100  # counters continue too


def test_local_mode_runs_in_one_process_and_restores(tmp_path):
    out, text = run_script(TRAIN, "--run", "PG", "--env", "CartPole-v1", "--config",
                           json.dumps(TINY_PG), "--stop", '{"training_iteration": 2}',
                           "--checkpoint-at-end", "--local-mode", "--local-dir",
                           str(tmp_path))
    assert out.returncode == 0, text[-4000:]
    assert "one process, num_workers=0" in out.stdout
    (checkpoint,) = glob.glob(str(tmp_path / "PG" / "*" / "checkpoint_*"))
    out, text = run_script(TRAIN, "--run", "PG", "--env", "CartPole-v1", "--config",
                           json.dumps(TINY_PG), "--stop", '{"training_iteration": 3}',
                           "--local-mode", "--local-dir", str(tmp_path / "again"),
                           "--restore", checkpoint)
    assert out.returncode == 0, text[-4000:]
    assert re.findall(r"  iter (\d+)  ts ", out.stdout) == ["3"]


def test_documented_dqn_command_then_rollout(tmp_path):
    """`train.py --run DQN --env CartPole-v0` (stopped by a budget), then
    `rollout.py <checkpoint> --run DQN --env CartPole-v0 --episodes 5 --no-render`."""
    out, text = run_script(TRAIN, "--run", "DQN", "--env", "CartPole-v0", "--stop",
                           '{"timesteps_total": 1500}', "--checkpoint-at-end",
                           "--local-dir", str(tmp_path), "--ray-num-cpus", "2")
    assert out.returncode == 0, text[-4000:]
    (checkpoint,) = glob.glob(str(tmp_path / "DQN" / "*" / "checkpoint_*"))
    out, text = run_script(ROLLOUT, checkpoint, "--run", "DQN", "--env", "CartPole-v0",
                           "--episodes", "5", "--no-render")
    assert out.returncode == 0, text[-4000:]
    assert re.search(r"mean", out.stdout, re.IGNORECASE), out.stdout


def test_documented_pong_a2c_monitor_command_starts_and_stops(tmp_path):
    out, text = run_script(TRAIN, "--env=PongDeterministic-v4", "--run=A2C", "--config",
                           '{"num_workers": 2, "monitor": true}',
                           "--stop", '{"training_iteration": 2}',
                           "--local-dir", str(tmp_path), "--ray-num-cpus", "2")
    assert out.returncode == 0, text[-4000:]
    assert "num_cpus_per_worker=0.5" in out.stdout  # fitted to the 2 CPUs
    (trial,) = trial_dirs(tmp_path / "A2C")
    assert [r["training_iteration"] for r in results_of(trial)] == [1, 2]
    videos = glob.glob(os.path.join(trial, "videos", "*.mp4"))
    assert videos and open(videos[0], "rb").read(8)[4:8] == b"ftyp"  # in the results folder


def test_every_help_flag_is_exercised_by_a_test_or_documented():
    from flowrl.cli import make_train_parser

    flags = [s for action in make_train_parser()._actions for s in action.option_strings
             if s.startswith("--") and s != "--help"]
    texts = []
    for pattern in ("tests/*.py", "README.md", "docs/*.md"):
        for path in glob.glob(os.path.join(ROOT, pattern)):
            texts.append(open(path).read())
    corpus = "\n".join(texts)
    missing = [f for f in flags if not re.search(re.escape(f) + r"\b", corpus)]
    assert not missing, f"flags neither tested nor documented: {missing}"
    help_text = make_train_parser().format_help()
    for flag in flags:  # each flag's help line says what it does, most with an example
        assert flag in help_text
