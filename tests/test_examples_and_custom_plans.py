"""Custom plans: build_agent, user operators (and their names in errors), and every
script in examples/ run with a short budget."""

import glob
import json
import os
import re
import subprocess
import sys

import gymnasium as gym
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
    """Iterations of 1000 env steps until the mean return reaches 120: 15k steps on
    each of seeds 0-2."""
    import dqn_replay_schedule
    from learning_bars import SeedRun, two_of_three

    def run_seed(seed: int, budget: int) -> SeedRun:
        result = dqn_replay_schedule.main(["--stop-reward", "120", "--seed", str(seed),
                                           "--max-iterations", str(budget // 1000)])
        reached = result["episode_reward_mean"] >= 120
        return SeedRun(seed, result["timesteps_total"] if reached else None,
                       [(result["timesteps_total"], result["episode_reward_mean"])])

    two_of_three(run_seed, budget=30_000, typical=15_000,
                 what="examples/dqn_replay_schedule.py to 120")


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


def test_serve_checkpoint_example_answers_a_client_process(tmp_path, results_dir):
    """examples/serving/serve_checkpoint.py as a user runs it: a checkpoint served over
    HTTP by one process, examples/serving/cartpole_client.py playing against it from
    another, and the served actions equal the checkpoint's own greedy actions."""
    from flowrl.envs.serving import PolicyClient
    agent = get_agent_class("PPO")(config={"train_batch_size": 400, "seed": 0,
                                           "rollout_fragment_length": 50,
                                           "sgd_minibatch_size": 100, "num_sgd_iter": 1},
                                   env="CartPole-v1")
    agent.train()
    checkpoint = agent.save(str(tmp_path / "ckpt"))
    server = subprocess.Popen(
        [sys.executable, "examples/serving/serve_checkpoint.py", checkpoint, "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = []
        for line in server.stdout:  # ends when the server exits
            printed.append(line)
            match = re.search(r"listening on (http://[\d.]+:(\d+))", line)
            if match:
                break
        assert match, "".join(printed)
        url, port = match.groups()
        client = subprocess.run(
            [sys.executable, "examples/serving/cartpole_client.py", "--port", port,
             "--episodes", "10", "--seed", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert client.returncode == 0, (client.stdout + client.stderr)[-4000:]
        # The client prints a line every 10 episodes and says so if the server went away.
        assert re.search(r"^episode +10 ", client.stdout, re.M), client.stdout
        assert "server went away" not in client.stdout, client.stdout
        remote = PolicyClient(url)
        for seed in range(5):
            obs, _ = gym.make("CartPole-v1").reset(seed=seed)
            episode = remote.start_episode(training_enabled=False)
            assert remote.get_action(episode, obs) == agent.compute_action(obs, explore=False)
            remote.end_episode(episode, obs)
    finally:
        server.terminate()
        server.wait(timeout=60)
        agent.stop()


# Every script in examples/ and the test that runs it. A new example fails
# test_every_example_has_a_test until it is added here with its test.
EXAMPLE_TESTS = {
    "custom_env.py": "test_examples_and_custom_plans.py::test_custom_env_example_learns",
    "custom_model.py":
        "test_examples_and_custom_plans.py::test_custom_model_example_uses_its_model_and_learns",
    "dqn_replay_schedule.py":
        "test_examples_and_custom_plans.py::test_dqn_replay_schedule_example_learns",
    "pettingzoo_selfplay.py":
        "test_pettingzoo.py::test_selfplay_example_beats_a_random_player",
    "ppo_with_logging.py":
        "test_examples_and_custom_plans.py::test_ppo_with_logging_example_counts_its_batches",
    "serving/cartpole_client.py":
        "test_serving.py::test_server_example_trains_dqn_with_a_client_process",
    "serving/cartpole_server.py":
        "test_serving.py::test_server_example_trains_dqn_with_a_client_process",
    "serving/serve_checkpoint.py":
        "test_examples_and_custom_plans.py::test_serve_checkpoint_example_answers_a_client_process",
    "two_trainer_workflow.py": "test_multi_agent.py::test_two_trainer_workflow_learns_both_policies",
}


def test_every_example_has_a_test():
    examples = sorted(os.path.relpath(p, os.path.join(ROOT, "examples"))
                      for p in glob.glob(os.path.join(ROOT, "examples", "**", "*.py"),
                                         recursive=True))
    assert sorted(EXAMPLE_TESTS) == examples, (
        "examples/ and EXAMPLE_TESTS differ: add each new example with the test that runs it")
    for example, test in EXAMPLE_TESTS.items():
        file_name, test_name = test.split("::")
        source = open(os.path.join(ROOT, "tests", file_name)).read()
        # The test exists, and its file names the example (imports it or runs its path).
        assert f"def {test_name}(" in source, f"{example}: {test} does not exist"
        module = os.path.splitext(os.path.basename(example))[0]
        assert module in source, f"{file_name} does not run examples/{example}"
