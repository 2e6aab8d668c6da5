"""RolloutWorker, WorkerSet, sampling semantics, envs (real gymnasium envs, real actors)."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from flowrl.envs import EnvContext, OldGymAPIAdapter, make_env_creator, register_env
from flowrl.plans.ppo import DEFAULT_CONFIG as PPO_CONFIG
from flowrl.plans.ppo import PPOAgent
from flowrl.policies.pg import PGTorchPolicy
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.data.sample_batch import SampleBatch
from flowrl.workers import RolloutWorker, WorkerSet


def make_config(**overrides):
    config = PPOAgent.merge_config({"env": "CartPole-v1", **overrides})
    return config


def cartpole():
    return make_env_creator("CartPole-v1")


class CountingEnv(gym.Env):
    """Reward 1 per step; terminates after `length` steps; obs = step index."""

    def __init__(self, ctx=None):
        ctx = ctx or {}
        self.length = ctx.get("length", 5)
        self.observation_space = gym.spaces.Box(-1e6, 1e6, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, self.t >= self.length, False, {}


class OldAPIEnv:
    """An env written against the old gym API (4-tuple step, obs-only reset)."""

    def __init__(self, ctx=None):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def reset(self):
        self.t = 0
        return np.zeros(2, np.float32)

    def step(self, action):
        self.t += 1
        done = self.t >= 3
        info = {"TimeLimit.truncated": True} if done else {}
        return np.full(2, 0.1 * self.t, np.float32), 1.0, done, info


def test_truncate_episodes_fragment_sizes_and_episode_cuts():
    config = make_config(num_envs_per_worker=3, rollout_fragment_length=7,
                         env_config={"length": 5})
    worker = RolloutWorker(CountingEnv, PPOTorchPolicy, config)
    batch = worker.sample()
    assert batch.count == 3 * 7
    for episode in batch.split_by_episode():
        # Every piece is one contiguous run of one episode, t counting up from its start.
        t = episode[SampleBatch.T]
        assert np.all(np.diff(t) == 1)
        np.testing.assert_allclose(episode[SampleBatch.OBS][:, 0], t)
        np.testing.assert_allclose(episode[SampleBatch.NEW_OBS][:, 0], t + 1)
        # Only the final step of a finished episode is terminated.
        assert not episode[SampleBatch.TERMINATEDS][:-1].any()
    metrics = worker.get_metrics()
    assert len(metrics) == 3  # each env finished one 5-step episode within 7 steps
    assert all(ret == 5.0 and length == 5 for ret, length in metrics)
    assert worker.get_metrics() == []


def test_complete_episodes_returns_whole_episodes_only():
    config = make_config(num_envs_per_worker=2, rollout_fragment_length=4,
                         batch_mode="complete_episodes", env_config={"length": 5})
    worker = RolloutWorker(CountingEnv, PPOTorchPolicy, config)
    for _ in range(3):
        batch = worker.sample()
        assert batch.count >= 8
        for episode in batch.split_by_episode():
            assert episode.count == 5
            assert episode[SampleBatch.T][0] == 0
            assert episode[SampleBatch.TERMINATEDS][-1]


def test_bootstrap_on_cut_fragment_not_on_termination():
    config = make_config(num_envs_per_worker=1, rollout_fragment_length=7, gamma=0.9,
                         env_config={"length": 5}, use_gae=False, normalize_rewards=False)
    worker = RolloutWorker(CountingEnv, PPOTorchPolicy, config)
    policy = worker.get_policy()
    batch = worker.sample()
    pieces = batch.split_by_episode()
    finished, cut = pieces[0], pieces[1]
    assert finished[SampleBatch.TERMINATEDS][-1]
    # Terminated: value target of the last step is just its reward.
    assert finished[SampleBatch.VALUE_TARGETS][-1] == pytest.approx(1.0)
    # Cut after 2 steps: bootstrap from V(new_obs[-1]).
    v_last = policy.value(cut[SampleBatch.NEW_OBS][-1:])[0]
    assert cut[SampleBatch.VALUE_TARGETS][-1] == pytest.approx(1.0 + 0.9 * v_last, rel=1e-5)


def test_vectorized_sampling_uses_one_forward_pass_per_step():
    config = make_config(num_envs_per_worker=4, rollout_fragment_length=10)
    worker = RolloutWorker(cartpole(), PPOTorchPolicy, config)
    policy = worker.get_policy()
    calls = []
    original = policy.compute_actions

    def counting(obs_batch, explore=True):
        calls.append(len(obs_batch))
        return original(obs_batch, explore=explore)

    policy.compute_actions = counting
    batch = worker.sample()
    assert batch.count == 40
    assert calls == [4] * 10


def test_seeding_makes_sampling_reproducible():
    config = make_config(num_envs_per_worker=2, rollout_fragment_length=20, seed=7)
    a = RolloutWorker(cartpole(), PPOTorchPolicy, config).sample()
    b = RolloutWorker(cartpole(), PPOTorchPolicy, config).sample()
    np.testing.assert_array_equal(a[SampleBatch.OBS], b[SampleBatch.OBS])
    np.testing.assert_array_equal(a[SampleBatch.ACTIONS], b[SampleBatch.ACTIONS])
    c = RolloutWorker(cartpole(), PPOTorchPolicy, config, worker_index=1).sample()
    assert not np.array_equal(a[SampleBatch.OBS], c[SampleBatch.OBS])


def test_env_context_carries_indexes_and_config():
    seen = []

    def creator(ctx):
        seen.append((dict(ctx), ctx.worker_index, ctx.vector_index))
        return CountingEnv(ctx)

    config = make_config(num_envs_per_worker=2, env_config={"length": 3})
    RolloutWorker(creator, PPOTorchPolicy, config, worker_index=2)
    assert seen == [({"length": 3}, 2, 0), ({"length": 3}, 2, 1)]


def test_old_gym_api_env_is_adapted():
    env = make_env_creator(OldAPIEnv)(EnvContext())
    assert isinstance(env, OldGymAPIAdapter)
    obs, info = env.reset(seed=0)
    assert obs.shape == (2,) and info == {}
    for _ in range(2):
        assert env.step(0)[2:4] == (False, False)
    _, _, terminated, truncated, _ = env.step(0)
    assert (terminated, truncated) == (False, True)  # a time-limit end is a truncation
    config = make_config(rollout_fragment_length=6, num_envs_per_worker=1)
    batch = RolloutWorker(OldAPIEnv, PPOTorchPolicy, config).sample()
    assert batch.count == 6 and batch[SampleBatch.TRUNCATEDS].sum() == 2


def test_gymnasium_module_env_ids_import_their_module():
    """gymnasium's "module:EnvId": the module registers the id; typos and missing
    modules are ValueErrors that say which."""
    creator = make_env_creator("minigrid:MiniGrid-Empty-5x5-v0")
    env = creator(EnvContext({}))
    assert env.unwrapped.spec.id == "MiniGrid-Empty-5x5-v0"
    with pytest.raises(ValueError, match=r"importing 'minigrid' registered no gymnasium env "
                                         r"'MiniGrid-Empty-5x5-v9'\. Did you mean "
                                         r"'MiniGrid-Empty-5x5-v0'"):
        make_env_creator("minigrid:MiniGrid-Empty-5x5-v9")
    with pytest.raises(ValueError, match=r"module 'no_such_env_module'.*cannot be imported"):
        make_env_creator("no_such_env_module:Corridor-v0")


def test_register_env_and_unknown_env_error():
    register_env("counting-test-env", lambda ctx: CountingEnv(ctx))
    env = make_env_creator("counting-test-env")(EnvContext({"length": 2}))
    assert env.length == 2
    with pytest.raises(ValueError, match=r"Unknown env 'CartPole-v9'.*Did you mean 'CartPole-v"):
        make_env_creator("CartPole-v9")


def test_box_actions_are_clipped_for_the_env_but_stored_raw():
    seen = []

    class RecordingPendulum(gym.Wrapper):
        def step(self, action):
            seen.append(np.array(action))
            return super().step(action)

    config = make_config(rollout_fragment_length=50, seed=0, num_envs_per_worker=1)
    worker = RolloutWorker(lambda ctx: RecordingPendulum(gym.make("Pendulum-v1")),
                           PGTorchPolicy, config)
    batch = worker.sample()
    seen = np.stack(seen)
    assert np.all(np.abs(seen) <= 2.0)
    np.testing.assert_allclose(np.clip(batch[SampleBatch.ACTIONS], -2, 2), seen, rtol=1e-6)


def test_num_workers_zero_runs_without_ray():
    code = (
        "import ray\n"
        "from flowrl.plans.ppo import PPOAgent\n"
        "a = PPOAgent(config={'train_batch_size': 256, 'sgd_minibatch_size': 64,"
        " 'rollout_fragment_length': 32, 'num_sgd_iter': 1}, env='CartPole-v1',"
        " log_to_disk=False)\n"
        "a.train()\n"
        "assert not ray.is_initialized(), 'ray was started'\n"
        "print('NO_RAY_OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert "NO_RAY_OK" in out.stdout, out.stderr


def test_worker_set_foreach_and_weight_sync(ray_session):
    config = make_config(num_workers=2, num_cpus_per_worker=0.5, rollout_fragment_length=10)
    workers = WorkerSet(cartpole(), PPOTorchPolicy, config)
    try:
        assert workers.foreach_worker(lambda w: w.worker_index) == [0, 1, 2]
        assert workers.foreach_worker_with_index(lambda w, i: (w.worker_index, i)) == \
            [(0, 0), (1, 1), (2, 2)]
        pids = workers.foreach_worker(lambda w: w.get_pid())
        assert len(set(pids)) == 3  # the remote workers are separate processes
        # Perturb the local weights and broadcast: every worker must hold them.
        local = workers.local_worker().get_policy()
        weights = {k: v + 1.0 for k, v in local.get_weights().items()}
        local.set_weights(weights)
        workers.sync_weights({"timestep": 5})
        remote_weights = workers.foreach_worker(lambda w: w.get_weights())
        for w in remote_weights[1:]:
            for key, value in weights.items():
                np.testing.assert_allclose(w["default_policy"][key], value)
    finally:
        workers.stop()


def test_too_many_workers_fail_fast_with_a_clear_message(ray_session):
    with pytest.raises(ValueError, match=r"asks for 8 CPUs, but the Ray cluster has 2"):
        PPOAgent(config={"num_workers": 8, "num_cpus_per_worker": 1}, env="CartPole-v1",
                 log_to_disk=False)


def test_env_reported_episode_stats_replace_sampler_sums():
    """A RecordEpisodeStatistics layer below a reward-scaling wrapper reports raw returns."""

    def creator(ctx):
        env = gym.wrappers.RecordEpisodeStatistics(CountingEnv({"length": 4}))
        return gym.wrappers.TransformReward(env, lambda r: 0.5 * r)

    config = make_config(num_envs_per_worker=2, rollout_fragment_length=9,
                         normalize_rewards=False)
    worker = RolloutWorker(creator, PPOTorchPolicy, config)
    batch = worker.sample()
    assert batch[SampleBatch.REWARDS].max() == 0.5  # the learner sees scaled rewards
    assert worker.get_metrics() == [(4.0, 4)] * 4    # reports show the raw returns


def test_workers_that_cannot_be_scheduled_fail_with_numbers_not_hang(ray_session, monkeypatch):
    import flowrl.workers.actor_start as actor_start

    config = make_config(num_workers=2, num_cpus_per_worker=1.0)
    # The holder starts under the normal timeout: actors killed by earlier tests may
    # still be releasing their CPUs, and starting workers on a loaded machine takes
    # seconds. Only the second set, which can never be scheduled, gets the short one.
    holder = WorkerSet(cartpole(), PPOTorchPolicy, config)   # takes both CPUs
    monkeypatch.setattr(actor_start, "START_TIMEOUT_S", 3.0)
    try:
        with pytest.raises(RuntimeError, match=r"2 of 2 rollout workers did not start within "
                                               r"3 s: .* 0 of 2 CPUs free. Another agent"):
            WorkerSet(cartpole(), PPOTorchPolicy, config)
    finally:
        holder.stop()
