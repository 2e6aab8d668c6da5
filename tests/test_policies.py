"""Policies, losses, distributions and models on real gymnasium spaces."""

import io
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.policies import (
    MODEL_DEFAULTS,
    A2CTorchPolicy,
    Categorical,
    DiagGaussian,
    PGTorchPolicy,
    Policy,
    PPOTorchPolicy,
    a2c_loss,
    get_dist_class,
    get_model,
    pg_loss,
    ppo_surrogate_loss,
    ppo_value_loss,
    register_custom_model,
)
from flowrl.policies.models import FullyConnectedNetwork, VisionNetwork
from flowrl.data.sample_batch import SampleBatch

CARTPOLE = gym.make("CartPole-v1")
PENDULUM = gym.make("Pendulum-v1")
SPACES = {
    "cartpole": (CARTPOLE.observation_space, CARTPOLE.action_space),
    "pendulum": (PENDULUM.observation_space, PENDULUM.action_space),
}
POLICY_CLASSES = [PGTorchPolicy, A2CTorchPolicy, PPOTorchPolicy]


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    # Tiny nets: one thread is faster and avoids oversubscribing a shared CI box.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sample_batch(policy, env_name, n=64, seed=0):
    """A batch collected with the policy on the real env, postprocessed per episode."""
    env = gym.make({"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1"}[env_name])
    obs, _ = env.reset(seed=seed)
    pieces, rows, eps_id = [], [], 0

    def flush(terminated):
        nonlocal rows
        if not rows:
            return
        fragment = SampleBatch.concat_samples(rows)
        fragment["terminateds"][-1] = terminated
        pieces.append(policy.postprocess_trajectory(fragment))
        rows = []

    for _ in range(n):
        actions, extra = policy.compute_actions(obs[None])
        env_action = int(actions[0]) if env_name == "cartpole" else np.clip(actions[0], -2, 2)
        new_obs, reward, terminated, truncated, _ = env.step(env_action)
        row = SampleBatch(
            obs=obs[None], new_obs=new_obs[None], actions=actions, rewards=[reward],
            terminateds=[False], truncateds=[truncated], eps_id=[eps_id], **extra,
        )
        rows.append(row)
        obs = new_obs
        if terminated or truncated:
            flush(terminated)
            obs, _ = env.reset()
            eps_id += 1
    flush(False)
    batch = SampleBatch.concat_samples(pieces)
    adv = batch["advantages"]
    batch["advantages"] = ((adv - adv.mean()) / (adv.std() + 1e-8)).astype(np.float32)
    return batch


# ----------------------------------------------------------- distributions
def test_categorical_matches_torch_distributions():
    torch.manual_seed(0)
    logits, other_logits = torch.randn(6, 5), torch.randn(6, 5)
    actions = torch.randint(0, 5, (6,))
    ours, theirs = Categorical(logits), torch.distributions.Categorical(logits=logits)
    other = torch.distributions.Categorical(logits=other_logits)
    torch.testing.assert_close(ours.logp(actions), theirs.log_prob(actions))
    torch.testing.assert_close(ours.entropy(), theirs.entropy())
    torch.testing.assert_close(
        ours.kl(Categorical(other_logits)), torch.distributions.kl_divergence(theirs, other)
    )
    assert torch.equal(ours.deterministic_sample(), logits.argmax(-1))
    draws = torch.stack([Categorical(torch.log(torch.tensor([[0.2, 0.8]]))).sample() for _ in range(4000)])
    assert abs(draws.float().mean().item() - 0.8) < 0.03


def test_diag_gaussian_matches_torch_distributions():
    torch.manual_seed(0)
    inputs, other_inputs = torch.randn(7, 6), torch.randn(7, 6)
    actions = torch.randn(7, 3)

    def reference(x):
        mean, log_std = x.chunk(2, -1)
        return torch.distributions.Independent(torch.distributions.Normal(mean, log_std.exp()), 1)

    ours = DiagGaussian(inputs)
    torch.testing.assert_close(ours.logp(actions), reference(inputs).log_prob(actions))
    torch.testing.assert_close(ours.entropy(), reference(inputs).entropy())
    torch.testing.assert_close(
        ours.kl(DiagGaussian(other_inputs)),
        torch.distributions.kl_divergence(reference(inputs), reference(other_inputs)),
    )
    assert torch.equal(ours.deterministic_sample(), inputs[:, :3])
    assert ours.sample().shape == (7, 3)


