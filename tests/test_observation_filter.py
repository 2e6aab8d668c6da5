"""observation_filter="MeanStdFilter" for the torch policies: exact statistics, where the
learner updates them, how they travel (weights, checkpoints, exports, A3C gradients),
and the config errors. Real envs and agents throughout."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.data.sample_batch import SampleBatch
from flowrl import get_agent_class
from flowrl.plans.a2c import A2CAgent
from flowrl.plans.a3c import A3CAgent
from flowrl.plans.ddpg import DDPGAgent
from flowrl.plans.dqn import DQNAgent
from flowrl.plans.impala import ImpalaAgent
from flowrl.plans.ppo import PPOAgent
from flowrl.policies.filters import (FILTER_WEIGHTS_PREFIX, ObservationNormalizer,
                                     make_observation_normalizer,
                                     RunningStat)
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.workers.callbacks import DefaultCallbacks

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

FILTER = {"observation_filter": "MeanStdFilter", "seed": 0}
SMALL_PPO = {**FILTER, "train_batch_size": 400, "rollout_fragment_length": 200,
             "sgd_minibatch_size": 100, "num_sgd_iter": 2, "model": {"fcnet_hiddens": [16]}}
REMOTE = {"num_workers": 1, "num_cpus_per_worker": 0.5, "min_iter_time_s": 0}


def expected_normalization(obs: np.ndarray, data: np.ndarray) -> np.ndarray:
    """The documented formula with NumPy's mean and (population) std of ``data``."""
    return np.clip((obs - data.mean(axis=0)) / (data.std(axis=0) + 1e-8), -10, 10)


def filter_stats(agent) -> RunningStat:
    return agent.get_policy().obs_filter.stats


class RecordObservations(DefaultCallbacks):
    """Keeps the raw ``obs`` of every sampled batch (the driver samples: num_workers=0)."""

    seen: list[np.ndarray] = []

    def on_sample_end(self, *, worker, samples, **kwargs):
        RecordObservations.seen.append(np.array(samples[SampleBatch.OBS]))


# ----------------------------------------------------------------- statistics
@pytest.mark.parametrize("seed", range(3))
def test_running_stat_merge_matches_numpy_on_random_chunks(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, size=9).tolist() + [1, 0, 500]
    chunks = [rng.normal(loc=rng.normal(size=3) * 5, scale=rng.uniform(0.01, 10), size=(n, 3))
              for n in sizes]
    # Partial statistics merged in a random tree order, as workers' would be.
    parts = [RunningStat.of_batch(chunk, (3,)) for chunk in chunks]
    while len(parts) > 1:
        i, j = sorted(rng.choice(len(parts), size=2, replace=False))
        parts[i].merge(parts.pop(j))
    data = np.concatenate(chunks)
    (merged,) = parts
    assert merged.count == len(data)
    np.testing.assert_allclose(merged.mean, data.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.var, data.var(axis=0), rtol=1e-9)

    normalizer = ObservationNormalizer((3,))
    for chunk in chunks:
        normalizer.update(chunk)
    obs = rng.normal(size=(7, 3)).astype(np.float32) * 20
    got = normalizer.normalize(obs)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected_normalization(obs, data), rtol=1e-5, atol=1e-5)
    # The exported (torch) form computes the same bits.
    with torch.no_grad():
        exported = normalizer.module()(torch.from_numpy(obs)).numpy()
    np.testing.assert_array_equal(exported, got)


def test_es_names_stay_importable_from_es_module():
    from flowrl.policies import es, filters
    assert es.RunningStat is filters.RunningStat
    assert es.MeanStdFilter is filters.MeanStdFilter
    assert es.make_filter("NoFilter", (2,)).__class__ is filters.NoFilter


