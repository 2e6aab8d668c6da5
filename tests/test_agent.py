"""The Agent shell: config validation, train/save/restore, trial files, bad input."""

import json
import os

import numpy as np
import pytest
import torch

import flowrl
from flowrl import Agent, get_agent_class
from flowrl.algorithms.checkpoint import MANIFEST_FILE
from flowrl.plans.a2c import A2CAgent
from flowrl.plans.pg import PGAgent
from flowrl.plans.ppo import DEFAULT_CONFIG, PPOAgent

SMALL = {"train_batch_size": 256, "rollout_fragment_length": 32, "sgd_minibatch_size": 64,
         "num_sgd_iter": 2, "seed": 1}


def test_readme_python_example_save_restore_continue(results_dir):
    config = DEFAULT_CONFIG.copy()
    config.update(SMALL)
    agent = PPOAgent(config=config, env="CartPole-v1")
    for _ in range(2):
        result = agent.train()
    assert result["training_iteration"] == 2
    assert result["timesteps_total"] == 512
    for key in ("episode_reward_mean", "episode_len_mean", "episodes_this_iter",
                "timesteps_this_iter", "time_this_iter_s", "time_total_s",
                "num_healthy_workers", "info", "timers"):
        assert key in result
    assert "default_policy" in result["info"]["learner"]
    path = agent.save()
    assert os.path.isfile(os.path.join(path, MANIFEST_FILE))
    # Trial files written outside Tune.
    files = os.listdir(agent.logdir)
    for name in ("params.json", "result.json", "progress.csv"):
        assert name in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    with open(os.path.join(agent.logdir, "result.json")) as f:
        assert len(f.readlines()) == 2
    observations = [np.random.default_rng(i).uniform(-0.2, 0.2, 4).astype(np.float32)
                    for i in range(20)]
    expected = [agent.compute_action(o, explore=False) for o in observations]
    agent.stop()

    fresh = PPOAgent(config=config, env="CartPole-v1")
    fresh.restore(path)
    assert [fresh.compute_action(o, explore=False) for o in observations] == expected
    result = fresh.train()
    assert result["training_iteration"] == 3
    assert result["timesteps_total"] == 768  # counting continues from the checkpoint
    fresh.stop()

    rebuilt = Agent.from_checkpoint(path)
    assert isinstance(rebuilt, PPOAgent)
    assert [rebuilt.compute_action(o, explore=False) for o in observations] == expected
    rebuilt.stop()


def test_checkpoint_holds_only_tensors_loadable_with_weights_only(results_dir, tmp_path):
    agent = PGAgent(config={"train_batch_size": 100, "seed": 0}, env="CartPole-v1")
    agent.train()
    path = agent.save(str(tmp_path / "ckpts" / "ckpt"))
    manifest = json.load(open(os.path.join(path, MANIFEST_FILE)))
    assert manifest["algorithm"] == "PG" and manifest["format_version"] == 1
    assert manifest["env"] == "CartPole-v1" and manifest["iteration"] == 1
    state = torch.load(os.path.join(path, manifest["policies"]["default_policy"]),
                       weights_only=True)
    assert state
    # Saving again to the same path replaces it atomically: no temp dirs are left.
    agent.save(path)
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["ckpt"]
    agent.stop()


def test_get_agent_class_and_unknown_algorithm():
    assert get_agent_class("PPO") is PPOAgent
    assert get_agent_class("A2C") is A2CAgent
    with pytest.raises(ValueError, match=r"Unknown algorithm 'PPOO'\. Did you mean 'PPO'\?"):
        get_agent_class("PPOO")


def test_unknown_config_key_names_the_closest_key():
    with pytest.raises(ValueError, match=r"Unknown config key 'num_worker'\. "
                                         r"Did you mean 'num_workers'\?"):
        PPOAgent(config={"num_worker": 2}, env="CartPole-v1")
    with pytest.raises(ValueError, match=r"Unknown config key 'model.fcnet_hidden'.*"
                                         r"Did you mean 'fcnet_hiddens'\?"):
        PPOAgent(config={"model": {"fcnet_hidden": [32]}}, env="CartPole-v1")


def test_mistyped_and_impossible_values_are_rejected():
    with pytest.raises(ValueError, match=r"'lr' has value 'fast' of type str; expected float"):
        PPOAgent(config={"lr": "fast"}, env="CartPole-v1")
    with pytest.raises(ValueError, match=r"sgd_minibatch_size=512 must be <= "
                                         r"train_batch_size=256"):
        PPOAgent(config={"sgd_minibatch_size": 512, "train_batch_size": 256},
                 env="CartPole-v1")
    with pytest.raises(ValueError, match=r"batch_mode='whole'"):
        PPOAgent(config={"batch_mode": "whole"}, env="CartPole-v1")