def test_get_dist_class():
    assert get_dist_class(gym.spaces.Discrete(4)) == (Categorical, 4)
    assert get_dist_class(gym.spaces.Box(-1, 1, (2, 3))) == (DiagGaussian, 12)
    with pytest.raises(ValueError, match="Text"):
        get_dist_class(gym.spaces.Text(5))


# ------------------------------------------------------ losses vs references
def ref_ppo_terms(logp, old_logp, adv, values, old_values, targets, clip, vf_clip):
    surrogates, vf_losses = [], []
    for i in range(len(logp)):
        ratio = math.exp(logp[i] - old_logp[i])
        clipped_ratio = min(max(ratio, 1 - clip), 1 + clip)
        surrogates.append(min(ratio * adv[i], clipped_ratio * adv[i]))
        clipped_value = old_values[i] + min(max(values[i] - old_values[i], -vf_clip), vf_clip)
        vf_losses.append(max((values[i] - targets[i]) ** 2, (clipped_value - targets[i]) ** 2))
    return -sum(surrogates) / len(logp), sum(vf_losses) / len(logp)


def test_ppo_surrogate_and_value_loss_match_reference():
    rng = np.random.default_rng(0)
    n = 200
    logp, old_logp = rng.normal(-1, 0.5, n), rng.normal(-1, 0.5, n)  # ratios well past the clip
    adv, values = rng.normal(size=n), rng.normal(size=n)
    old_values, targets = values + rng.normal(0, 3, n), rng.normal(size=n)
    ref_policy, ref_vf = ref_ppo_terms(logp, old_logp, adv, values, old_values, targets, 0.2, 1.0)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    assert ppo_surrogate_loss(t(logp), t(old_logp), t(adv), 0.2).item() == pytest.approx(ref_policy)
    assert ppo_value_loss(t(values), t(old_values), t(targets), 1.0).item() == pytest.approx(ref_vf)
    plain = np.mean((values - targets) ** 2)
    assert ppo_value_loss(t(values), t(old_values), t(targets), None).item() == pytest.approx(plain)


def test_ppo_policy_loss_matches_per_sample_reference():
    config = {"seed": 0, "lr": 1e-2, "clip_param": 0.2, "vf_clip_param": 0.5, "kl_coeff": 0.3,
              "vf_loss_coeff": 0.7, "entropy_coeff": 0.05}
    policy = PPOTorchPolicy(*SPACES["cartpole"], config)
    batch = sample_batch(policy, "cartpole", n=40)
    # Move the policy away from the sampling one so ratios / KL are non-trivial.
    policy.learn_on_batch(batch, num_sgd_iter=5)
    stats = policy.evaluate_loss(batch)

    with torch.no_grad():
        logits, values = policy.model(torch.as_tensor(batch["obs"]))
    new_logp = torch.log_softmax(logits, -1).numpy().astype(np.float64)
    old_logp_all = torch.log_softmax(torch.as_tensor(batch["action_dist_inputs"]), -1).numpy()
    values = values.numpy().astype(np.float64)
    n, actions = batch.count, batch["actions"]
    logp = [new_logp[i, actions[i]] for i in range(n)]
    ref_policy, ref_vf = ref_ppo_terms(
        logp, batch["action_logp"], batch["advantages"], values, batch["vf_preds"],
        batch["value_targets"], 0.2, 0.5,
    )
    kls, entropies = [], []
    for i in range(n):
        kls.append(sum(math.exp(old_logp_all[i, a]) * (old_logp_all[i, a] - new_logp[i, a]) for a in range(2)))
        entropies.append(-sum(math.exp(new_logp[i, a]) * new_logp[i, a] for a in range(2)))
    ref_kl, ref_entropy = sum(kls) / n, sum(entropies) / n
    ref_total = ref_policy + 0.3 * ref_kl + 0.7 * ref_vf - 0.05 * ref_entropy
    assert ref_kl > 1e-4
    for key, expected in [("policy_loss", ref_policy), ("vf_loss", ref_vf), ("kl", ref_kl),
                          ("entropy", ref_entropy), ("total_loss", ref_total)]:
        assert stats[key] == pytest.approx(expected, rel=1e-4, abs=1e-5), key


