"""Data-parallel learners (``num_learners``): config checks, sharding, and two real gloo
learners (Ray actors on CPU) against one learner on the same batches.

The comparisons build a reference RolloutWorker (learning in-process) and a worker with
``num_learners: 2`` from the same state, feed both the same batches, and check that
(a) the two learners hold bit-identical weights after every update and (b) with one SGD
step per epoch the update equals the single learner's on the whole batch (gradients
averaged over the shards, then clipped) up to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowrl.algorithms.trainable import get_trainable_class
from flowrl.data.sample_batch import SampleBatch, minibatch_bounds
from flowrl.plans.a2c import A2CAgent
from flowrl.plans.ddpg import DDPGAgent
from flowrl.plans.dqn import DQNAgent
from flowrl.plans.impala import ImpalaAgent
from flowrl.plans.ppo import PPOAgent
from flowrl.plans.sac import SACAgent
from flowrl.policies.a2c import A2CTorchPolicy
from flowrl.policies.ddpg import DDPGTorchPolicy
from flowrl.policies.dqn import DQNTorchPolicy
from flowrl.envs import make_env_creator, register_env
from flowrl.envs.multi_agent import MultiCartPole
from flowrl.policies.impala import VTraceTorchPolicy, split_pieces
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.policies.sac import SACTorchPolicy
from flowrl.workers import RolloutWorker
from flowrl.workers.learner_group import merge_learner_stats, plan_shards
from flowrl.workers.rollout_worker import policy_gpus

SMALL = {"fcnet_hiddens": [32, 32]}
LSTM = {"use_lstm": True, "lstm_cell_size": 16, "fcnet_hiddens": [32], "max_seq_len": 7}
register_env("learner_group_ma_cartpole",
             lambda ctx: MultiCartPole({"num_agents": 2, **ctx}))


def worker_pair(agent_cls, policy_cls, env="CartPole-v1", **overrides):
    """(reference worker learning in-process, worker with two learners), same state."""
    config = agent_cls.merge_config({"env": env, "seed": 3, "model": SMALL, **overrides})
    creator = make_env_creator(env)
    reference = RolloutWorker(creator, policy_cls, config)
    grouped = RolloutWorker(creator, policy_cls, {**config, "num_learners": 2,
                                                 "num_cpus_per_learner": 0.5})
    grouped.set_state(reference.get_state())
    return reference, grouped


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max())
               for k in a)


def assert_learners_identical(worker: RolloutWorker) -> None:
    """Every learner holds exactly learner 0's weights, and so does the local worker."""
    per_learner = worker.learner_group.learner_weights()
    local = worker.get_weights()
    for weights in per_learner:
        for pid, policy_weights in weights.items():
            for key, value in policy_weights.items():
                assert np.array_equal(value, per_learner[0][pid][key]), (pid, key)
                assert np.array_equal(value, local[pid][key]), (pid, key)


def standardized(batch: SampleBatch) -> SampleBatch:
    adv = batch["advantages"]
    batch["advantages"] = ((adv - adv.mean()) / (adv.std() + 1e-8)).astype(np.float32)
    return batch


# -- config ---------------------------------------------------------------------------
def test_default_is_learning_in_the_driver():
    config = PPOAgent.merge_config({"env": "CartPole-v1"})
    assert config["num_learners"] == 0
    worker = RolloutWorker(make_env_creator("CartPole-v1"), PPOTorchPolicy,
                           {**config, "train_batch_size": 64})
    stats = worker.learn_on_batch(standardized(worker.sample()))
    assert worker.learner_group is None and "grad_gnorm" in stats["default_policy"]
    assert worker.get_policy().gradient_hook is None


@pytest.mark.parametrize("overrides, words", [
    ({"num_gpus": 2}, ["num_gpus=2", "num_learners: 2", "one per GPU"]),
    ({"num_gpus": 4, "num_learners": 2}, ["num_learners=2", "num_gpus must be 2"]),
    ({"num_gpus": 1, "num_learners": 2}, ["num_gpus must be 2", "or 0"]),
    ({"num_learners": -1}, ["num_learners=-1"]),
    ({"num_learners": 2, "num_cpus_per_learner": 0}, ["num_cpus_per_learner=0"]),
    ({"num_gpus_per_learner": 1}, ["'num_gpus'"]),
])
def test_gpu_and_learner_counts_that_cannot_work_fail_clearly(overrides, words):
    with pytest.raises(ValueError) as error:
        PPOAgent.merge_config({"env": "CartPole-v1", **overrides})
    for word in words:
        assert word in str(error.value)


