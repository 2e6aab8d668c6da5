"""SAC: the tanh log-prob correction, the soft targets and the three losses (Box and
Discrete) against slow per-sample references, temperature tuning, acting, state and
export, and the agent on Box, Discrete and Dict-observation envs.

References read the networks' weights and compute one sample at a time in float64;
everything runs on real gymnasium spaces and real transitions.
"""

import io
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import distributions as D
from torch import nn

import spaces_envs
from flowrl.data.sample_batch import SampleBatch
from flowrl.plans.sac import DEFAULT_CONFIG, SACAgent
from flowrl.policies.dqn import GAMMAS, TD_ERROR
from flowrl.policies.sac import SACTorchPolicy, resolve_target_entropy
from flowrl.policies.sac_networks import squashed_gaussian_logp, tanh_log_det_jacobian

PENDULUM = gym.make("Pendulum-v1")
OBS_SPACE = PENDULUM.observation_space
ACT_SPACE = PENDULUM.action_space  # Box(-2, 2, (1,))
ASYM = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 5.0], np.float32))
MIXED = gym.spaces.Box(np.array([-1.0, -np.inf], np.float32), np.array([1.0, np.inf], np.float32))
ACROBOT = gym.make("Acrobot-v1")  # Discrete(3) actions, 6-dim observations
SMALL = {"actor_hiddens": [32, 32], "critic_hiddens": [32, 32]}
GAMMA = 0.95


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    # Tiny nets: one thread is faster and avoids oversubscribing a shared CI box.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_policy(action_space=ACT_SPACE, obs_space=OBS_SPACE, **overrides) -> SACTorchPolicy:
    return SACTorchPolicy(obs_space, action_space, {"seed": 0, "gamma": GAMMA, **SMALL,
                                                    **overrides})


def transitions(env_id: str, n: int, seed: int = 0, action_space=None) -> SampleBatch:
    """Real transitions of ``env_id`` under random actions (from ``action_space``, default
    the env's), with random terminations and random ``gammas = GAMMA ** m`` (m in 1..3)."""
    env = gym.make(env_id)
    space = action_space or env.action_space
    space.seed(seed)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = {k: [] for k in ("obs", "new_obs", "actions", "rewards")}
    for _ in range(n):
        action = space.sample()
        env_action = np.clip(action[:1], -2.0, 2.0) if env_id == "Pendulum-v1" else action
        new_obs, reward, terminated, truncated, _ = env.step(env_action)
        for key, value in zip(rows, (obs, new_obs, action, reward)):
            rows[key].append(value)
        obs = new_obs if not (terminated or truncated) else env.reset()[0]
    batch = SampleBatch({k: np.asarray(v) for k, v in rows.items()})
    for key in ("obs", "new_obs", "rewards"):
        batch[key] = batch[key].astype(np.float32)
    batch["terminateds"] = rng.random(n) < 0.3
    batch[GAMMAS] = (GAMMA ** rng.integers(1, 4, n)).astype(np.float32)
    return batch


def set_alpha(policy: SACTorchPolicy, alpha: float) -> None:
    with torch.no_grad():
        policy.log_alpha.fill_(math.log(alpha))