# ------------------------------------------------------------------- PPO learner
def test_ppo_learner_counts_the_trained_raw_observations(results_dir):
    RecordObservations.seen = []
    agent = PPOAgent(config={**SMALL_PPO, "callbacks": RecordObservations}, env="Pendulum-v1")
    try:
        result = agent.train()
        seen = np.concatenate(RecordObservations.seen)
        stats = filter_stats(agent)
        assert stats.count == result["info"]["num_steps_trained"] == len(seen)
        np.testing.assert_allclose(stats.mean, seen.mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats.var, seen.var(axis=0), rtol=1e-6)
        # The batches kept raw observations: Pendulum's cos/sin/velocity, not z-scores.
        assert np.abs(seen[:, 2]).max() > 1.5

        # Acting and the loss columns see the normalized values; batches stay raw.
        policy = agent.get_policy()
        batch = agent.workers.local_worker().sample()
        raw = np.array(batch[SampleBatch.OBS])
        expected = expected_normalization(raw, seen)
        np.testing.assert_allclose(policy._obs_to_tensor(raw).numpy(), expected, atol=1e-5)
        tensors = policy._batch_to_tensors(batch)
        np.testing.assert_allclose(tensors[SampleBatch.OBS].numpy(), expected, atol=1e-5)
        assert np.array_equal(batch[SampleBatch.OBS], raw)
    finally:
        agent.stop()


def test_ppo_remote_worker_gets_the_drivers_statistics(ray_session, results_dir):
    agent = PPOAgent(config={**SMALL_PPO, **REMOTE}, env="Pendulum-v1")
    try:
        agent.train()
        driver = filter_stats(agent)
        assert driver.count > 0
        (remote,) = agent.workers.foreach_worker(
            lambda w: w.get_policy().obs_filter.stats.to_dict())[1:]
        assert remote["count"] == driver.count
        np.testing.assert_array_equal(remote["mean"], driver.mean)
        np.testing.assert_array_equal(remote["m2"], driver.m2)
    finally:
        agent.stop()


def test_save_restore_gives_identical_statistics_and_actions(results_dir, tmp_path):
    agent = PPOAgent(config=SMALL_PPO, env="Pendulum-v1")
    restored = PPOAgent(config=SMALL_PPO, env="Pendulum-v1")
    try:
        agent.train()
        path = agent.save(str(tmp_path / "ckpt"))
        restored.restore(path)
        a, b = filter_stats(agent), filter_stats(restored)
        assert a.count == b.count > 0
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.m2, b.m2)
        rng = np.random.default_rng(0)
        for obs in rng.uniform(-3, 3, size=(10, 3)).astype(np.float32):
            np.testing.assert_array_equal(agent.compute_action(obs), restored.compute_action(obs))
    finally:
        agent.stop()
        restored.stop()


def test_weights_without_statistics_still_load_and_nofilter_refuses_them():
    env = gym.make("Pendulum-v1")
    filtered = PPOTorchPolicy(env.observation_space, env.action_space,
                              {"observation_filter": "MeanStdFilter", "seed": 0})
    filtered.obs_filter.update(np.random.default_rng(0).normal(size=(50, 3)))
    state = filtered.get_state()
    old_style = {**state, "weights": {k: v for k, v in state["weights"].items()
                                      if not k.startswith(FILTER_WEIGHTS_PREFIX)}}
    fresh = PPOTorchPolicy(env.observation_space, env.action_space,
                           {"observation_filter": "MeanStdFilter", "seed": 1})
    fresh.set_state(old_style)  # an older checkpoint: the statistics stay as they were
    assert fresh.obs_filter.stats.count == 0
    fresh.set_state(state)
    assert fresh.obs_filter.stats.count == 50
    plain = PPOTorchPolicy(env.observation_space, env.action_space, {"seed": 0})
    assert plain.obs_filter is None
    assert not any(k.startswith(FILTER_WEIGHTS_PREFIX) for k in plain.get_weights())
    with pytest.raises(ValueError, match="observation_filter='NoFilter'"):
        plain.set_weights(filtered.get_weights())


