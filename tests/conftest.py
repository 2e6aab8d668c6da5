"""Shared fixtures: Ray is started once per test session and shut down at the end."""

import os

import pytest
import ray

# Learning tests and benchmarks compare numbers across runs: keep torch to the machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A Ray instance shared by all tests that need actors (2 CPUs, no dashboard)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    # Finalize leftover Ray objects now: left to run during pytest's end-of-session
    # imports (the hypothesis plugin's ast.parse), they trip CPython 3.11.7's "AST
    # constructor recursion depth mismatch" after a test whose learner thread crashed.
    import gc
    gc.collect()


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """Points ~/ray_results of Agents used outside Tune to a temporary directory."""
    import flowrl.algorithms.agent
    monkeypatch.setattr(flowrl.algorithms.agent, "DEFAULT_RESULTS_DIR",
                        str(tmp_path / "ray_results"))
    return tmp_path / "ray_results"