def perturb(module: nn.Module, seed: int, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------ slow references
def mlp_reference(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """ONE input through the Linear layers of ``module`` (ReLU between), in float64."""
    layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
              for m in module.modules() if isinstance(m, nn.Linear)]
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = w @ h + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def ensemble_reference(critic: nn.Module, k: int, x: np.ndarray) -> np.ndarray:
    """Critic ``k`` of a stacked ensemble on ONE input (obs, or concat(obs, u))."""
    h = x.astype(np.float64)
    names = critic._layer_names
    for i, (wn, bn) in enumerate(names):
        h = h @ getattr(critic, wn)[k].detach().double().numpy() \
            + getattr(critic, bn)[k, 0].detach().double().numpy()
        if i < len(names) - 1:
            h = np.maximum(h, 0.0)
    return h


def gaussian_actor_reference(policy, obs: np.ndarray, eps: np.ndarray):
    """``(u, log pi(u))`` of ONE squashed-Gaussian sample, all dimensions bounded."""
    out = mlp_reference(policy.model.actor, obs)
    act_dim = out.shape[0] // 2
    mean, log_std = out[:act_dim], np.clip(out[act_dim:], -20.0, 2.0)
    x = mean + np.exp(log_std) * eps.astype(np.float64)
    gauss = -0.5 * ((x - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
    # The change of variables of u = tanh(x), written out directly.
    return np.tanh(x), float(np.sum(gauss - np.log(1.0 - np.tanh(x) ** 2)))


def box_target_reference(policy, batch, noise) -> np.ndarray:
    alpha = float(policy.alpha)
    num_critics = policy.target_critic.num_critics
    out = []
    for i in range(batch.count):
        s2 = batch["new_obs"][i]
        u, logp = gaussian_actor_reference(policy, s2, noise[i])
        q = min(float(ensemble_reference(policy.target_critic, k, np.concatenate([s2, u]))[0])
                for k in range(num_critics))
        soft = q - alpha * logp
        done = float(batch["terminateds"][i])
        out.append(float(batch["rewards"][i]) + float(batch[GAMMAS][i]) * (1 - done) * soft)
    return np.array(out)


def discrete_target_reference(policy, batch) -> np.ndarray:
    alpha = float(policy.alpha)
    num_critics = policy.target_critic.num_critics
    out = []
    for i in range(batch.count):
        s2 = batch["new_obs"][i]
        logits = mlp_reference(policy.model.actor, s2)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        q = np.min([ensemble_reference(policy.target_critic, k, s2)
                    for k in range(num_critics)], axis=0)
        soft = sum(probs[a] * (q[a] - alpha * np.log(probs[a])) for a in range(len(probs)))
        done = float(batch["terminateds"][i])
        out.append(float(batch["rewards"][i]) + float(batch[GAMMAS][i]) * (1 - done) * soft)
    return np.array(out)


# -------------------------------------------------------------- construction
@pytest.mark.parametrize("space,words", [
    (gym.spaces.MultiDiscrete([2, 3]), ["SAC", "MultiDiscrete", "PPO"]),
    (gym.spaces.MultiBinary(3), ["SAC", "MultiBinary", "IMPALA"]),
    (gym.spaces.Tuple([gym.spaces.Discrete(2)] * 2), ["SAC", "Tuple", "PPO"]),
    (gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (1,))}), ["SAC", "Dict", "ES"]),
])
def test_unsupported_action_spaces_name_sac_the_space_and_the_alternatives(space, words):
    with pytest.raises(ValueError) as info:
        SACTorchPolicy(OBS_SPACE, space, {})
    for word in words:
        assert word in str(info.value)


def test_rejected_models_and_observations():
    message = "use_lstm is for the on-policy algorithms PPO, A2C, A3C, PG and IMPALA"
    with pytest.raises(ValueError, match=message):
        SACTorchPolicy(OBS_SPACE, ACT_SPACE, {"model": {"use_lstm": True}})
    with pytest.raises(ValueError, match=message):
        SACAgent.merge_config({"env": "Pendulum-v1", "model": {"use_lstm": True}})
    with pytest.raises(ValueError, match="custom_model"):
        SACTorchPolicy(OBS_SPACE, ACT_SPACE, {"model": {"custom_model": "mine"}})
    masked = gym.spaces.Dict({"action_mask": gym.spaces.Box(0, 1, (3,), np.int8),
                              "observations": OBS_SPACE})
    with pytest.raises(ValueError, match="action_mask.*PPO or DQN"):
        SACTorchPolicy(masked, gym.spaces.Discrete(3), {})