def test_a2c_and_pg_losses_match_reference():
    rng = np.random.default_rng(1)
    n = 50
    logp, adv, values, targets, ent = (rng.normal(size=n) for _ in range(5))
    ref_pg = -sum(logp[i] * adv[i] for i in range(n)) / n
    ref_vf = 0.5 * sum((values[i] - targets[i]) ** 2 for i in range(n)) / n
    ref_ent = sum(ent) / n
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    total, stats = a2c_loss(t(logp), t(adv), t(values), t(targets), t(ent), 0.25, 0.01)
    assert total.item() == pytest.approx(ref_pg + 0.25 * ref_vf - 0.01 * ref_ent)
    assert stats["vf_loss"].item() == pytest.approx(ref_vf)
    assert stats["policy_loss"].item() == pytest.approx(ref_pg)
    assert pg_loss(t(logp), t(adv)).item() == pytest.approx(ref_pg)
    total_no_critic, stats = a2c_loss(t(logp), t(adv), None, None, t(ent), 0.25, 0.0)
    assert total_no_critic.item() == pytest.approx(ref_pg) and "vf_loss" not in stats


def test_a2c_policy_loss_uses_model_outputs():
    config = {"seed": 0, "vf_loss_coeff": 0.5, "entropy_coeff": 0.01}
    policy = A2CTorchPolicy(*SPACES["pendulum"], config)
    batch = sample_batch(policy, "pendulum", n=30)
    stats = policy.evaluate_loss(batch)
    with torch.no_grad():
        inputs, values = policy.model(torch.as_tensor(batch["obs"]))
    mean, log_std = inputs[:, 0].numpy(), inputs[:, 1].numpy()
    ref_pg = ref_vf = ref_ent = 0.0
    for i in range(batch.count):
        a = float(batch["actions"][i, 0])
        logp = -0.5 * ((a - mean[i]) / math.exp(log_std[i])) ** 2 - log_std[i] - 0.5 * math.log(2 * math.pi)
        ref_pg -= logp * batch["advantages"][i] / batch.count
        ref_vf += 0.5 * (values[i].item() - batch["value_targets"][i]) ** 2 / batch.count
        ref_ent += (log_std[i] + 0.5 * math.log(2 * math.pi * math.e)) / batch.count
    assert stats["policy_loss"] == pytest.approx(ref_pg, rel=1e-4, abs=1e-5)
    assert stats["vf_loss"] == pytest.approx(ref_vf, rel=1e-4)
    assert stats["total_loss"] == pytest.approx(ref_pg + 0.5 * ref_vf - 0.01 * ref_ent, rel=1e-4, abs=1e-5)


def test_update_kl_rule():
    policy = PPOTorchPolicy(*SPACES["cartpole"], {"kl_coeff": 0.2, "kl_target": 0.01})
    assert policy.update_kl(0.05) == pytest.approx(0.3)  # > 2 * target
    assert policy.update_kl(0.015) == pytest.approx(0.3)  # within [target / 2, 2 * target]
    assert policy.update_kl(0.001) == pytest.approx(0.15)  # < target / 2
    assert policy.kl_coeff == pytest.approx(0.15)


# --------------------------------------------------------------- acting
@pytest.mark.parametrize("policy_cls", POLICY_CLASSES)
@pytest.mark.parametrize("env_name", ["cartpole", "pendulum"])
def test_compute_actions_shapes_and_dtypes(policy_cls, env_name):
    obs_space, action_space = SPACES[env_name]
    policy = policy_cls(obs_space, action_space, {"seed": 0})
    obs = np.stack([obs_space.sample() for _ in range(5)])
    actions, extra = policy.compute_actions(obs)
    num_outputs = 2
    if env_name == "cartpole":
        assert actions.shape == (5,) and actions.dtype == np.int64
        assert set(actions.tolist()) <= {0, 1}
        assert isinstance(policy.compute_single_action(obs[0]), int)
    else:
        assert actions.shape == (5, 1) and actions.dtype == np.float32
        assert policy.compute_single_action(obs[0]).shape == (1,)
    assert extra["action_logp"].shape == (5,) and extra["action_logp"].dtype == np.float32
    assert extra["action_dist_inputs"].shape == (5, num_outputs)
    assert ("vf_preds" in extra) == (policy_cls is not PGTorchPolicy)
    if "vf_preds" in extra:
        assert extra["vf_preds"].shape == (5,) and extra["vf_preds"].dtype == np.float32
    greedy_a, _ = policy.compute_actions(obs, explore=False)
    greedy_b, _ = policy.compute_actions(obs, explore=False)
    np.testing.assert_array_equal(greedy_a, greedy_b)
    assert policy.value(obs).shape == (5,)
    assert policy.device == torch.device("cpu")


