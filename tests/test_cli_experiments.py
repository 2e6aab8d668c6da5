"""scripts/train.py as users run it: experiment files, sweeps, --resume after a kill,
--local-mode, the acceptance commands of the docs, TensorBoard names, and every flag.

Each test runs the real script in a subprocess (its own Ray instance on 2 CPUs, or a
`ray start --head` cluster of the test's own).
"""

import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
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


# Holds the trial inside iteration 7 (never reported) while the gate file exists: the
# killed run's last checkpoint is then exactly the one of iteration 6, whatever the
# machine's speed.
GATE_CALLBACKS = """
import os
import threading

from flowrl.workers.callbacks import DefaultCallbacks


class HoldAtIteration7(DefaultCallbacks):
    def on_train_result(self, *, agent, result):
        if agent.iteration == 7 and os.path.exists({gate!r}):
            threading.Event().wait()  # until the test kills the run
"""


def recorded_checkpoints(experiment_dir):
    """Checkpoint names in Tune's latest experiment-state snapshot (what --resume reads):
    the trials' checkpoint managers are stored cloudpickled, as hex strings."""
    states = sorted(glob.glob(os.path.join(experiment_dir, "experiment_state-*.json")))
    if not states:
        return set()
    try:
        with open(states[-1]) as f:
            trials = json.load(f)["trial_data"]
    except (json.JSONDecodeError, KeyError):  # caught mid-write: not yet
        return set()
    found = set()
    for _, runtime in trials:
        blob = bytes.fromhex(json.loads(runtime)["checkpoint_manager"]["value"])
        found.update(m.decode() for m in re.findall(rb"checkpoint_\d{6}", blob))
    return found


def test_resume_continues_a_killed_experiment_from_its_last_checkpoint(tmp_path):
    gate = tmp_path / "hold"
    gate.touch()
    callbacks = tmp_path / "hold_callbacks.py"
    callbacks.write_text(GATE_CALLBACKS.format(gate=str(gate)))
    config = {**TINY_PG, "callbacks": f"{callbacks}:HoldAtIteration7"}
    args = ["--run", "PG", "--env", "CartPole-v1", "--config", json.dumps(config),
            "--stop", '{"training_iteration": 12}', "--checkpoint-freq", "3",
            "--experiment-name", "resume-me", "--local-dir", str(tmp_path),
            "--ray-num-cpus", "2"]
    first = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        # Kill once the experiment state --resume reads records iteration 6's checkpoint
        # (checkpoint_000001); the trial is then held in iteration 7.
        deadline = time.monotonic() + 300
        while "checkpoint_000001" not in recorded_checkpoints(tmp_path / "resume-me"):
            assert first.poll() is None, "the first run ended before it was killed"
            assert time.monotonic() < deadline, "iteration 6's checkpoint never recorded"
            time.sleep(0.5)  # polling interval only
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
        first.wait()
    (trial,) = trial_dirs(tmp_path / "resume-me")
    assert [r["training_iteration"] for r in results_of(trial)] == list(range(1, 7))

    gate.unlink()  # the resumed run passes iteration 7
    out, text = run_script(TRAIN, *args, "--resume")
    assert out.returncode == 0, text[-4000:]
    iterations = [int(m) for m in re.findall(r"  iter (\d+)  ts ", out.stdout)]
    assert iterations == list(range(7, 13))  # from iteration 6's checkpoint, not from 1
    # result.json: the killed run's 6 lines, then the resumed run's, counters continued.
    results = results_of(trial)
    assert [r["training_iteration"] for r in results] == list(range(1, 13))
    assert [r["timesteps_total"] for r in results] == [100 * i for i in range(1, 13)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray cluster of its own started by `ray start --head --block` (1 CPU, token
    auth with a token of its own, session files in a temporary folder, so the machine's
    /tmp/ray and other Ray instances are untouched). Yields (address, env with the
    token); stopped by SIGTERM to that `ray start` alone, which drains and ends its
    processes (`ray stop` would stop every Ray instance on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="flowrl-head-")  # short: Ray's socket paths
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    with open(os.path.join(temp_dir, "head.log"), "w") as log:
        head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts",  # `ray` of this interpreter
             "start", "--head", "--block", "--num-cpus=1",
             f"--port={address.rsplit(':', 1)[1]}", "--include-dashboard=false",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # `ray start` writes the cluster's address file once its processes are up.
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(temp_dir, "ray_current_cluster")):
            assert head.poll() is None, open(os.path.join(temp_dir, "head.log")).read()
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.2)  # polling interval only
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass  # it did not drain in time: the SIGKILL below ends it
        try:
            os.killpg(head.pid, signal.SIGKILL)  # any of its processes still there
        except ProcessLookupError:
            pass  # the group is already gone: nothing left to kill
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