@pytest.mark.parametrize("overrides,words", [
    ({"tau": 0.0}, "tau=0.0 must be in (0, 1]"),
    ({"initial_alpha": 0.0}, "initial_alpha=0.0 must be > 0"),
    ({"alpha_lr": -1.0}, "alpha_lr=-1.0 must be >= 0"),
    ({"target_entropy": "high"}, "target_entropy='high'; expected a number, 'auto'"),
    ({"target_entropy": True}, "target_entropy=True"),
    ({"actor_hiddens": [64, 0]}, "actor_hiddens=[64, 0]"),
    ({"exploration_config": {"random_timesteps": -5}}, "random_timesteps=-5"),
    ({"buffer_size": 10}, "buffer_size=10 must be >= train_batch_size=256"),
    ({"entropy_lr": 1e-3}, "Unknown config key 'entropy_lr'"),
    ({"policy_delay": 2}, "Unknown config key 'policy_delay'"),
])
def test_config_errors_name_the_key(overrides, words):
    with pytest.raises(ValueError) as info:
        SACAgent.merge_config({"env": "Pendulum-v1", **overrides})
    assert words in str(info.value)


def test_defaults_and_target_entropy():
    config = SACAgent.merge_config({"env": "Pendulum-v1", "target_entropy": -0.5})
    assert config["target_entropy"] == -0.5
    assert (DEFAULT_CONFIG["actor_lr"], DEFAULT_CONFIG["critic_lr"],
            DEFAULT_CONFIG["alpha_lr"]) == (3e-4, 3e-4, 3e-4)
    assert DEFAULT_CONFIG["tau"] == 0.005 and DEFAULT_CONFIG["train_batch_size"] == 256
    policy = SACTorchPolicy(OBS_SPACE, ASYM, {})
    assert policy.target_entropy == -2.0 and float(policy.alpha) == pytest.approx(1.0)
    assert policy.model.critic.num_critics == 2
    assert resolve_target_entropy("auto", gym.spaces.Box(-1, 1, (2, 3))) == -6.0
    assert resolve_target_entropy(None, gym.spaces.Discrete(4)) == pytest.approx(0.5 * np.log(4))
    assert resolve_target_entropy(0.3, gym.spaces.Discrete(4)) == 0.3
    assert make_policy(initial_alpha=0.2).alpha.item() == pytest.approx(0.2)
    # Three optimizers over disjoint parameter sets.
    groups = [{id(p) for g in opt.param_groups for p in g["params"]}
              for opt in (policy.actor_optimizer, policy.critic_optimizer, policy.alpha_optimizer)]
    assert groups[0] == {id(p) for p in policy.model.actor.parameters()}
    assert groups[1] == {id(p) for p in policy.model.critic.parameters()}
    assert groups[2] == {id(policy.log_alpha)}


# ------------------------------------------------------ tanh log-prob correction
def test_tanh_log_prob_matches_torch_transformed_distribution():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    log_std = torch.randn(64, 3, generator=gen, dtype=torch.float64).clamp(-2, 1)
    x = mean + log_std.exp() * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    reference = D.Independent(D.TransformedDistribution(
        D.Normal(mean, log_std.exp()), [D.TanhTransform()]), 1)
    torch.testing.assert_close(squashed_gaussian_logp(x, mean, log_std),
                               reference.log_prob(torch.tanh(x)), rtol=1e-8, atol=1e-8)
    # Stable where tanh(x) rounds to 1 in float32 (the torch reference is inf there).
    big = torch.tensor([[12.0, -15.0, 30.0]])
    expected = 2 * (math.log(2) - big.abs() - nn.functional.softplus(-2 * big.abs()))
    assert torch.isfinite(tanh_log_det_jacobian(big)).all()
    torch.testing.assert_close(tanh_log_det_jacobian(big), expected)
    # Scaling to the env's bounds adds only a constant: -sum(log half_range).
    half_range = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    env_dist = D.Independent(D.TransformedDistribution(
        D.Normal(mean, log_std.exp()),
        [D.TanhTransform(), D.AffineTransform(torch.zeros_like(half_range), half_range)]), 1)
    torch.testing.assert_close(env_dist.log_prob(torch.tanh(x) * half_range),
                               squashed_gaussian_logp(x, mean, log_std) - math.log(2.0 * 0.5))


