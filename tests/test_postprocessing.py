"""Return / advantage computation against slow, plainly written reference loops."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.policies import A2CTorchPolicy, PGTorchPolicy, PPOTorchPolicy
from flowrl.policies.postprocessing import compute_advantages, discount_cumsum
from flowrl.data.sample_batch import SampleBatch

GAMMA = 0.97
LAMBDA = 0.9


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    # Tiny nets: one thread is faster and avoids oversubscribing a shared CI box.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------- references
def ref_discount_cumsum(x, gamma):
    out = [0.0] * len(x)
    running = 0.0
    for t in reversed(range(len(x))):
        running = float(x[t]) + gamma * running
        out[t] = running
    return np.array(out)


def ref_gae(rewards, values, last_r, gamma, lambda_):
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = last_r if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lambda_ * running
        advantages[t] = running
    advantages = np.array(advantages)
    return advantages, advantages + np.array(values)


def ref_returns(rewards, last_r, gamma):
    returns = [0.0] * len(rewards)
    running = last_r
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        returns[t] = running
    return np.array(returns)


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 2, 17, 300, 9000])
def test_discount_cumsum_matches_reference(gamma, n):
    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    got = discount_cumsum(x, gamma)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, ref_discount_cumsum(x, gamma), rtol=1e-4, atol=1e-4)


def test_discount_cumsum_edge_cases():
    assert discount_cumsum(np.zeros(0), 0.9).shape == (0,)
    np.testing.assert_allclose(discount_cumsum(np.array([1, 2, 3]), 0.5), [2.75, 3.5, 3.0])
    x = np.arange(12.0).reshape(6, 2)
    got = discount_cumsum(x, 0.8)
    for col in range(2):
        np.testing.assert_allclose(got[:, col], ref_discount_cumsum(x[:, col], 0.8))


def random_fragment(n, seed=0):
    rng = np.random.default_rng(seed)
    return SampleBatch(
        rewards=rng.normal(size=n).astype(np.float32),
        vf_preds=rng.normal(size=n).astype(np.float32),
    )


@pytest.mark.parametrize("last_r", [0.0, 1.7])
def test_gae_matches_reference(last_r):
    batch = random_fragment(50)
    out = compute_advantages(batch, last_r, GAMMA, LAMBDA, use_gae=True, use_critic=True)
    assert out is batch
    adv, targets = ref_gae(batch["rewards"], batch["vf_preds"], last_r, GAMMA, LAMBDA)
    assert out["advantages"].dtype == np.float32 and out["value_targets"].dtype == np.float32
    np.testing.assert_allclose(out["advantages"], adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["value_targets"], targets, rtol=1e-5, atol=1e-5)


def test_critic_without_gae_uses_discounted_returns():
    batch = random_fragment(40, seed=1)
    compute_advantages(batch, 2.5, GAMMA, use_gae=False, use_critic=True)
    returns = ref_returns(batch["rewards"], 2.5, GAMMA)
    np.testing.assert_allclose(batch["value_targets"], returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["advantages"], returns - batch["vf_preds"], rtol=1e-5, atol=1e-5)


def test_no_critic_returns():
    batch = SampleBatch(rewards=np.ones(5, dtype=np.float32))
    compute_advantages(batch, 0.0, 0.5, use_gae=False, use_critic=False)
    expected = ref_returns([1.0] * 5, 0.0, 0.5)
    np.testing.assert_allclose(batch["advantages"], expected)
    np.testing.assert_allclose(batch["value_targets"], expected)
    with pytest.raises(ValueError, match="critic"):
        compute_advantages(SampleBatch(rewards=[1.0]), 0.0, 0.9, use_gae=True, use_critic=False)


# ----------------------------------------------- policy bootstrap rule (DESIGN §4)
CARTPOLE = gym.make("CartPole-v1")


def rollout_fragment(policy, n, seed=0):
    """A real one-episode CartPole fragment of n steps (with the policy's vf_preds)."""
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    rows = {k: [] for k in ("obs", "new_obs", "actions", "rewards", "terminateds", "truncateds")}
    extras = []
    for _ in range(n):
        actions, extra = policy.compute_actions(obs[None])
        new_obs, reward, terminated, truncated, _ = env.step(int(actions[0]))
        for key, value in zip(rows, (obs, new_obs, actions[0], reward, terminated, truncated)):
            rows[key].append(value)
        extras.append(extra)
        obs = new_obs
        if terminated or truncated:
            break
    batch = SampleBatch(rows)
    for key in extras[0]:
        batch[key] = np.concatenate([e[key] for e in extras])
    batch["eps_id"] = np.zeros(batch.count, dtype=np.int64)
    return batch


def set_end(batch, terminated, truncated):
    batch["terminateds"] = np.zeros(batch.count, dtype=bool)
    batch["truncateds"] = np.zeros(batch.count, dtype=bool)
    batch["terminateds"][-1] = terminated
    batch["truncateds"][-1] = truncated
    return batch


@pytest.mark.parametrize("policy_cls", [A2CTorchPolicy, PPOTorchPolicy])
@pytest.mark.parametrize("end", ["terminated", "truncated", "cut"])
def test_gae_bootstrap_rule(policy_cls, end):
    config = {"seed": 0, "gamma": GAMMA, "lambda": LAMBDA, "use_gae": True}
    policy = policy_cls(CARTPOLE.observation_space, CARTPOLE.action_space, config)
    batch = set_end(rollout_fragment(policy, 8), end == "terminated", end == "truncated")
    if end == "terminated":
        last_r = 0.0
    else:
        last_r = float(policy.value(batch["new_obs"][-1:])[0])
        assert last_r != 0.0
    adv, targets = ref_gae(batch["rewards"], batch["vf_preds"], last_r, GAMMA, LAMBDA)
    out = policy.postprocess_trajectory(batch)
    np.testing.assert_allclose(out["advantages"], adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["value_targets"], targets, rtol=1e-5, atol=1e-5)


def test_nstep_returns_bootstrap_from_new_obs_when_truncated():
    config = {"seed": 1, "gamma": GAMMA, "use_gae": False}
    policy = A2CTorchPolicy(CARTPOLE.observation_space, CARTPOLE.action_space, config)
    batch = set_end(rollout_fragment(policy, 6), False, True)
    last_r = float(policy.value(batch["new_obs"][-1:])[0])
    returns = ref_returns(batch["rewards"], last_r, GAMMA)
    out = policy.postprocess_trajectory(batch)
    np.testing.assert_allclose(out["value_targets"], returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], returns - batch["vf_preds"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("end", ["terminated", "truncated"])
def test_pg_returns_never_bootstrap(end):
    policy = PGTorchPolicy(CARTPOLE.observation_space, CARTPOLE.action_space, {"seed": 0, "gamma": GAMMA})
    batch = set_end(rollout_fragment(policy, 7), end == "terminated", end == "truncated")
    assert "vf_preds" not in batch
    out = policy.postprocess_trajectory(batch)
    expected = ref_returns(batch["rewards"], 0.0, GAMMA)
    np.testing.assert_allclose(out["advantages"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["value_targets"], expected, rtol=1e-6)


def test_fragment_with_two_episodes_is_processed_per_episode():
    config = {"seed": 0, "gamma": GAMMA, "lambda": LAMBDA}
    policy = PPOTorchPolicy(CARTPOLE.observation_space, CARTPOLE.action_space, config)
    first = set_end(rollout_fragment(policy, 5, seed=1), True, False)
    second = set_end(rollout_fragment(policy, 4, seed=2), False, False)
    second["eps_id"] = np.ones(4, dtype=np.int64)
    both = policy.postprocess_trajectory(first.concat(second))
    expected_first = policy.postprocess_trajectory(first.copy())["advantages"]
    expected_second = policy.postprocess_trajectory(second.copy())["advantages"]
    np.testing.assert_allclose(both["advantages"], np.concatenate([expected_first, expected_second]))
