"""Results storage of ``flowrl train``: ``--storage-path`` / ``--local-dir`` URIs
(``s3://``, ``gs://``, ``file://``, any ``scheme://``) reach Tune unchanged, plain paths
are made absolute, a real Tune run writes where a ``file://`` URI points, and
``--resume`` continues from the checkpoints kept there.

The unit tests read the experiment specs the CLI builds (``build_experiments``); the
others run real Tune experiments, in this process or through the script.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowrl.cli.train import build_experiments, local_folder_of, make_train_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
# One PG iteration = 100 steps, paced so that an interruption lands between checkpoints.
PACED_PG = {"num_workers": 1, "num_cpus_per_worker": 1, "num_envs_per_worker": 1,
            "rollout_fragment_length": 100, "train_batch_size": 100,
            "batch_mode": "truncate_episodes", "min_iter_time_s": 2}


def spec_for(*flags: str) -> dict:
    """The experiment spec ``flowrl train --run PG --env CartPole-v1 FLAGS`` builds."""
    args = make_train_parser().parse_args(["--run", "PG", "--env", "CartPole-v1", *flags])
    (spec,) = build_experiments(args).values()
    return spec


@pytest.mark.parametrize("flag", ["--storage-path", "--local-dir"])
@pytest.mark.parametrize("uri", ["s3://my-bucket/experiments", "gs://my-bucket/exp",
                                 "file:///mnt/shared/results", "hdfs://namenode:8020/rl",
                                 "abfss://container@account.dfs.core.windows.net/x"])
def test_uris_reach_tune_unchanged(flag, uri):
    assert spec_for(flag, uri)["storage_path"] == uri


def test_plain_paths_keep_todays_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert spec_for("--storage-path", "results")["storage_path"] == str(tmp_path / "results")
    assert spec_for("--local-dir", "../up")["storage_path"] == str(tmp_path.parent / "up")
    assert spec_for("--local-dir", "~/r")["storage_path"] == str(tmp_path / "home" / "r")
    assert spec_for()["storage_path"] == str(tmp_path / "home" / "ray_results")


def test_experiment_files_may_name_the_storage_either_way(tmp_path):
    for key in ("storage_path", "local_dir"):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({"exp": {"run": "PG", "env": "CartPole-v1",
                                            key: "gs://bucket/from-file"}}))
        args = make_train_parser().parse_args(["-f", str(path)])
        assert build_experiments(args)["exp"]["storage_path"] == "gs://bucket/from-file"
        # The flag wins over the file.
        args = make_train_parser().parse_args(["-f", str(path), "--storage-path", "s3://b/x"])
        assert build_experiments(args)["exp"]["storage_path"] == "s3://b/x"


@pytest.mark.parametrize("flags, words", [
    (["--storage-path", "s3://b/x", "--local-dir", "/tmp/y"], "give one of them"),
    (["--restore", "s3://b/x/PG/trial/checkpoint_000001"], "--resume"),
    (["--ray-address", "auto", "--ray-num-cpus", "2"], "ray start --num-cpus"),
])
def test_contradictory_storage_and_cluster_flags_are_refused(flags, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        spec_for(*flags)


def test_local_folder_of():
    assert local_folder_of("/tmp/results") == "/tmp/results"
    assert local_folder_of("file:///tmp/my%20results") == "/tmp/my results"
    assert local_folder_of("s3://bucket/x") is None


def test_a_real_experiment_writes_where_the_file_uri_points(ray_session, tmp_path,
                                                            monkeypatch):
    from ray import tune

    monkeypatch.chdir(tmp_path)  # a mangled URI would show up here as ./file:/...
    uri = (tmp_path / "store").as_uri()  # file:///.../store
    spec = spec_for("--storage-path", uri, "--checkpoint-freq", "1", "--stop",
                    '{"training_iteration": 1}', "--experiment-name", "uri-exp",
                    "--config", json.dumps({**PACED_PG, "num_workers": 0,
                                            "min_iter_time_s": 0}))
    assert spec["storage_path"] == uri
    (trial,) = tune.run_experiments({"uri-exp": spec}, verbose=0)
    assert trial.status == "TERMINATED"
    (trial_dir,) = [d for d in (tmp_path / "store" / "uri-exp").iterdir() if d.is_dir()]
    assert trial.path == str(trial_dir)
    assert (trial_dir / "checkpoint_000000" / "flowrl_checkpoint.json").is_file()
    assert json.loads((trial_dir / "params.json").read_text())["env"] == "CartPole-v1"
    assert [json.loads(line)["training_iteration"]
            for line in (trial_dir / "result.json").read_text().splitlines()] == [1]
    assert not (tmp_path / "file:").exists()


def trial_dirs(experiment_dir: Path) -> list[str]:
    return sorted(d for d in glob.glob(str(experiment_dir / "*")) if os.path.isdir(d))


def interrupt_then_resume(args: list[str], experiment_dir: Path, stop: int,
                          checkpoints_before_interrupt: int = 2,
                          timeout: float = 240) -> tuple[list[int], list[dict]]:
    """Runs ``train.py ARGS`` (which must checkpoint every iteration and stop at
    ``stop``), interrupts it with Ctrl-C (SIGINT) once the trial folder under
    ``experiment_dir`` holds ``checkpoints_before_interrupt`` checkpoints, then runs
    ``train.py ARGS --resume``. Returns the iterations the resumed run printed and the
    trial's result.json rows."""
    first = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dirs = trial_dirs(experiment_dir)
            if dirs and len(glob.glob(os.path.join(dirs[0], "checkpoint_*"))) \
                    >= checkpoints_before_interrupt:
                break
            assert first.poll() is None, "the first run ended before it was interrupted"
            time.sleep(0.2)
        else:
            pytest.fail(f"no {checkpoints_before_interrupt} checkpoints in {timeout} s")
        first.send_signal(signal.SIGINT)  # Tune stops and records the experiment state
        first.wait(timeout=90)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    (trial,) = trial_dirs(experiment_dir)
    assert len(glob.glob(os.path.join(trial, "checkpoint_*"))) < stop, \
        "the first run reached the end before the interruption"

    resumed = subprocess.run([sys.executable, TRAIN, *args, "--resume"], cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    iterations = [int(m) for m in re.findall(r"  iter (\d+)  ts ", resumed.stdout)]
    with open(os.path.join(trial, "result.json")) as f:
        results = [json.loads(line) for line in f if line.strip()]
    return iterations, results


def assert_resumed_to(iterations: list[int], results: list[dict], stop: int,
                      min_steps_per_iteration: int) -> None:
    """The resumed run started from a checkpoint (not iteration 1), ran up to ``stop``,
    and its counters continued from the checkpoint's."""
    assert iterations and iterations[0] > 1, iterations
    assert iterations == list(range(iterations[0], stop + 1)), iterations
    assert results[-1]["training_iteration"] == stop
    # Tune appends: the resumed run's rows start at the last row of its first iteration.
    start = max(i for i, r in enumerate(results) if r["training_iteration"] == iterations[0])
    rows = results[start:]
    assert [r["training_iteration"] for r in rows] == iterations
    steps = [r["timesteps_total"] for r in rows]
    assert steps == sorted(set(steps)), steps
    assert steps[0] >= iterations[0] * min_steps_per_iteration, steps


def test_resume_from_checkpoints_at_a_file_uri(tmp_path):
    store = tmp_path / "store"
    args = ["--run", "PG", "--env", "CartPole-v1", "--config", json.dumps(PACED_PG),
            "--stop", '{"training_iteration": 4}', "--checkpoint-freq", "1",
            "--experiment-name", "resume-uri", "--storage-path", store.as_uri(),
            "--ray-num-cpus", "2"]
    iterations, results = interrupt_then_resume(args, store / "resume-uri", stop=4)
    assert_resumed_to(iterations, results, stop=4, min_steps_per_iteration=100)


def test_local_mode_takes_a_file_uri_and_refuses_remote_storage(tmp_path):
    """--local-mode writes the trial files itself: a file:// URI names its folder; a
    remote URI is refused before anything runs."""
    common = [TRAIN, "--run", "PG", "--env", "CartPole-v1", "--stop",
              '{"training_iteration": 1}', "--checkpoint-at-end", "--local-mode",
              "--config", json.dumps({**PACED_PG, "num_workers": 0, "min_iter_time_s": 0})]
    out = subprocess.run([sys.executable, *common, "--storage-path",
                          (tmp_path / "local").as_uri()],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert glob.glob(str(tmp_path / "local" / "PG" / "*" / "checkpoint_*"))

    out = subprocess.run([sys.executable, *common, "--storage-path", "s3://bucket/x"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 2
    assert "--local-mode writes results to a local folder, not to s3://bucket/x" \
        in out.stderr
