"""normalize_rewards: ReturnScaler against a slow reference, and in a real PPO agent."""

import numpy as np
import pytest

from flowrl import get_agent_class
from flowrl.workers.reward_scaling import ReturnScaler


def reference_scaled(rewards: np.ndarray, ended: np.ndarray, gamma: float) -> np.ndarray:
    """Step by step: the discounted return per env, the population std of every return
    seen so far (this row's included), the reward divided by it."""
    seen: list[float] = []
    returns = np.zeros(rewards.shape[1])
    out = np.zeros(rewards.shape)
    for t in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            returns[i] = returns[i] * gamma + rewards[t, i]
        seen.extend(returns.tolist())
        std = np.sqrt(np.var(seen) + 1e-8) if len(seen) >= 2 else 1.0
        for i in range(rewards.shape[1]):
            out[t, i] = min(max(rewards[t, i] / std, -10.0), 10.0)
            if ended[t, i]:
                returns[i] = 0.0
    return out


def test_return_scaler_matches_reference_across_calls():
    rng = np.random.default_rng(0)
    rewards = rng.normal(5.0, 30.0, size=(60, 3)).astype(np.float32)
    ended = rng.random((60, 3)) < 0.1
    scaler = ReturnScaler(num_envs=3, gamma=0.95)
    # Two calls (two fragments): the per-env returns carry over between them.
    got = np.concatenate([scaler.scale(rewards[:25], ended[:25]),
                          scaler.scale(rewards[25:], ended[25:])])
    np.testing.assert_allclose(got, reference_scaled(rewards, ended, 0.95), rtol=1e-4)
    # The sign of every reward is kept (no mean subtraction).
    assert np.array_equal(np.sign(got), np.sign(rewards))


def test_equal_first_returns_do_not_blow_up_the_rewards():
    scaler = ReturnScaler(num_envs=4, gamma=0.99)
    out = scaler.scale(np.ones((3, 4), dtype=np.float32), np.zeros((3, 4), bool))
    assert np.abs(out).max() <= 10.0


def test_ppo_normalize_rewards_scales_batch_but_not_metrics():
    """Pendulum pays about -1000 per episode: the train batch's rewards shrink to about
    unit scale while the reported returns stay in the env's units."""
    config = {"normalize_rewards": True, "train_batch_size": 800,
              "rollout_fragment_length": 100, "num_envs_per_worker": 4,
              "sgd_minibatch_size": 200, "num_sgd_iter": 1, "seed": 0}
    agent = get_agent_class("PPO")(config=config, env="Pendulum-v1", log_to_disk=False)
    try:
        for _ in range(3):
            result = agent.train()
        assert result["episode_reward_mean"] < -300  # raw Pendulum returns
        batch = agent.workers.local_worker().sample()
        raw_scale = 16.2736044  # the largest |reward| Pendulum can pay (pi^2 + 0.1 * 64 + ...)
        assert np.abs(batch["rewards"]).max() < raw_scale / 5
        scaler = agent.workers.local_worker().sampler.reward_scaler
        assert scaler.std > 5.0  # returns of an untrained Pendulum policy spread widely
    finally:
        agent.stop()


def test_normalize_rewards_is_an_on_policy_key():
    with pytest.raises(ValueError, match="normalize_rewards"):
        get_agent_class("DQN")(config={"normalize_rewards": True}, env="CartPole-v1",
                               log_to_disk=False)


def test_normalize_rewards_takes_bools_and_auto_only():
    with pytest.raises(ValueError, match=r"'normalize_rewards' has value 'yes'; expected "
                                         r"True, False or 'auto'"):
        get_agent_class("PPO")(config={"normalize_rewards": "yes"}, env="CartPole-v1",
                               log_to_disk=False)
