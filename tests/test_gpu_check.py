"""benchmarks/gpu_check.py: the --smoke run end to end, and its tables from given figures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_json_and_table(tmp_path):
    pytest.importorskip("ale_py")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    meta = data["meta"]
    assert meta["smoke"] is True
    assert meta["cpu_count"] == os.cpu_count()
    for key in ("torch", "ray", "gymnasium", "ale_py", "python", "gpu", "cuda"):
        assert key in meta
    assert data["errors"] == []

    cells = {(c["algo"], c["device"]): c for c in data["learner_timing"]}
    for algo in ("PPO", "DQN"):
        cell = cells[(algo, "cpu")]
        assert cell["batch"] == 64 and len(cell["steps_s"]) >= 3
        assert cell["median_s"] > 0 and cell["rows_per_s"] > 0
        assert ((algo, "cuda") in cells) == meta["cuda"]

    assert len(data["apex"]) >= 1
    run = data["apex"][0]
    assert run["config"]["num_workers"] == 2
    assert len(run["iterations"]) >= 2
    for record in run["iterations"]:
        for key in ("sampled_steps_per_s", "trained_rows_per_s", "episode_reward_mean"):
            assert key in record
    summary = run["summary"]
    assert summary["sampled_steps_per_s"] > 0
    assert summary["trained_rows_per_s"] > 0
    assert summary["total_trained"] > 0

    table = (out / "gpu_check.md").read_text()
    assert "## GPU check:" in table
    assert "| PPO (" in table and "| DQN (" in table
    assert "sampled agent steps/s (frames/s)" in table
    assert table in proc.stdout  # printed as well
    if not meta["cuda"]:
        assert "no CUDA device" in table


def test_markdown_and_summary_from_given_figures():
    gc = _load_module()
    iterations = [
        {"iteration": 1, "time_s": 15.0, "sampled_steps_per_s": 9000.0,
         "trained_rows_per_s": 0.0, "num_steps_sampled": 135_000, "num_steps_trained": 0,
         "episode_reward_mean": 1.5, "episode_reward_max": 4.0},
        {"iteration": 2, "time_s": 30.0, "sampled_steps_per_s": 15000.0,
         "trained_rows_per_s": 20000.0, "num_steps_sampled": 360_000,
         "num_steps_trained": 300_000, "episode_reward_mean": float("nan"),
         "episode_reward_max": float("nan")},
        {"iteration": 3, "time_s": 45.0, "sampled_steps_per_s": 16000.0,
         "trained_rows_per_s": 22000.0, "num_steps_sampled": 600_000,
         "num_steps_trained": 630_000, "episode_reward_mean": 12.0,
         "episode_reward_max": 30.0},
    ]
    run = {"label": "gpu_learner", "num_gpus": 1, "learner_device": "cuda",
           "config": {"num_workers": 14, "num_envs_per_worker": 4}, "iterations": iterations}
    summary = gc.summarize_apex(run)
    # The window starts at the first iteration that trained (iteration 2).
    assert summary["window_s"] == 15.0
    assert summary["sampled_steps_per_s"] == pytest.approx(240_000 / 15)
    assert summary["frames_per_s"] == pytest.approx(4 * 240_000 / 15)
    assert summary["trained_rows_per_s"] == pytest.approx(330_000 / 15)
    assert summary["return_first"] == 1.5 and summary["return_last"] == 12.0
    assert summary["return_max"] == 30.0 and summary["return_rising"] is True
    run["summary"] = summary

    cell = {"batch": 4096, "torch_threads": 16, "median_s": 2.0, "rows_per_s": 2048.0}
    data = {
        "meta": {"gpu": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "argv": ["--out", "x"],
                 "started": "now", "cpu_model": "cpu", "memory_gib": 128, "python": "3.12",
                 "torch": "2.11", "cuda_version": "13.0", "ray": "2.60.0",
                 "gymnasium": "1.4.0", "ale_py": "0.12.1", "flowrl_commit": "abc",
                 "smoke": False},
        "learner_timing": [
            {**cell, "algo": "PPO", "device": "cpu", "sgd": "1 SGD pass, minibatch 4096"},
            {**cell, "algo": "PPO", "device": "cuda", "sgd": "1 SGD pass, minibatch 4096",
             "median_s": 0.05, "rows_per_s": 81920.0},
            {**cell, "algo": "DQN", "device": "cpu", "sgd": "one SGD step"},
        ],
        "apex": [run], "skipped": [], "errors": [],
    }
    table = gc.markdown(data)
    assert "## GPU check: NVIDIA H100 80GB HBM3, 16 CPU cores" in table
    assert "| PPO (1 SGD pass, minibatch 4096) | 2.00 s (2,048 rows/s) | 50.0 ms " \
           "(81,920 rows/s) | 40.0x |" in table
    assert "| DQN (one SGD step) | 2.00 s (2,048 rows/s) | - | - |" in table
    assert "| GPU (`num_gpus: 1`) | CPU | 15 | 16,000 (64,000) | 22,000 |" in table
    # The phase whose workers act on the GPU says so in its row.
    data["apex"] = [{**run, "label": "gpu_learner_gpu_workers", "num_gpus": 0.44,
                     "num_gpus_per_worker": 0.04}]
    assert "| GPU (`num_gpus: 0.44`) | GPU (0.04 each) | 15 | 16,000 (64,000) |" \
        in gc.markdown(data)
    assert "| 2 | 30 | 15,000 | 20,000 | - | - |" in table  # NaN returns shown as "-"
    assert not any(math.isnan(v) for v in (summary["return_first"], summary["return_last"]))


def test_defaults_fit_the_device_limits():
    """The full run's defaults stay inside the device machine's 10-minute command limit
    with room for the wheel install, and smoke mode shrinks everything."""
    gc = _load_module()
    full = gc.parse_args([])
    assert full.budget_s <= 450
    assert full.apex_seconds + full.gpu_workers_seconds + full.cpu_learner_seconds \
        < full.budget_s
    assert full.num_envs_per_worker == 16
    assert full.learner_batch == 4096
    smoke = gc.parse_args(["--smoke"])
    assert smoke.budget_s <= 150 and smoke.learner_batch == 64 and smoke.num_workers == 2
