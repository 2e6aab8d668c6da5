"""benchmarks/learning_suite.py without training: rows, configs, SB3 grouping, tables."""

import importlib.util
import os
import sys

import pytest

from flowrl.algorithms.registry import ALGORITHMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def suite():
    path = os.path.join(ROOT, "benchmarks", "learning_suite.py")
    spec = importlib.util.spec_from_file_location("learning_suite", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while it loads
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_every_row_is_runnable(suite):
    names = [row.name for row in suite.ROWS]
    assert len(names) == len(set(names))
    for row in suite.ROWS:
        assert row.algo in ALGORITHMS
        assert row.algo in suite.SB3_ALGO
        assert 0 < row.budget <= 300_000
        config = suite.row_config(row)  # tuned YAMLs exist and match the row's algo/env
        assert isinstance(config, dict)
        if row.config is None:
            assert config == {}


def test_sb3_runs_are_shared_by_rows_with_the_same_mapping(suite):
    groups = suite.sb3_groups(suite.ROWS)
    cartpole_dqn = groups["DQN:CartPole-v1@100000"]
    assert {row.algo for row in cartpole_dqn} == {"DQN", "APEX"}
    assert {row.algo for row in groups["A2C:CartPole-v1@100000"]} == {"PG", "A2C", "IMPALA"}
    assert all(key.split(":")[0] in ("PPO", "A2C", "DQN", "TD3", "SAC") for key in groups)


def test_select_and_markdown(suite):
    rows = suite.select(suite.ROWS, ["PPO:CartPole-v1"])
    assert [row.name for row in rows] == ["PPO:CartPole-v1"]
    assert len(suite.select(suite.ROWS, ["ppo:cartpole"])) == 2  # default and tuned
    with pytest.raises(SystemExit):
        suite.select(suite.ROWS, ["NOPE:Nowhere"])
    row = rows[0]
    records = [
        {"framework": "flowrl", "key": row.name, "budget": row.budget, "seed": 0,
         "ok": True, "final_return": 400.0, "wall_s": 30.0},
        {"framework": "flowrl", "key": row.name, "budget": row.budget, "seed": 1,
         "ok": True, "final_return": 500.0, "wall_s": 50.0},
        {"framework": "sb3", "key": "PPO:CartPole-v1@100000", "algo": "PPO",
         "env": "CartPole-v1", "budget": 100_000, "seed": 0, "ok": False, "wall_s": 1.0,
         "error": "boom"},
    ]
    table = suite.markdown(rows, records, ["flowrl", "sb3"])
    assert "| PPO CartPole-v1 | default | 100,000 | 2 | 450.0 ± 70.7 | 400.0, 500.0 | 40 |" in table
    assert "| PPO | CartPole-v1 | 100,000 | PPO | 0 (+1 failed) | n/a | failed | n/a |" in table