def test_gpu_learners_without_gpus_fail_before_training(ray_session):
    import ray
    if ray.cluster_resources().get("GPU", 0) >= 2:
        pytest.skip("this cluster has the GPUs")
    # The agent fails while it builds its local worker, before any learner starts.
    with pytest.raises(ValueError, match=r"needs 2 GPUs \(one per learner\).*has 0"):
        PPOAgent(config={"env": "CartPole-v1", "num_learners": 2, "num_gpus": 2})


def test_learners_that_cannot_be_scheduled_fail_with_numbers_not_hang(ray_session,
                                                                      monkeypatch):
    import flowrl.workers.actor_start as actor_start
    from flowrl.workers import WorkerSet

    holder_config = PPOAgent.merge_config({"env": "CartPole-v1", "num_workers": 2,
                                           "num_cpus_per_worker": 1.0, "model": SMALL})
    # Started under the normal timeout (a loaded machine starts actors slowly); only the
    # learners, which can never be scheduled while it holds both CPUs, get the short one.
    holder = WorkerSet(make_env_creator("CartPole-v1"), PPOTorchPolicy, holder_config)
    monkeypatch.setattr(actor_start, "START_TIMEOUT_S", 3.0)
    reference, grouped = worker_pair(PPOAgent, PPOTorchPolicy)
    try:
        with pytest.raises(RuntimeError, match=r"2 of 2 learners did not start within 3 s: "
                                               r"each needs 0.5 CPU and 0 GPU and the Ray "
                                               r"cluster has 0 of 2 CPUs free\. .* lower "
                                               r"num_learners / num_cpus_per_learner"):
            grouped.learn_on_batch(reference.sample())
        assert grouped.learner_group is None  # nothing half-started is kept
    finally:
        grouped.stop()
        holder.stop()


def test_policy_devices_follow_the_gpu_settings():
    config = PPOAgent.merge_config({"env": "CartPole-v1", "num_gpus": 1,
                                    "num_gpus_per_worker": 0.5})
    assert policy_gpus(config, 0) == 1      # the driver learns on its GPU
    assert policy_gpus(config, 3) == 0.5    # rollout workers act on theirs
    learners = PPOAgent.merge_config({"env": "CartPole-v1", "num_learners": 1, "num_gpus": 1})
    assert policy_gpus(learners, 0) == 0    # the learner actor holds the GPU
    remote = RolloutWorker(make_env_creator("CartPole-v1"), PPOTorchPolicy, config,
                           worker_index=1, num_workers=1)
    assert remote.get_policy().config["num_gpus"] == 0.5