def test_box_actions_are_not_clipped():
    policy = PPOTorchPolicy(*SPACES["pendulum"], {"seed": 0, "model": {"free_log_std": True}})
    with torch.no_grad():
        policy.model.log_std.fill_(2.0)  # std ~7.4 vs bounds of +-2
    actions, _ = policy.compute_actions(np.zeros((200, 3), dtype=np.float32))
    assert np.abs(actions).max() > 2.0


# ------------------------------------------------------------- learning
def test_pg_learn_on_batch_raises_logp_of_advantaged_actions():
    policy = PGTorchPolicy(*SPACES["cartpole"], {"seed": 0, "lr": 1e-2})
    batch = sample_batch(policy, "cartpole", n=64)
    before = policy.evaluate_loss(batch)["policy_loss"]
    for _ in range(10):
        policy.learn_on_batch(batch)
    assert policy.evaluate_loss(batch)["policy_loss"] < before - 0.05


def test_a2c_learn_on_batch_reduces_loss():
    policy = A2CTorchPolicy(*SPACES["cartpole"], {"seed": 0, "lr": 1e-2})
    batch = sample_batch(policy, "cartpole", n=64)
    before = policy.evaluate_loss(batch)
    for _ in range(30):
        stats = policy.learn_on_batch(batch)
    after = policy.evaluate_loss(batch)
    assert after["total_loss"] < before["total_loss"]
    assert after["vf_loss"] < 0.7 * before["vf_loss"]
    assert after["policy_loss"] < before["policy_loss"]
    assert {"total_loss", "policy_loss", "vf_loss", "entropy", "cur_lr", "grad_gnorm"} <= set(stats)
    assert stats["grad_gnorm"] > 0 and stats["cur_lr"] == 1e-2


@pytest.mark.parametrize("env_name", ["cartpole", "pendulum"])
def test_ppo_learn_on_batch_improves_surrogate_and_value(env_name):
    policy = PPOTorchPolicy(*SPACES[env_name], {"seed": 0, "lr": 1e-3, "kl_coeff": 0.0})
    batch = sample_batch(policy, env_name, n=128)
    before = policy.evaluate_loss(batch)
    assert before["kl"] == pytest.approx(0.0, abs=1e-6)
    stats = policy.learn_on_batch(batch, num_sgd_iter=8, sgd_minibatch_size=32)
    after = policy.evaluate_loss(batch)
    assert after["policy_loss"] < before["policy_loss"] - 1e-3
    assert after["vf_loss"] < before["vf_loss"]
    assert after["kl"] > 0.0
    assert {"total_loss", "policy_loss", "vf_loss", "entropy", "kl", "cur_lr", "grad_gnorm",
            "cur_kl_coeff"} <= set(stats)
    assert all(isinstance(v, float) for v in stats.values())


def test_grad_clip_bounds_the_applied_gradient():
    policy = A2CTorchPolicy(*SPACES["cartpole"], {"seed": 0, "grad_clip": 1e-3})
    batch = sample_batch(policy, "cartpole", n=32)
    grads, stats = policy.compute_gradients(batch)
    assert stats["grad_gnorm"] > 1e-3  # reported norm is the pre-clip one
    assert math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)) <= 1e-3 * 1.001


@pytest.mark.parametrize("policy_cls", POLICY_CLASSES)
def test_compute_plus_apply_gradients_equals_learn_on_batch(policy_cls):
    config = {"seed": 3, "lr": 1e-2, "grad_clip": 0.5}
    learner = policy_cls(*SPACES["cartpole"], config)
    twin = policy_cls(*SPACES["cartpole"], config)
    batch = sample_batch(learner, "cartpole", n=32)
    for _ in range(2):  # twice, so Adam's moment state must match as well
        learner.learn_on_batch(batch)
        grads, stats = twin.compute_gradients(batch)
        assert len(grads) == len(list(twin.model.parameters()))
        assert all(isinstance(g, np.ndarray) for g in grads)
        twin.apply_gradients(grads)
    for key, value in learner.get_weights().items():
        np.testing.assert_allclose(twin.get_weights()[key], value, rtol=1e-6, atol=1e-7)
    assert "total_loss" in stats