def test_unknown_env_id():
    with pytest.raises(ValueError, match=r"Unknown env 'CartPol-v1'.*Did you mean "
                                         r"'CartPole-v1'"):
        PPOAgent(env="CartPol-v1")


def test_missing_and_bad_checkpoints(tmp_path, results_dir):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"Checkpoint not found: .*nope.* does not "
                                                r"exist"):
        Agent.from_checkpoint(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a flowrl checkpoint"):
        Agent.from_checkpoint(str(empty))
    agent = PGAgent(config={"train_batch_size": 100}, env="CartPole-v1")
    path = agent.save(str(tmp_path / "ckpt"))
    manifest_path = os.path.join(path, MANIFEST_FILE)
    manifest = json.load(open(manifest_path))
    manifest["format_version"] = 99
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(ValueError, match=r"format version 99 .* reads format version 1"):
        agent.restore(path)
    manifest["format_version"] = 1
    manifest["algorithm"] = "PPO"
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(ValueError, match=r"was written by PPO, not PG"):
        agent.restore(path)
    agent.stop()


def greedy_returns(agent, seeds):
    """Returns of the agent's greedy policy, played here on fresh CartPole envs."""
    import gymnasium as gym
    returns = []
    for seed in seeds:
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(
                agent.compute_action(obs, explore=False))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return returns


def test_evaluation_interval_reports_greedy_returns(results_dir):
    agent = A2CAgent(config={"evaluation_interval": 1, "evaluation_num_episodes": 3,
                             "seed": 3}, env="CartPole-v1")
    try:
        result = agent.train()
        evaluation = result["evaluation"]
        # The same 3 episodes replayed here: the learner's weights after this
        # iteration, greedy actions, documented seeds seed + 10_000_000 + i. A
        # sampled (exploring) policy or another env stream gives other returns.
        expected = greedy_returns(agent, [3 + 10_000_000 + i for i in range(3)])
        assert evaluation["episodes_this_iter"] == 3
        assert evaluation["episode_reward_mean"] == pytest.approx(np.mean(expected))
        assert evaluation["episode_reward_min"] == min(expected)
        assert evaluation["episode_reward_max"] == max(expected)
        assert evaluation["episode_len_mean"] == pytest.approx(np.mean(expected))
        # Evaluation steps are not training steps.
        assert result["timesteps_total"] == result["timesteps_this_iter"]
        assert agent.train()["evaluation"]["episodes_this_iter"] == 3  # every iteration
    finally:
        agent.stop()


def test_remote_workers_train_and_foreach_worker(ray_session, results_dir):
    config = {**SMALL, "num_workers": 2, "num_cpus_per_worker": 0.5}
    agent = PPOAgent(config=config, env="CartPole-v1")
    result = agent.train()
    assert result["num_healthy_workers"] == 2
    assert result["timesteps_total"] >= 256
    assert agent.workers.foreach_worker(lambda w: w.worker_index) == [0, 1, 2]
    # The workers sample with the weights the learner broadcast after training.
    local = agent.workers.local_worker().get_weights()["default_policy"]
    remote = agent.workers.foreach_worker(lambda w: w.get_weights())[1]["default_policy"]
    for key in local:
        np.testing.assert_allclose(local[key], remote[key])
    agent.stop()


def test_public_api():
    for name in ("Agent", "register_env", "get_agent_class", "SampleBatch",
                 "register_custom_model"):
        assert hasattr(flowrl, name)


def test_dqn_checkpoint_with_replay_buffer(results_dir, tmp_path):
    from flowrl.plans.dqn import DQNAgent
    config = {"learning_starts": 100, "timesteps_per_iteration": 300, "seed": 0,
              "checkpoint_replay_buffer": True}
    agent = DQNAgent(config=config, env="CartPole-v1")
    agent.train()
    size = agent.plan.state["replay"].buffers[0].stats()["size"]
    assert size >= 300
    path = agent.save(str(tmp_path / "dqn"))
    obs = np.zeros(4, np.float32)
    action = agent.compute_action(obs)
    agent.stop()
    fresh = DQNAgent(config=config, env="CartPole-v1")
    fresh.restore(path)
    assert fresh.plan.state["replay"].buffers[0].stats()["size"] == size
    assert fresh.compute_action(obs) == action
    result = fresh.train()
    assert result["replay"]["size"] > size
    fresh.stop()
    # Without the option, the replay buffer is not written.
    plain = DQNAgent(config={**config, "checkpoint_replay_buffer": False}, env="CartPole-v1")
    plain_path = plain.save(str(tmp_path / "plain"))
    assert not os.path.exists(os.path.join(plain_path, "replay.pt"))
    plain.stop()