QUERY_JOBS = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
print(json.dumps([(j["DriverPid"], j["Entrypoint"], j["IsDead"]) for j in state.jobs()]))
"""


def test_ray_address_joins_a_cluster_started_with_ray_start_head(ray_head, tmp_path):
    address, env = ray_head
    args = [sys.executable, TRAIN, "--run", "PG", "--env", "CartPole-v1", "--config",
            json.dumps(TINY_PG), "--stop", '{"training_iteration": 1}',
            "--local-dir", str(tmp_path), "--ray-address", address]
    # Without the cluster's token: one clear error line, not a traceback. (Ray retries
    # the connection for RAY_gcs_server_port_wait_time_s seconds, 20 by default.)
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**no_token, "RAY_gcs_server_port_wait_time_s": "2"})
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-4000:]
    (error,) = [line for line in out.stderr.splitlines() if "flowrl train: error" in line]
    assert f"cannot join the Ray cluster at {address}" in error
    assert "set RAY_AUTH_MODE=token" in error and "Traceback" not in out.stderr

    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "Connected to Ray cluster" in stderr  # joined, did not start its own
    (trial,) = trial_dirs(tmp_path / "PG")
    assert [r["training_iteration"] for r in results_of(trial)] == [1]
    # The cluster's own job table holds the finished driver: that process, that command.
    query = subprocess.run([sys.executable, "-c", QUERY_JOBS, address], capture_output=True,
                           text=True, timeout=120, env=env)
    assert query.returncode == 0, query.stderr[-3000:]
    jobs = json.loads(query.stdout.strip().splitlines()[-1])
    (entrypoint,) = [e for pid, e, dead in jobs if pid == driver.pid and dead]
    assert "scripts/train.py" in entrypoint and f"--ray-address {address}" in entrypoint


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
    episodes = [(float(r), int(n)) for r, n in re.findall(
        r"Episode \d+: return ([\d.]+), length (\d+)", out.stdout)]
    assert len(episodes) == 5, out.stdout  # --episodes 5
    assert all(ret == length for ret, length in episodes)  # CartPole: 1 per step
    mean = sum(ret for ret, _ in episodes) / 5
    assert f"Mean return: {mean:.2f} over 5 finished episodes" in out.stdout, out.stdout


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


# Each flag -> extra arguments after "--run PG --env CartPole-v1", and what they must
# change in the parsed arguments or in the experiment spec handed to Tune. Flags that
# act only when the run starts are run by the tests named in the comments.
def spec_of(experiments):
    (spec,) = experiments.values()
    return spec


FLAG_EFFECTS = {
    "--run": (["--run", "A2C"], lambda a, e: spec_of(e)["run"] == "A2C"),
    "--env": (["--env", "Acrobot-v1"],
              lambda a, e: spec_of(e)["config"]["env"] == "Acrobot-v1"),
    "--config": (["--config", '{"lr": 0.01}'],
                 lambda a, e: spec_of(e)["config"]["lr"] == 0.01),
    "--stop": (["--stop", '{"training_iteration": 7}'],
               lambda a, e: spec_of(e)["stop"] == {"training_iteration": 7}),
    "--config-file": (["--config-file", "{experiments_file}"],
                      lambda a, e: list(e) == ["from-file"]
                      and spec_of(e)["config"]["lr"] == 0.002),
    "--checkpoint-freq": (["--checkpoint-freq", "3"], lambda a, e: spec_of(e)[
        "checkpoint_config"]["checkpoint_frequency"] == 3),
    "--checkpoint-at-end": (["--checkpoint-at-end"], lambda a, e: spec_of(e)[
        "checkpoint_config"]["checkpoint_at_end"] is True),
    "--keep-checkpoints-num": (["--keep-checkpoints-num", "2"], lambda a, e: spec_of(e)[
        "checkpoint_config"]["num_to_keep"] == 2),
    "--num-samples": (["--num-samples", "4"], lambda a, e: spec_of(e)["num_samples"] == 4),
    "--experiment-name": (["--experiment-name", "named"],
                          lambda a, e: list(e) == ["named"]),
    "--storage-path": (["--storage-path", "rel/results"], lambda a, e: spec_of(e)[
        "storage_path"] == os.path.abspath("rel/results")),
    "--local-dir": (["--local-dir", "rel/old"], lambda a, e: spec_of(e)[
        "storage_path"] == os.path.abspath("rel/old")),
    "--restore": (["--restore", "/ckpt/checkpoint_000002"],
                  lambda a, e: spec_of(e)["restore"] == "/ckpt/checkpoint_000002"),
    # run by test_resume_continues_a_killed_experiment_from_its_last_checkpoint
    "--resume": (["--resume"], lambda a, e: a.resume is True),
    # run by test_ray_address_joins_a_cluster_started_with_ray_start_head
    "--ray-address": (["--ray-address", "127.0.0.1:6390"],
                      lambda a, e: a.ray_address == "127.0.0.1:6390"),
    "--ray-num-cpus": (["--ray-num-cpus", "3"], lambda a, e: a.ray_num_cpus == 3),
    "--ray-num-gpus": (["--ray-num-gpus", "0"], lambda a, e: a.ray_num_gpus == 0),
    # run by test_local_mode_runs_in_one_process_and_restores
    "--local-mode": (["--local-mode"], lambda a, e: a.local_mode is True),
    # run by tests/test_rllib_compat.py (Tune logger callbacks from the command line)
    "--callbacks": (["--callbacks", "mod.py:Logger"], lambda a, e: len(a.callbacks) == 1),
    "--verbose": (["--verbose", "-v"], lambda a, e: a.verbose == 2),
}


def holds(check, args, experiments):
    """``check``, with a key the defaults leave out (``restore``, ``lr``) as False."""
    try:
        return check(args, experiments)
    except KeyError:
        return False


def test_every_flag_changes_what_it_names(tmp_path):
    from flowrl.cli import make_train_parser
    from flowrl.cli.train import build_experiments

    parser = make_train_parser()
    flags = {max(a.option_strings, key=len) for a in parser._actions} - {"--help"}
    assert flags == set(FLAG_EFFECTS), "give each new flag an entry in FLAG_EFFECTS"
    experiments_file = tmp_path / "exp.yaml"
    experiments_file.write_text(yaml.safe_dump({"from-file": {
        "run": "PG", "env": "CartPole-v1", "config": {"lr": 0.002}}}))
    base = ["--run", "PG", "--env", "CartPole-v1"]
    default_args = parser.parse_args(base)
    default = build_experiments(default_args)
    for flag, (extra, changed) in FLAG_EFFECTS.items():
        extra = [str(experiments_file) if x == "{experiments_file}" else x for x in extra]
        args = parser.parse_args(extra if flag == "--config-file" else base + extra)
        experiments = build_experiments(args)
        assert changed(args, experiments), flag
        assert not holds(changed, default_args, default), f"{flag}: the default matches"
    # Typed flags refuse what they cannot parse, and the two Ray modes exclude each other.
    for bad in (["--checkpoint-freq", "often"], ["--config", "{lr: 1"],
                ["--ray-num-cpus", "two"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)
    with pytest.raises(ValueError, match="with --ray-address the cluster's own resources"):
        build_experiments(parser.parse_args(base + ["--ray-address", "auto",
                                                    "--ray-num-cpus", "2"]))