@pytest.mark.parametrize("policy_cls", POLICY_CLASSES)
def test_state_round_trip_through_torch_save(policy_cls):
    config = {"seed": 0, "lr": 1e-2}
    policy = policy_cls(*SPACES["pendulum"], config)
    batch = sample_batch(policy, "pendulum", n=32)
    policy.learn_on_batch(batch, num_sgd_iter=2)
    if isinstance(policy, PPOTorchPolicy):
        policy.update_kl(1.0)
    buffer = io.BytesIO()
    torch.save(policy.get_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = policy_cls(*SPACES["pendulum"], {**config, "seed": 99})
    restored.set_state(state)
    obs = batch["obs"][:10]
    np.testing.assert_array_equal(
        restored.compute_actions(obs, explore=False)[0], policy.compute_actions(obs, explore=False)[0]
    )
    if isinstance(policy, PPOTorchPolicy):
        assert restored.kl_coeff == policy.kl_coeff == pytest.approx(0.3)
    # Optimizer state came along: the next identical step gives identical weights.
    policy.learn_on_batch(batch)
    restored.learn_on_batch(batch)
    for key, value in policy.get_weights().items():
        np.testing.assert_allclose(restored.get_weights()[key], value, rtol=1e-6, atol=1e-7)


def test_weights_are_copies_and_round_trip():
    policy = PPOTorchPolicy(*SPACES["cartpole"], {"seed": 0})
    other = PPOTorchPolicy(*SPACES["cartpole"], {"seed": 1})
    weights = policy.get_weights()
    assert all(isinstance(w, np.ndarray) for w in weights.values())
    other.set_weights(weights)
    for value in weights.values():
        value += 1.0  # must not leak into either model
    for key, value in policy.get_weights().items():
        np.testing.assert_array_equal(other.get_weights()[key], value)


def test_learn_on_batch_accepts_read_only_columns():
    policy = PPOTorchPolicy(*SPACES["cartpole"], {"seed": 0})
    batch = sample_batch(policy, "cartpole", n=16)
    for value in batch.values():
        value.setflags(write=False)  # as read zero-copy from Ray's object store
    assert np.isfinite(policy.learn_on_batch(batch)["total_loss"])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_on_global_var_update_and_export(tmp_path):
    policy = PPOTorchPolicy(*SPACES["cartpole"], {"seed": 0})
    policy.on_global_var_update({"timestep": 1234})
    assert policy.global_timestep == 1234
    path = policy.export(str(tmp_path / "export"))
    assert path.endswith("model.pt")
    loaded = torch.jit.load(path)
    obs = torch.randn(3, 4)
    expected_inputs, expected_values = policy.model(obs)
    got_inputs, got_values = loaded(obs)
    torch.testing.assert_close(got_inputs, expected_inputs)
    torch.testing.assert_close(got_values, expected_values)


# ----------------------------------------------------------------- models
class TinyCustomModel(torch.nn.Module):
    def __init__(self, obs_space, action_space, num_outputs, model_config):
        super().__init__()
        self.scale = model_config["custom_model_config"].get("scale", 1.0)
        self.net = torch.nn.Linear(int(np.prod(obs_space.shape)), num_outputs + 1)

    def forward(self, obs):
        out = self.net(obs.float()) * self.scale
        return out[:, :-1], out[:, -1]


def test_register_custom_model():
    register_custom_model("tiny_test_model", TinyCustomModel)
    config = {"model": {"custom_model": "tiny_test_model", "custom_model_config": {"scale": 2.0}}}
    policy = PPOTorchPolicy(*SPACES["cartpole"], config)
    assert isinstance(policy.model, TinyCustomModel) and policy.model.scale == 2.0
    actions, extra = policy.compute_actions(np.zeros((3, 4), dtype=np.float32))
    assert actions.shape == (3,) and extra["vf_preds"].shape == (3,)
    batch = sample_batch(policy, "cartpole", n=16)
    assert np.isfinite(policy.learn_on_batch(batch)["total_loss"])
    # A class works too (it travels inside the config to remote workers).
    assert isinstance(get_model(*SPACES["cartpole"], 2, {"custom_model": TinyCustomModel}), TinyCustomModel)
    with pytest.raises(ValueError, match="tiny_test_model"):
        get_model(*SPACES["cartpole"], 2, {"custom_model": "no_such_model"})


def test_model_catalog_choices():
    assert MODEL_DEFAULTS["fcnet_hiddens"] == [64, 64]
    model = get_model(*SPACES["cartpole"], 2, {})
    assert isinstance(model, FullyConnectedNetwork) and not model.vf_share_layers
    shared = get_model(*SPACES["cartpole"], 2, {"vf_share_layers": True, "fcnet_hiddens": [32]})
    assert shared.vf_share_layers
    inputs, values = shared(torch.zeros(5, 4))
    assert inputs.shape == (5, 2) and values.shape == (5,)
    # Separate towers really are separate: the value output has no policy-tower gradient.
    _, values = model(torch.randn(5, 4))
    values.sum().backward()
    for name, param in model.named_parameters():
        assert float(param.grad[0].abs().sum()) == 0.0, name  # index 0 = policy tower
        assert float(param.grad[1].abs().sum()) > 0.0, name
    # Discrete observations are one-hot encoded inside the model: the towers see rows
    # of the identity, and the outputs are the towers' on those rows.
    discrete = get_model(gym.spaces.Discrete(16), gym.spaces.Discrete(4), 4, {})
    states = torch.tensor([0, 3, 15])
    one_hot = torch.eye(16)[states]
    torch.testing.assert_close(discrete.preprocess(states), one_hot, rtol=0, atol=0)
    inputs, values = discrete(states)
    assert inputs.shape == (3, 4) and values.shape == (3,)
    expected_inputs, expected_values = discrete.twin(one_hot)
    torch.testing.assert_close(inputs, expected_inputs)
    torch.testing.assert_close(values, expected_values)
    # free_log_std: a state-independent log-std parameter, still [mean, log_std] outputs.
    free = get_model(*SPACES["pendulum"], 2, {"free_log_std": True})
    inputs, _ = free(torch.randn(4, 3))
    assert inputs.shape == (4, 2) and torch.all(inputs[:, 1] == free.log_std[0])
    with pytest.raises(ValueError, match="Text"):
        get_model(gym.spaces.Text(5), gym.spaces.Discrete(2), 2, {})


def test_cnn_model_on_atari_shaped_obs():
    obs_space = gym.spaces.Box(0, 255, (84, 84, 4), dtype=np.uint8)
    action_space = gym.spaces.Discrete(6)
    policy = PPOTorchPolicy(obs_space, action_space, {"seed": 0, "model": {"vf_share_layers": True}})
    assert isinstance(policy.model, VisionNetwork)
    obs = np.stack([obs_space.sample() for _ in range(6)])
    actions, extra = policy.compute_actions(obs)
    assert actions.shape == (6,) and extra["action_dist_inputs"].shape == (6, 6)
    # uint8 frames are scaled by 1/255 inside: the same weights on float frames / 255 give
    # the same logits and values.
    float_space = gym.spaces.Box(0.0, 1.0, (84, 84, 4), dtype=np.float32)
    on_floats = PPOTorchPolicy(float_space, action_space,
                               {"seed": 1, "model": {"vf_share_layers": True}})
    on_floats.set_weights(policy.get_weights())
    scaled = obs.astype(np.float32) / 255.0
    _, float_extra = on_floats.compute_actions(scaled)
    np.testing.assert_allclose(extra["action_dist_inputs"], float_extra["action_dist_inputs"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy.value(obs), on_floats.value(scaled), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(policy.model.preprocess(torch.as_tensor(obs[:1])),
                               torch.as_tensor(scaled[:1]).permute(0, 3, 1, 2))
    batch = SampleBatch(
        obs=obs, actions=actions, advantages=np.ones(6, dtype=np.float32),
        value_targets=np.zeros(6, dtype=np.float32), **extra,
    )
    assert np.isfinite(policy.learn_on_batch(batch)["total_loss"])


def test_policy_base_class_needs_a_loss():
    policy = Policy(*SPACES["cartpole"], {})
    batch = SampleBatch(obs=np.zeros((2, 4), np.float32), actions=[0, 1], advantages=[1.0, 1.0])
    with pytest.raises(NotImplementedError):
        policy.learn_on_batch(batch)
    with pytest.raises(KeyError, match="advantages"):
        policy.learn_on_batch(SampleBatch(obs=np.zeros((2, 4), np.float32), actions=[0, 1]))