def test_policy_server_and_local_mode_client_normalize_alike(results_dir, tmp_path):
    from flowrl.envs.serving import PolicyClient
    from flowrl.serving import serve_checkpoint
    agent = PPOAgent(config=SMALL_PPO, env="Pendulum-v1")
    try:
        agent.train()
        server = serve_checkpoint(agent.save(str(tmp_path / "ckpt")), port=0)
        try:
            remote = PolicyClient(server.url)
            local = PolicyClient(server.url, inference_mode="local")
            assert local.policy.obs_filter.stats.count == filter_stats(agent).count > 0
            for seed in range(5):
                obs = gym.make("Pendulum-v1").reset(seed=seed)[0]
                expected = agent.compute_action(obs)
                eid = remote.start_episode(training_enabled=False)
                np.testing.assert_allclose(remote.get_action(eid, obs), expected, rtol=1e-6)
                remote.end_episode(eid, obs)
                np.testing.assert_array_equal(local.policy.compute_single_action(obs), expected)
        finally:
            server.shutdown()
    finally:
        agent.stop()


# --------------------------------------------------------------------- export
@pytest.mark.parametrize("agent_cls, env", [(PPOAgent, "Pendulum-v1"), (DQNAgent, "CartPole-v1")])
def test_export_bakes_the_normalization_in(agent_cls, env, results_dir, tmp_path):
    config = (SMALL_PPO if agent_cls is PPOAgent else
              {**FILTER, "learning_starts": 100, "timesteps_per_iteration": 200,
               "buffer_size": 1000, "model": {"fcnet_hiddens": [16]}, "hiddens": [16]})
    agent = agent_cls(config=config, env=env)
    try:
        agent.train()
        assert filter_stats(agent).count > 0
        module = torch.jit.load(agent.export_policy(str(tmp_path / "export")))
        space = agent.get_policy().observation_space
        obs = np.stack([space.sample() for _ in range(20)]).astype(np.float32)
        obs[:3] *= 3  # beyond the data: the clip must agree too
        with torch.no_grad():
            exported = module(torch.as_tensor(obs)).numpy()
        greedy = np.stack([agent.compute_action(o) for o in obs])
        np.testing.assert_allclose(exported.reshape(greedy.shape), greedy, rtol=1e-5, atol=1e-5)
    finally:
        agent.stop()


# ------------------------------------------------------- replay-based learners
def test_dqn_and_ddpg_learners_update_and_apply_the_statistics(results_dir):
    dqn = DQNAgent(config={**FILTER, "learning_starts": 100, "timesteps_per_iteration": 200,
                           "buffer_size": 1000, "model": {"fcnet_hiddens": [16]},
                           "hiddens": [16]}, env="CartPole-v1")
    ddpg = DDPGAgent(config={**FILTER, "learning_starts": 100, "timesteps_per_iteration": 100,
                             "training_intensity": 32, "train_batch_size": 32,
                             "buffer_size": 1000, "actor_hiddens": [16],
                             "critic_hiddens": [16]}, env="Pendulum-v1")
    try:
        for agent in (dqn, ddpg):
            for _ in range(2):
                result = agent.train()
            stats = filter_stats(agent)
            # One update per learn_on_batch call, with the rows it trained on.
            assert stats.count == result["info"]["num_steps_trained"] > 0
            policy = agent.get_policy()
            obs = np.stack([policy.observation_space.sample() for _ in range(4)])
            batch = SampleBatch({SampleBatch.OBS: obs, SampleBatch.NEW_OBS: obs[::-1],
                                 SampleBatch.ACTIONS: np.stack([policy.action_space.sample()
                                                               for _ in range(4)]),
                                 SampleBatch.REWARDS: np.zeros(4, np.float32),
                                 SampleBatch.TERMINATEDS: np.zeros(4, bool)})
            tensors = policy._batch_to_tensors(batch)
            expected = policy.obs_filter.normalize(obs)
            np.testing.assert_array_equal(tensors[SampleBatch.OBS].numpy(), expected)
            np.testing.assert_array_equal(tensors[SampleBatch.NEW_OBS].numpy(), expected[::-1])
            assert not np.allclose(expected, obs, atol=1e-3)  # the statistics are in effect
    finally:
        dqn.stop()
        ddpg.stop()