def test_mixed_bounds_squash_and_correct_only_the_bounded_dimensions():
    policy = make_policy(MIXED)
    obs = torch.from_numpy(np.stack([OBS_SPACE.sample() for _ in range(32)]))
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        u, logp = policy.model.actor.sample(obs, noise)
        mean, log_std = policy.model.actor(obs)
    x = mean + log_std.exp() * noise
    torch.testing.assert_close(u[:, 0], torch.tanh(x[:, 0]))
    torch.testing.assert_close(u[:, 1], x[:, 1])
    bounded = D.TransformedDistribution(D.Normal(mean[:, 0], log_std[:, 0].exp()),
                                        [D.TanhTransform()])
    unbounded = D.Normal(mean[:, 1], log_std[:, 1].exp())
    expected = bounded.log_prob(u[:, 0]) + unbounded.log_prob(x[:, 1])
    torch.testing.assert_close(logp, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- Box losses
@pytest.mark.parametrize("twin_q", [True, False])
def test_box_critic_target_matches_slow_reference(twin_q):
    policy = make_policy(twin_q=twin_q)
    set_alpha(policy, 0.3)
    perturb(policy.target_critic, seed=1)
    perturb(policy.model.actor, seed=2, std=0.2)
    batch = transitions("Pendulum-v1", 48, seed=3)
    noise = np.random.default_rng(7).standard_normal((48, 1)).astype(np.float32)
    got = policy.compute_critic_target(batch, noise=noise)
    np.testing.assert_allclose(got, box_target_reference(policy, batch, noise),
                               rtol=1e-4, atol=1e-4)
    done = batch["terminateds"]
    np.testing.assert_allclose(got[done], batch["rewards"][done], rtol=1e-6)
    # The entropy term: a larger alpha raises every bootstrapped target (logp < 0 here
    # would lower it; the signs follow -alpha * logp row by row).
    set_alpha(policy, 0.6)
    higher = policy.compute_critic_target(batch, noise=noise)
    logp = np.array([gaussian_actor_reference(policy, s, n)[1]
                     for s, n in zip(batch["new_obs"], noise)])
    bootstrap = batch[GAMMAS] * (1 - done)
    np.testing.assert_allclose(higher - got, -0.3 * bootstrap * logp, rtol=1e-3, atol=1e-4)


def test_box_losses_match_slow_references():
    policy = make_policy()
    set_alpha(policy, 0.4)
    perturb(policy.target_critic, seed=3)
    batch = transitions("Pendulum-v1", 40, seed=4)
    weights = np.random.default_rng(1).uniform(0.2, 2.0, 40).astype(np.float32)
    batch["weights"] = weights
    rng = np.random.default_rng(5)
    target_noise = rng.standard_normal((40, 1)).astype(np.float32)
    actor_noise = rng.standard_normal((40, 1)).astype(np.float32)
    targets = box_target_reference(policy, batch, target_noise)
    u_taken = batch["actions"] / 2.0  # Pendulum: half range 2
    critic_rows, td1, actor_rows, logps = [], [], [], []
    for i in range(40):
        s = batch["obs"][i]
        qs = [float(ensemble_reference(policy.model.critic, k, np.concatenate([s, u_taken[i]]))[0])
              for k in range(2)]
        critic_rows.append(sum(0.5 * (q - targets[i]) ** 2 for q in qs))
        td1.append(abs(qs[0] - targets[i]))
        u, logp = gaussian_actor_reference(policy, s, actor_noise[i])
        q_pi = min(float(ensemble_reference(policy.model.critic, k, np.concatenate([s, u]))[0])
                   for k in range(2))
        actor_rows.append(0.4 * logp - q_pi)
        logps.append(logp)
    stats = policy.evaluate_loss(batch, target_noise=target_noise, actor_noise=actor_noise)
    assert stats["critic_loss"] == pytest.approx(np.mean(np.array(critic_rows) * weights), rel=1e-4)
    assert stats["mean_td_error"] == pytest.approx(np.mean(td1), rel=1e-4)
    assert stats["actor_loss"] == pytest.approx(np.mean(actor_rows), rel=1e-4, abs=1e-5)
    expected_alpha_loss = -np.log(0.4) * np.mean(np.array(logps) + policy.target_entropy)
    assert stats["alpha_loss"] == pytest.approx(expected_alpha_loss, rel=1e-4, abs=1e-6)
    assert stats["entropy"] == pytest.approx(-np.mean(logps), rel=1e-4)
    # learn_on_batch reports every stat and |td_1| per row in batch order.
    out = policy.learn_on_batch(batch)
    assert out[TD_ERROR].shape == (40,) and out[TD_ERROR].dtype == np.float32
    for key in ("critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "mean_q",
                "cur_lr", "cur_actor_lr", "cur_alpha_lr", "target_entropy"):
        assert isinstance(out[key], float), key
    assert out["num_updates"] == 1 and out["alpha"] == pytest.approx(0.4)


def test_importance_weights_scale_only_the_critic_loss():
    policy = make_policy()
    batch = transitions("Pendulum-v1", 32)
    noise = np.zeros((32, 1), np.float32)
    base = policy.evaluate_loss(batch, noise, noise)
    batch["weights"] = np.full(32, 2.0, np.float32)
    doubled = policy.evaluate_loss(batch, noise, noise)
    assert doubled["critic_loss"] == pytest.approx(2 * base["critic_loss"], rel=1e-5)
    assert doubled["actor_loss"] == pytest.approx(base["actor_loss"], rel=1e-6)


# -------------------------------------------------------- Discrete losses
@pytest.mark.parametrize("twin_q", [True, False])
def test_discrete_losses_match_slow_references(twin_q):
    policy = make_policy(ACROBOT.action_space, ACROBOT.observation_space, twin_q=twin_q)
    set_alpha(policy, 0.25)
    perturb(policy.target_critic, seed=4)
    perturb(policy.model.actor, seed=5, std=0.5)  # a policy far from uniform
    batch = transitions("Acrobot-v1", 40, seed=6)
    batch["rewards"] = batch["rewards"] * 0.1
    weights = np.random.default_rng(2).uniform(0.2, 2.0, 40).astype(np.float32)
    batch["weights"] = weights
    targets = discrete_target_reference(policy, batch)
    np.testing.assert_allclose(policy.compute_critic_target(batch), targets, rtol=1e-4, atol=1e-5)
    num_critics = 2 if twin_q else 1
    critic_rows, actor_rows, neg_entropy = [], [], []
    for i in range(40):
        s, a = batch["obs"][i], int(batch["actions"][i])
        qs = [ensemble_reference(policy.model.critic, k, s) for k in range(num_critics)]
        critic_rows.append(sum(0.5 * (q[a] - targets[i]) ** 2 for q in qs))
        logits = mlp_reference(policy.model.actor, s)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        q_min = np.min(qs, axis=0)
        actor_rows.append(sum(probs[b] * (0.25 * np.log(probs[b]) - q_min[b]) for b in range(3)))
        neg_entropy.append(float(np.sum(probs * np.log(probs))))
    stats = policy.evaluate_loss(batch)
    assert stats["critic_loss"] == pytest.approx(np.mean(np.array(critic_rows) * weights), rel=1e-4)
    assert stats["actor_loss"] == pytest.approx(np.mean(actor_rows), rel=1e-4, abs=1e-6)
    target_entropy = 0.5 * np.log(3)
    assert policy.target_entropy == pytest.approx(target_entropy)
    expected_alpha_loss = -np.log(0.25) * np.mean(np.array(neg_entropy) + target_entropy)
    assert stats["alpha_loss"] == pytest.approx(expected_alpha_loss, rel=1e-4, abs=1e-6)
    assert stats["entropy"] == pytest.approx(-np.mean(neg_entropy), rel=1e-5)
    out = policy.learn_on_batch(batch)
    assert out[TD_ERROR].shape == (40,) and np.isfinite(out["critic_loss"])


def test_discrete_actions_sample_the_softmax_and_greedy_is_the_argmax():
    policy = make_policy(ACROBOT.action_space, ACROBOT.observation_space)
    with torch.no_grad():
        head = policy.model.actor.net[-1]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    obs = np.stack([ACROBOT.observation_space.sample()] * 30000)
    actions, extra = policy.compute_actions(obs)
    assert extra == {} and actions.dtype == np.int64 and actions.shape == (30000,)
    probs = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()
    np.testing.assert_allclose(np.bincount(actions, minlength=3) / 30000, probs, atol=0.01)
    assert set(policy.compute_actions(obs[:10], explore=False)[0]) == {1}


# ------------------------------------------------------------ updates
def test_each_step_updates_its_own_parameters_and_alpha_follows_the_entropy():
    batch = transitions("Pendulum-v1", 64)
    for target_entropy, direction in ((-10.0, -1), (10.0, 1)):
        policy = make_policy(target_entropy=target_entropy, alpha_lr=0.01)
        actor0 = [p.detach().clone() for p in policy.model.actor.parameters()]
        critic0 = [p.detach().clone() for p in policy.model.critic.parameters()]
        target0 = [p.detach().clone() for p in policy.target_critic.parameters()]
        log_alpha0 = policy.log_alpha.item()
        policy.learn_on_batch(batch)
        assert all(not torch.equal(a, b) for a, b in zip(actor0, policy.model.actor.parameters()))
        assert all(not torch.equal(a, b) for a, b in zip(critic0, policy.model.critic.parameters()))
        # Targets move only through update_target.
        assert all(torch.equal(a, b) for a, b in zip(target0, policy.target_critic.parameters()))
        # Entropy (about 1 nat at the start) above a target of -10: alpha falls; below 10: rises.
        assert np.sign(policy.log_alpha.item() - log_alpha0) == direction
    fixed = make_policy(alpha_lr=0.0, initial_alpha=0.1)
    fixed.learn_on_batch(batch)
    assert fixed.alpha.item() == pytest.approx(0.1)


def test_actor_update_climbs_the_soft_value():
    # A frozen, steep critic and a small fixed alpha: the actor's loss must fall.
    policy = make_policy(critic_lr=0.0, alpha_lr=0.0, initial_alpha=0.05, actor_lr=3e-3)
    perturb(policy.model.critic, seed=9, std=0.5)
    batch = transitions("Pendulum-v1", 128)
    obs = torch.from_numpy(batch["obs"])
    noise = torch.randn(128, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = float(policy.actor_loss(obs, noise)[0])
    for _ in range(30):
        policy.learn_on_batch(batch)
    with torch.no_grad():
        assert float(policy.actor_loss(obs, noise)[0]) < before - 0.1


def test_soft_target_update_math():
    policy = make_policy(tau=0.1)
    perturb(policy.model.critic, seed=5)
    online = [p.detach().clone() for p in policy.model.critic.parameters()]
    before = [p.detach().clone() for p in policy.target_critic.parameters()]
    policy.update_target()
    for target, o, b in zip(policy.target_critic.parameters(), online, before):
        torch.testing.assert_close(target.detach(), 0.1 * o + 0.9 * b)
    policy.update_target(tau=1.0)
    for target, o in zip(policy.target_critic.parameters(), online):
        torch.testing.assert_close(target.detach(), o, rtol=0, atol=0)
    assert all(not p.requires_grad for p in policy.target_critic.parameters())


def test_compute_and_apply_gradients_match_learn_on_batch():
    batch = transitions("Pendulum-v1", 48)
    a, b = (make_policy(critic_lr=0.0) for _ in range(2))  # frozen critics: same actor grads
    for _ in range(3):
        torch.manual_seed(11)
        a.learn_on_batch(batch)
        torch.manual_seed(11)
        grads, stats = b.compute_gradients(batch)
        b.apply_gradients(grads)
    assert len(grads) == len(list(b.model.parameters())) + 1 and stats[TD_ERROR].shape == (48,)
    for pa, pb in zip(a.gradient_params(), b.gradient_params()):
        torch.testing.assert_close(pa, pb)
    assert a.num_updates == b.num_updates == 3


# ------------------------------------------------------------ acting
def test_actions_are_scaled_to_the_bounds_and_greedy_is_tanh_of_the_mean():
    policy = make_policy(ASYM)
    obs = np.stack([OBS_SPACE.sample() for _ in range(2000)])
    actions, extra = policy.compute_actions(obs)
    assert extra == {} and actions.shape == (2000, 2) and actions.dtype == np.float32
    assert np.all(actions >= ASYM.low) and np.all(actions <= ASYM.high)
    with torch.no_grad():
        head = policy.model.actor.net[-1]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.5, -1.0, -20.0, -20.0]))  # means, then log stds
    greedy = policy.compute_actions(obs[:3], explore=False)[0]
    expected = (ASYM.high + ASYM.low) / 2 + (ASYM.high - ASYM.low) / 2 * np.tanh([0.5, -1.0])
    np.testing.assert_allclose(greedy, np.tile(expected, (3, 1)), rtol=1e-6)
    # A tiny std: samples sit on the greedy action.
    np.testing.assert_allclose(policy.compute_actions(obs[:3])[0], greedy, atol=1e-5)