def test_trial_resources_hold_a_bundle_per_learner(ray_session):
    trainable = get_trainable_class("PPO")
    request = trainable.default_resource_request(
        {"env": "CartPole-v1", "num_learners": 2, "num_cpus_per_learner": 0.25,
         "num_cpus_for_driver": 0.5, "num_workers": 1, "num_cpus_per_worker": 0.5})
    assert request.bundles == [{"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.5}]
    # GPU learners get one GPU each in their own bundles; this 2-CPU, 0-GPU session's
    # cluster cannot hold them, which the request says before any actor starts.
    with pytest.raises(ValueError, match="asks for 2 GPUs, but the Ray cluster has 0"):
        trainable.default_resource_request(
            {"env": "CartPole-v1", "num_learners": 2, "num_gpus": 2,
             "num_cpus_per_learner": 0.25, "num_cpus_for_driver": 0.5})
    default = trainable.default_resource_request({"env": "CartPole-v1"})
    assert default.bundles == [{"CPU": 1}]


# -- sharding -------------------------------------------------------------------------
@pytest.mark.parametrize("count, minibatch, learners", [
    (4000, 128, 2), (4001, 16, 2), (400, 0, 2), (403, 64, 3), (10, 3, 3), (57, 8, 4),
    (8001, 7, 3)])
def test_every_learner_takes_the_same_number_of_steps(count, minibatch, learners):
    policy = PPOTorchPolicy(*spaces(), {"model": SMALL})
    batch = SampleBatch(obs=np.zeros((count, 4), np.float32))
    plan = plan_shards(policy, batch, learners, minibatch)
    assert plan.bounds[0][0] == 0 and plan.bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(plan.bounds, plan.bounds[1:]))
    assert max(plan.rows) - min(plan.rows) <= 1
    steps = {len(minibatch_bounds(n, size)) for n, size in zip(plan.rows, plan.minibatch_sizes)}
    assert len(steps) == 1
    single = len(minibatch_bounds(count, minibatch))
    assert 1 <= steps.pop() <= single
    if count % learners == 0 and minibatch % learners == 0:
        assert len(minibatch_bounds(plan.rows[0], plan.minibatch_sizes[0])) == single
    assert sum(plan.scales) == pytest.approx(learners)


def spaces():
    import gymnasium as gym
    return gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(2)


def test_recurrent_shards_hold_whole_sequences_and_one_step():
    policy = PPOTorchPolicy(*spaces(), {"model": {"use_lstm": True, "max_seq_len": 5,
                                                  "lstm_cell_size": 8}})
    eps_id = np.repeat([0, 1, 2, 3], [7, 3, 9, 5])
    batch = SampleBatch(obs=np.zeros((24, 4), np.float32), eps_id=eps_id,
                        t=np.concatenate([np.arange(n) for n in (7, 3, 9, 5)]))
    starts = {0, 5, 7, 10, 15, 19, 24}  # sequences of at most 5 rows within episodes
    plan = plan_shards(policy, batch, 2, 0)
    assert all(start in starts for start, _ in plan.bounds)
    with pytest.raises(ValueError, match="one SGD step per epoch"):
        plan_shards(policy, batch, 2, 8)


def test_learner_stats_merge_back_into_batch_order():
    stats = [{"loss": 1.0, "td_error": np.array([1.0, 2.0]), "num_updates": 3, "lr": 0.1},
             {"loss": 4.0, "td_error": np.array([3.0]), "num_updates": 3, "lr": 0.1}]
    merged = merge_learner_stats(stats, [2, 1], ("td_error",))
    assert merged["loss"] == pytest.approx(2.0)  # weighted by rows
    assert merged["td_error"].tolist() == [1.0, 2.0, 3.0]
    assert merged["num_updates"] == 3 and merged["lr"] == 0.1


# -- two learners against one ---------------------------------------------------------
@pytest.mark.parametrize("agent_cls, policy_cls", [(PPOAgent, PPOTorchPolicy),
                                                   (A2CAgent, A2CTorchPolicy)])
def test_two_learners_take_the_single_learner_step(ray_session, agent_cls, policy_cls):
    reference, grouped = worker_pair(agent_cls, policy_cls, rollout_fragment_length=300,
                                     observation_filter="MeanStdFilter", grad_clip=0.5)
    try:
        for _ in range(3):
            batch = standardized(reference.sample())
            expected = reference.learn_on_batch(batch, 3, 0)["default_policy"]
            got = grouped.learn_on_batch(batch, 3, 0)["default_policy"]
            assert_learners_identical(grouped)
            # Averaged, then clipped (the norm is far above 0.5): the whole-batch step.
            assert got["grad_gnorm"] == pytest.approx(expected["grad_gnorm"], rel=1e-5)
            assert expected["grad_gnorm"] > 0.5
            assert set(got) == set(expected)
            assert max_diff(reference.get_weights()["default_policy"],
                            grouped.get_weights()["default_policy"]) < 1e-5
            if "kl" in expected:  # UpdateKL on the driver reaches the learners
                reference.get_policy().update_kl(expected["kl"])
                grouped.get_policy().update_kl(got["kl"])
        learned = grouped.get_state()["default_policy"]
        assert learned["optimizer"]["state"], "the learners' optimizer state"
        if "kl_coeff" in learned:
            assert learned["kl_coeff"] == reference.get_policy().kl_coeff < 0.2
        # Gradients from elsewhere (A3C, A2C microbatches): every learner applies them.
        grads, _ = reference.compute_gradients(batch)
        reference.apply_gradients(grads)
        grouped.apply_gradients(grads)
        assert_learners_identical(grouped)
        assert max_diff(reference.get_weights()["default_policy"],
                        grouped.get_weights()["default_policy"]) < 1e-5
        # Minibatches: each learner shuffles its own shard, same number of steps.
        got = grouped.learn_on_batch(batch, 2, 64)["default_policy"]
        assert_learners_identical(grouped)
        assert set(got) == set(expected)
    finally:
        grouped.stop()


def test_recurrent_ppo_shards_whole_sequences_and_matches_one_learner(ray_session):
    reference, grouped = worker_pair(PPOAgent, PPOTorchPolicy, rollout_fragment_length=100,
                                     num_envs_per_worker=2, model=LSTM)
    try:
        for _ in range(2):
            batch = standardized(reference.sample())
            expected = reference.learn_on_batch(batch, 2, 0)["default_policy"]
            got = grouped.learn_on_batch(batch, 2, 0)["default_policy"]
            assert_learners_identical(grouped)
            assert got["grad_gnorm"] == pytest.approx(expected["grad_gnorm"], rel=1e-5)
        assert max_diff(reference.get_weights()["default_policy"],
                        grouped.get_weights()["default_policy"]) < 1e-5
        with pytest.raises(ValueError, match="sgd_minibatch_size: 0"):
            grouped.learn_on_batch(batch, 1, 64)
    finally:
        grouped.stop()


def test_dqn_td_errors_come_back_in_batch_order_and_targets_follow(ray_session):
    reference, grouped = worker_pair(DQNAgent, DQNTorchPolicy, rollout_fragment_length=64,
                                     n_step=1)
    try:
        batch = reference.sample()
        batch["weights"] = np.linspace(0.5, 1.0, batch.count).astype(np.float32)
        expected = reference.learn_on_batch(batch)["default_policy"]
        got = grouped.learn_on_batch(batch)["default_policy"]
        assert got["td_error"].shape == (batch.count,)
        np.testing.assert_allclose(got["td_error"], expected["td_error"], rtol=1e-5, atol=1e-6)
        assert_learners_identical(grouped)
        for _ in range(3):
            reference.learn_on_batch(batch)
            grouped.learn_on_batch(batch)
            assert_learners_identical(grouped)
        assert max_diff(reference.get_weights()["default_policy"],
                        grouped.get_weights()["default_policy"]) < 1e-5
        # UpdateTargetNetwork runs update_target through foreach_policy: learners too.
        grouped.foreach_policy(lambda policy, _pid: policy.update_target())
        learner_target = grouped.get_state()["default_policy"]["target_weights"]
        online = grouped.get_weights()["default_policy"]
        assert all(np.array_equal(learner_target[k].numpy(), online[k]) for k in learner_target)
    finally:
        grouped.stop()


def test_ddpg_actor_and_critic_steps_stay_identical(ray_session):
    reference, grouped = worker_pair(DDPGAgent, DDPGTorchPolicy, env="Pendulum-v1",
                                     rollout_fragment_length=64, policy_delay=2,
                                     actor_hiddens=[32], critic_hiddens=[32],
                                     # Each learner draws its own smoothing noise: off,
                                     # so that the step can equal the single learner's.
                                     smooth_target_policy=False)
    try:
        batch = reference.sample()
        for step in range(4):  # the actor steps on every second call
            expected = reference.learn_on_batch(batch)["default_policy"]
            got = grouped.learn_on_batch(batch)["default_policy"]
            assert_learners_identical(grouped)
            if step == 0:
                np.testing.assert_allclose(got["td_error"], expected["td_error"],
                                           rtol=1e-5, atol=1e-6)
        assert got["num_actor_updates"] == expected["num_actor_updates"] == 2
        assert max_diff(reference.get_weights()["default_policy"],
                        grouped.get_weights()["default_policy"]) < 1e-4
    finally:
        grouped.stop()


def test_sac_learners_stay_identical_alpha_included(ray_session):
    """SAC's actor, twin critics and entropy temperature all step on averaged
    gradients. Each learner samples its own actions, so the step is close to one
    learner's, not equal: the learners must still agree bit for bit."""
    reference, grouped = worker_pair(SACAgent, SACTorchPolicy, env="Pendulum-v1",
                                     rollout_fragment_length=64)
    try:
        batch = reference.sample()
        start = grouped.get_state()["default_policy"]
        for _ in range(4):
            expected = reference.learn_on_batch(batch)["default_policy"]
            got = grouped.learn_on_batch(batch)["default_policy"]
            assert_learners_identical(grouped)
            assert got["critic_loss"] == pytest.approx(expected["critic_loss"], rel=0.05)
            assert got["alpha"] == pytest.approx(expected["alpha"], rel=1e-3)
        learned = grouped.get_state()["default_policy"]
        assert float(learned["log_alpha"]) < float(start["log_alpha"])  # alpha stepped
        assert max_diff(start["weights"], learned["weights"]) > 1e-4
    finally:
        grouped.stop()


def test_impala_shards_whole_pieces_and_matches_one_learner(ray_session):
    reference, grouped = worker_pair(ImpalaAgent, VTraceTorchPolicy, num_workers=1,
                                     num_envs_per_worker=3, rollout_fragment_length=40)
    try:
        batch = reference.sample()
        starts, _ = split_pieces(batch)
        plan = plan_shards(reference.get_policy(), batch, 2, 0)
        assert plan.bounds[1][0] in set(starts.tolist())
        for _ in range(3):
            expected = reference.learn_on_batch(batch)["default_policy"]
            got = grouped.learn_on_batch(batch)["default_policy"]
            assert_learners_identical(grouped)
        assert got["grad_gnorm"] == pytest.approx(expected["grad_gnorm"], rel=1e-4)
        assert max_diff(reference.get_weights()["default_policy"],
                        grouped.get_weights()["default_policy"]) < 1e-5
    finally:
        grouped.stop()


# -- whole agents: plans unchanged ------------------------------------------------------
def test_ppo_agent_learners_identical_after_every_train_and_workers_get_learner_0(
        ray_session):
    agent = PPOAgent(config={
        "env": "CartPole-v1", "seed": 0, "num_learners": 2, "num_cpus_per_learner": 0.5,
        "num_workers": 1, "train_batch_size": 400, "rollout_fragment_length": 200,
        "sgd_minibatch_size": 100, "num_sgd_iter": 2, "model": SMALL})
    try:
        for _ in range(3):
            result = agent.train()
            local = agent.workers.local_worker()
            assert_learners_identical(local)
            import ray
            remote = ray.get(agent.workers.remote_workers()[0].get_weights.remote())
            assert max_diff(remote["default_policy"], local.get_weights()["default_policy"]) == 0
        stats = result["info"]["learner"]["default_policy"]
        assert {"kl", "policy_loss", "cur_kl_coeff"} <= set(stats)
    finally:
        agent.stop()


def test_dqn_agent_learners_identical_after_every_train(ray_session):
    agent = DQNAgent(config={
        "env": "CartPole-v1", "seed": 0, "num_learners": 2, "num_cpus_per_learner": 0.5,
        "learning_starts": 100, "timesteps_per_iteration": 200,
        "target_network_update_freq": 100, "model": SMALL})
    try:
        for _ in range(2):
            result = agent.train()
            assert_learners_identical(agent.workers.local_worker())
        assert result["info"]["num_target_updates"] >= 2
    finally:
        agent.stop()


def test_multi_agent_learners_train_their_policies_and_checkpoints_restore(ray_session,
                                                                           tmp_path):
    config = {"env": "learner_group_ma_cartpole", "seed": 0, "num_learners": 2,
              "num_cpus_per_learner": 0.5, "train_batch_size": 256,
              "rollout_fragment_length": 64, "sgd_minibatch_size": 64, "num_sgd_iter": 2,
              "model": SMALL,
              "multiagent": {"policies": ["p0", "p1"],
                             "policy_mapping_fn": {"agent_0": "p0", "agent_1": "p1"},
                             "policies_to_train": ["p0"]}}
    agent = PPOAgent(config=config, log_to_disk=False)
    try:
        frozen = agent.get_policy("p1").get_weights()
        assert set(agent.train()["info"]["learner"]) == {"p0"}
        local = agent.workers.local_worker()
        assert set(local.learner_group.learner_weights()[0]) == {"p0"}  # p1 only acts
        assert_learners_identical(local)
        assert max_diff(frozen, agent.get_policy("p1").get_weights()) == 0
        path = agent.save(str(tmp_path / "checkpoint"))
        trained = agent.get_policy("p0").get_weights()
    finally:
        agent.stop()
    restored = PPOAgent(config=config, log_to_disk=False)
    try:
        restored.restore(path)
        assert max_diff(trained, restored.get_policy("p0").get_weights()) == 0
        assert restored.workers.local_worker().get_state()["p0"]["optimizer"]["state"]
        restored.train()
        assert_learners_identical(restored.workers.local_worker())
    finally:
        restored.stop()


def test_tune_trial_places_its_learners_in_its_placement_group(ray_session, tmp_path):
    from ray import tune
    # The trial's bundles take both CPUs of the test cluster: learners started outside
    # its placement group could not be scheduled at all.
    trials = tune.run_experiments({"learners": {
        "run": "PPO", "env": "CartPole-v1", "stop": {"training_iteration": 2},
        "storage_path": str(tmp_path),
        "config": {"num_learners": 2, "num_cpus_per_learner": 0.5, "train_batch_size": 256,
                   "rollout_fragment_length": 128, "sgd_minibatch_size": 64,
                   "num_sgd_iter": 2, "model": SMALL}}}, verbose=0)
    assert [trial.status for trial in trials] == ["TERMINATED"]
    assert trials[0].last_result["training_iteration"] == 2


@pytest.mark.learning
def test_ppo_cartpole_with_two_learners_learns(ray_session):
    """Two learners at PPO's usual total batch (4000 rows, minibatches of 128) learn
    CartPole as one learner does. Seeds 0-2: 22.5k, 22.5k, 20.5k steps."""
    from learning_bars import assert_learns
    assert_learns("PPO", {"num_learners": 2, "num_cpus_per_learner": 0.5}, 150, 45_000,
                  typical=22_500)