# ---------------------------------------------------------- gradient-based paths
def test_a3c_worker_statistics_reach_the_driver(ray_session, results_dir):
    agent = A3CAgent(config={**FILTER, **REMOTE, "min_iter_time_s": 0,
                             "timesteps_per_iteration": 100,
                             "model": {"fcnet_hiddens": [16]}}, env="Pendulum-v1")
    try:
        result = agent.train()
        stats = filter_stats(agent)
        # Every applied gradient brought its batch's statistics along.
        assert stats.count == result["info"]["num_steps_trained"] > 0
        assert not np.allclose(stats.mean, 0.0)
    finally:
        agent.stop()


def test_impala_learner_thread_updates_and_workers_receive(ray_session, results_dir):
    agent = ImpalaAgent(config={**FILTER, **REMOTE, "num_envs_per_worker": 1,
                                "timesteps_per_iteration": 400,
                                "model": {"fcnet_hiddens": [16]}}, env="Pendulum-v1")
    try:
        for _ in range(2):
            agent.train()
        # The learner thread keeps training after train() returns: no exact count here.
        (remote,) = agent.workers.foreach_worker(
            lambda w: w.get_policy().obs_filter.stats.count)[1:]
        # The worker acts with statistics that came with the learner's weights.
        assert 0 < remote <= filter_stats(agent).count
    finally:
        agent.stop()


def test_a2c_microbatches_merge_their_statistics(results_dir):
    RecordObservations.seen = []
    agent = A2CAgent(config={**FILTER, "callbacks": RecordObservations,
                             "train_batch_size": 200, "microbatch_size": 50,
                             "rollout_fragment_length": 50,
                             "model": {"fcnet_hiddens": [16]}}, env="Pendulum-v1")
    try:
        result = agent.train()
        stats = filter_stats(agent)
        trained = result["info"]["num_steps_trained"]
        seen = np.concatenate(RecordObservations.seen)[:trained]
        assert stats.count == trained > 0
        np.testing.assert_allclose(stats.mean, seen.mean(axis=0), rtol=1e-6, atol=1e-6)
    finally:
        agent.stop()


# ------------------------------------------------------------------ bad configs
def test_an_unknown_filter_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"observation_filter='Mean'.*'MeanStdFilter'.*"
                                         r"'NoFilter'"):
        PPOAgent.merge_config({"env": "CartPole-v1", "observation_filter": "Mean"})


def test_meanstdfilter_needs_vector_observations(results_dir):
    with pytest.raises(ValueError, match=r"Discrete\(16\).*NoFilter"):
        PPOAgent(config={"observation_filter": "MeanStdFilter"}, env="FrozenLake-v1")
    images = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    with pytest.raises(ValueError, match="vector observations, not uint8 images"):
        PPOTorchPolicy(images, gym.spaces.Discrete(2), {"observation_filter": "MeanStdFilter"})


def test_auto_filter_applies_to_flat_float_vectors_only():
    box = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    image = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    assert make_observation_normalizer("auto", box) is not None
    assert make_observation_normalizer("auto", image) is None
    assert make_observation_normalizer("auto", gym.spaces.Discrete(4)) is None
    # PPO's default is "auto": CartPole's vector observations are normalized.
    agent = get_agent_class("PPO")(config={"train_batch_size": 256, "sgd_minibatch_size": 64,
                                           "num_envs_per_worker": 2,
                                           "rollout_fragment_length": 128},
                                   env="CartPole-v1", log_to_disk=False)
    try:
        agent.train()
        assert agent.get_policy().obs_filter.stats.count == 256
    finally:
        agent.stop()
