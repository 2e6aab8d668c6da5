"""Custom plans: build_agent, user operators (and their names in errors), and every
script in examples/ run with a short budget."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from flowrl import build_agent, get_agent_class
from flowrl.flow import Metrics
from flowrl.ops import ParallelRollouts, StandardMetricsReporting
from flowrl.plans.pg import DEFAULT_CONFIG as PG_CONFIG
from flowrl.policies.pg import PGTorchPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
sys.path.insert(0, os.path.join(ROOT, "examples"))


class ExplodingOperator:
    """A user operator that fails on its third item."""

    def __init__(self):
        self.seen = 0

    def __call__(self, batch):
        self.seen += 1
        if self.seen == 3:
            raise ArithmeticError("the user operator blew up")
        return batch

    def __repr__(self):
        return "ExplodingOperator"


def exploding_plan(workers, config, metrics: Metrics):
    train_op = ParallelRollouts(workers, metrics).for_each(ExplodingOperator())
    return StandardMetricsReporting(train_op, workers, config, metrics)


def test_a_user_operator_error_names_the_operator():
    Exploding = build_agent("ExplodingPG", PG_CONFIG, PGTorchPolicy, exploding_plan)
    assert get_agent_class("ExplodingPG") is Exploding
    agent = Exploding(env="CartPole-v1", config={"rollout_fragment_length": 10,
                                                 "num_envs_per_worker": 1,
                                                 "batch_mode": "truncate_episodes"},
                      log_to_disk=False)
    try:
        with pytest.raises(ArithmeticError, match="the user operator blew up") as info:
            for _ in range(5):
                agent.train()
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "ExplodingOperator" in notes, notes
        assert "ParallelRollouts" in notes  # the chain it sat in
    finally:
        agent.stop()


def test_build_agent_rejects_bad_definitions():
    with pytest.raises(ValueError, match="exactly one of execution_plan= or training_step="):
        build_agent("NoPlan", PG_CONFIG, PGTorchPolicy)
    with pytest.raises(ValueError, match="'PPO' is a built-in algorithm"):
        build_agent("PPO", PG_CONFIG, PGTorchPolicy, exploding_plan)
    with pytest.raises(TypeError, match="policy must be a Policy class"):
        build_agent("BadPolicy", PG_CONFIG, 42, exploding_plan)


def test_build_agent_training_step_variant_checkpoints(tmp_path):
    def one_step(agent):
        batch = agent.workers.local_worker().sample()
        agent.workers.local_worker().learn_on_batch(batch)
        agent.metrics.inc("num_steps_sampled", batch.count)
        return {"timesteps_total": agent.metrics.get("num_steps_sampled"),
                "episode_reward_mean": float("nan")}

    Imperative = build_agent("ImperativePG", PG_CONFIG, PGTorchPolicy, training_step=one_step)
    agent = Imperative(env="CartPole-v1", log_to_disk=False)
    try:
        first = agent.train()
        path = agent.save(str(tmp_path / "checkpoint"))
    finally:
        agent.stop()
    from flowrl import Agent
    restored = Agent.from_checkpoint(path)
    try:
        assert type(restored) is Imperative and restored.iteration == 1
        assert restored.train()["timesteps_total"] > first["timesteps_total"]
    finally:
        restored.stop()


def test_custom_env_example_learns():
    import custom_env
    assert custom_env.main(["--max-iterations", "20"]) >= 0.9


def test_custom_model_example_uses_its_model_and_learns():
    import custom_model
    assert custom_model.main(["--stop-reward", "100", "--max-iterations", "30"]) >= 100


def test_ppo_with_logging_example_counts_its_batches():
    import ppo_with_logging
    result = ppo_with_logging.main(["--stop-reward", "60", "--max-iterations", "30"])
    assert result["episode_reward_mean"] >= 60
    assert result["info"]["num_batches_logged"] == result["training_iteration"]
    assert result["info"]["num_episodes_in_batches"] > 0


@pytest.mark.learning
def test_dqn_replay_schedule_example_learns():
    import dqn_replay_schedule
    result = dqn_replay_schedule.main(["--stop-reward", "120", "--max-iterations", "60"])
    assert result["episode_reward_mean"] >= 120  # budget: 60k env steps


def test_examples_run_from_the_command_line_by_import_string(tmp_path):
    """--run FILE.py:NAME, --env FILE.py:CLASS and a custom_model import string, through
    Tune (trial processes get the code by value) with a remote worker."""
    out = subprocess.run(
        [sys.executable, TRAIN, "--run", "examples/ppo_with_logging.py:PPOWithLogging",
         "--env", "examples/custom_env.py:SimpleCorridor", "--stop",
         '{"training_iteration": 2}', "--local-dir", str(tmp_path), "--ray-num-cpus", "2",
         "--config", json.dumps({
             "num_workers": 1, "env_config": {"corridor_length": 4},
             "model": {"custom_model": "examples/custom_model.py:TrunkAndHeads"}})],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert len(re.findall(r"  iter \d+  ts ", out.stdout)) == 2
    (trial,) = glob.glob(str(tmp_path / "PPOWithLogging" / "*" / "result.json"))
    last = json.loads(open(trial).read().splitlines()[-1])
    assert last["info"]["num_batches_logged"] == 2


def test_every_example_is_exercised_by_a_test():
    examples = [os.path.relpath(p, os.path.join(ROOT, "examples"))
                for p in glob.glob(os.path.join(ROOT, "examples", "**", "*.py"), recursive=True)]
    tests = "\n".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "tests", "*.py")))
    missing = [e for e in examples
               if os.path.splitext(os.path.basename(e))[0] not in tests]
    assert not missing, f"examples no test runs: {missing}"