def test_uniform_random_actions_before_random_timesteps_and_per_worker_noise():
    policy = make_policy(ASYM, exploration_config={"random_timesteps": 100})
    obs = np.stack([OBS_SPACE.sample()] * 20000)
    policy.on_global_var_update({"timestep": 99})
    actions, _ = policy.compute_actions(obs)
    width = ASYM.high - ASYM.low
    np.testing.assert_allclose(actions.mean(0), (ASYM.high + ASYM.low) / 2, atol=0.1)
    np.testing.assert_allclose(actions.var(0), width ** 2 / 12, rtol=0.05)
    policy.on_global_var_update({"timestep": 100})
    assert abs(actions.var(0) - policy.compute_actions(obs)[0].var(0)).max() > 0.05
    # Workers sharing config["seed"] still draw different noise.
    w1, w2 = (make_policy(worker_index=i, num_workers=2) for i in (1, 2))
    assert not np.allclose(w1.compute_actions(obs[:8])[0], w2.compute_actions(obs[:8])[0])


# --------------------------------------------------------- state and export
def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("discrete", [False, True])
def test_state_round_trip_through_weights_only_torch_load(discrete):
    if discrete:
        space, obs_space, batch = ACROBOT.action_space, ACROBOT.observation_space, \
            transitions("Acrobot-v1", 64)
    else:
        space, obs_space, batch = ACT_SPACE, OBS_SPACE, transitions("Pendulum-v1", 64)
    policy = make_policy(space, obs_space, alpha_lr=0.01)
    for _ in range(4):
        policy.learn_on_batch(batch)
        policy.update_target()
    policy.on_global_var_update({"timestep": 1234})
    restored = make_policy(space, obs_space, alpha_lr=0.01, seed=99)
    restored.set_state(round_trip(policy.get_state()))
    assert (restored.global_timestep, restored.num_updates) == (1234, 4)
    assert restored.log_alpha.item() == policy.log_alpha.item() != 0.0
    for name in ("model", "target_critic"):
        for p, q in zip(getattr(policy, name).parameters(), getattr(restored, name).parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    np.testing.assert_array_equal(policy.compute_actions(batch["obs"][:5], explore=False)[0],
                                  restored.compute_actions(batch["obs"][:5], explore=False)[0])
    # The optimizers (alpha's too) came along: the next updates are identical.
    for p in (policy, restored):
        torch.manual_seed(3)
        p.learn_on_batch(batch)
        p.learn_on_batch(batch)
    for p, q in zip(policy.gradient_params(), restored.gradient_params()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_restore_keeps_the_restoring_policys_own_learning_rates():
    donor = make_policy(actor_lr=1e-2, critic_lr=2e-2, alpha_lr=3e-2)
    donor.learn_on_batch(transitions("Pendulum-v1", 32))
    policy = make_policy(actor_lr=1e-4, critic_lr=2e-4, alpha_lr=3e-4)
    policy.set_state(round_trip(donor.get_state()))
    assert [opt.param_groups[0]["lr"] for opt in (
        policy.actor_optimizer, policy.critic_optimizer, policy.alpha_optimizer)] == \
        [1e-4, 2e-4, 3e-4]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("space,obs_space", [(ASYM, OBS_SPACE), (MIXED, OBS_SPACE),
                                             (ACROBOT.action_space, ACROBOT.observation_space)])
def test_exports_give_the_greedy_actions(space, obs_space, tmp_path):
    policy = make_policy(space, obs_space)
    perturb(policy.model.actor, seed=4, std=0.5)
    obs = np.stack([obs_space.sample() for _ in range(6)]).astype(np.float32)
    greedy = policy.compute_actions(obs, explore=False)[0]
    with torch.no_grad():
        eager = policy.export_module()(torch.from_numpy(obs)).numpy()
        traced = torch.jit.load(policy.export(str(tmp_path)))(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(eager, greedy, rtol=1e-5, atol=1e-6)
    if isinstance(space, gym.spaces.Discrete) or np.isfinite(space.high).all():
        # The traced SACModel is unclipped; here the means lie inside the bounds.
        np.testing.assert_allclose(traced, greedy, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- agent
TINY = {"learning_starts": 100, "timesteps_per_iteration": 200, "train_batch_size": 64,
        "training_intensity": 64, "rollout_fragment_length": 4, **SMALL}


def test_agent_trains_on_a_dict_observation_and_restores(tmp_path):
    agent = SACAgent(config={**TINY, "seed": 0}, env=spaces_envs.DictPendulum, log_to_disk=False)
    try:
        result = agent.train()
        assert result["info"]["num_steps_trained"] > 0
        learner = result["info"]["learner"]["default_policy"]
        assert np.isfinite(learner["critic_loss"]) and learner["target_entropy"] == -1.0
        checkpoint = agent.save(str(tmp_path))
        obs = {"angle": np.array([0.6, 0.8], np.float32), "speed": np.array([0.5], np.float32)}
        action = agent.compute_action(obs)
    finally:
        agent.stop()
    restored = SACAgent(config={**TINY, "seed": 1}, env=spaces_envs.DictPendulum,
                        log_to_disk=False)
    try:
        restored.restore(checkpoint)
        np.testing.assert_allclose(restored.compute_action(obs), action, rtol=0, atol=0)
        assert restored.get_policy().log_alpha.item() == pytest.approx(np.log(learner["alpha"]),
                                                                       abs=0.05)
        assert restored.train()["training_iteration"] == 2
    finally:
        restored.stop()


def test_discrete_agent_trains_one_iteration():
    agent = SACAgent(config={**TINY, "seed": 0}, env="CartPole-v1", log_to_disk=False)
    try:
        learner = agent.train()["info"]["learner"]["default_policy"]
        assert np.isfinite(learner["actor_loss"])
        assert learner["target_entropy"] == pytest.approx(0.5 * np.log(2))
        assert agent.compute_action(np.zeros(4, np.float32)) in (0, 1)
    finally:
        agent.stop()


def test_agent_trains_with_a_remote_worker(ray_session):
    agent = SACAgent(config={**TINY, "seed": 0, "num_workers": 1, "num_cpus_per_worker": 0.5},
                     env="Pendulum-v1", log_to_disk=False)
    try:
        result = agent.train()
        assert result["num_healthy_workers"] == 1 and result["info"]["num_steps_trained"] > 0
    finally:
        agent.stop()


# ---------------------------------------------------------------- learning
@pytest.mark.learning
def test_sac_pendulum_default_config():
    """The defaults reach -250 in about 8k steps, a minute per seed on one core here.
    Pendulum's 200-step episodes make 16k steps only 80 episodes, so the return is the
    mean of the last 20 episodes (metrics_smoothing_episodes), not of every episode
    since the start. (pendulum-sac.yaml's bar is checked in test_learning.py.)"""
    from learning_bars import assert_learns
    assert_learns("SAC", {"metrics_smoothing_episodes": 20}, -250, 16_000, typical=8_000,
                  env="Pendulum-v1")


@pytest.mark.learning
def test_discrete_sac_cartpole():
    """The discrete variant with pendulum-sac.yaml's small nets and rates: 150 (mean of
    the last 20 episodes) in about 5k steps here; random play scores about 22."""
    from learning_bars import assert_learns
    config = {"metrics_smoothing_episodes": 20, "rollout_fragment_length": 4,
              "train_batch_size": 128, "training_intensity": 128,
              "actor_hiddens": [64, 64], "critic_hiddens": [64, 64],
              "actor_lr": 1e-3, "critic_lr": 1e-3, "alpha_lr": 1e-3}
    assert_learns("SAC", config, 150, 10_000, typical=5_000)
