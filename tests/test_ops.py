"""RL operators on real workers, envs and (where needed) Ray actors."""

import sys

import gymnasium as gym
import numpy as np
import pytest
import ray.cloudpickle

from flowrl.data.items import Gradients, TrainedBatch
from flowrl.envs import make_env_creator
from flowrl.flow import Metrics, ParallelIterator, SourcedItem, from_items
from flowrl.ops import (ApplyGradients, AverageGradients, BroadcastWeights, ComputeGradients,
                        ConcatBatches, CountSampledSteps, ParallelRollouts, SelectExperiences,
                        StandardizeFields, StandardMetricsReporting, TrainOneStep)
from flowrl.plans.a2c import A2CAgent
from flowrl.plans.ppo import PPOAgent
from flowrl.policies.a2c import A2CTorchPolicy
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.data.sample_batch import MultiAgentBatch, SampleBatch
from flowrl.workers import WorkerSet


# Ray workers cannot import this test module: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_workers(num_workers=0, policy_cls=PPOTorchPolicy, env="CartPole-v1", **overrides):
    config = PPOAgent.merge_config({"env": env, "num_workers": num_workers,
                                    "num_cpus_per_worker": 0.5, "num_envs_per_worker": 2,
                                    "rollout_fragment_length": 16, "seed": 0, **overrides})
    creator = env if callable(env) else make_env_creator(env)
    return WorkerSet(creator, policy_cls, config)


def batch_of(n, start=0):
    return SampleBatch({"obs": np.arange(start, start + n, dtype=np.float32),
                        "advantages": np.arange(n, dtype=np.float32) * 3 + 7})


def test_concat_batches_buffers_until_min_size():
    metrics = Metrics()
    op = ConcatBatches(10, metrics)
    assert op(batch_of(4)) == []
    assert op(batch_of(4, 4)) == []
    (out,) = op(batch_of(4, 8))
    assert out.count == 12
    np.testing.assert_array_equal(out["obs"], np.arange(12))
    assert metrics.timer("sample").count == 1
    assert repr(op) == "ConcatBatches(10)"
    chain = from_items([batch_of(6) for _ in range(5)], metrics).combine(op)
    assert [b.count for b in chain.take(2)] == [12, 12]


def test_standardize_fields_per_policy():
    out = StandardizeFields(["advantages"])(batch_of(50))
    assert abs(out["advantages"].mean()) < 1e-5
    assert out["advantages"].std() == pytest.approx(1.0, rel=1e-4)
    multi = MultiAgentBatch({"a": batch_of(10), "b": batch_of(20)}, 20)
    for b in StandardizeFields(["advantages"])(multi).policy_batches.values():
        assert abs(b["advantages"].mean()) < 1e-5


def test_select_experiences():
    multi = MultiAgentBatch({"a": batch_of(10), "b": batch_of(20)}, 20)
    out = SelectExperiences(["b"])(multi)
    assert list(out.policy_batches) == ["b"] and out.env_steps == 20
    single = batch_of(3)
    assert SelectExperiences(["default_policy"])(single) is single


def test_local_rollouts_train_one_step_counts_and_learns():
    workers = make_workers()
    metrics = Metrics()
    rollouts = ParallelRollouts(workers, metrics, mode="bulk_sync")
    before = workers.local_worker().get_weights()["default_policy"]
    train = rollouts.combine(ConcatBatches(64, metrics)).for_each(
        TrainOneStep(workers, metrics, num_sgd_iter=2, sgd_minibatch_size=32))
    trained = next(train)
    assert isinstance(trained, TrainedBatch) and trained.source is None
    batch, info = trained.batch, trained.info
    assert batch.count == 64
    assert metrics.get("num_steps_sampled") == 64
    assert metrics.get("num_steps_trained") == 64
    assert "total_loss" in info["default_policy"]
    assert metrics.info["learner"] == info  # merged per policy, a copy
    after = workers.local_worker().get_weights()["default_policy"]
    assert any(not np.allclose(before[k], after[k]) for k in before)
    assert repr(train).startswith("ParallelRollouts(bulk_sync, local)")
    assert "TrainOneStep(2x32)" in repr(train)


def test_parallel_rollouts_modes_with_remote_workers(ray_session):
    workers = make_workers(num_workers=2)
    try:
        metrics = Metrics()
        bulk = ParallelRollouts(workers, metrics, mode="bulk_sync")
        batch = next(bulk)
        # One fragment (2 envs x 16 steps) from each of the 2 workers per round.
        assert batch.count == 2 * 2 * 16
        assert metrics.get("num_steps_sampled") == 64
        assert set(batch["eps_id"] >> 40) == {1, 2}  # episodes of both workers
        async_rollouts = ParallelRollouts(workers, metrics, mode="async", num_async=2)
        sources = {int(b["eps_id"][0] >> 40) for b in async_rollouts.take(6)}
        assert sources == {1, 2}
        assert isinstance(ParallelRollouts(workers, metrics, mode="raw"), ParallelIterator)
        with pytest.raises(ValueError, match="mode='sideways'"):
            ParallelRollouts(workers, metrics, mode="sideways")
    finally:
        workers.stop()


def test_broadcast_weights_reaches_all_workers(ray_session):
    workers = make_workers(num_workers=2)
    try:
        metrics = Metrics()
        metrics.inc("num_steps_sampled", 123)
        policy = workers.local_worker().get_policy()
        policy.set_weights({k: v * 0 + 0.5 for k, v in policy.get_weights().items()})
        assert BroadcastWeights(workers, metrics)("item") == "item"
        assert metrics.get("num_weight_broadcasts") == 1
        expected = policy.get_weights()  # 0.5 everywhere, observation-filter stats too
        for weights in workers.foreach_worker(lambda w: w.get_weights())[1:]:
            assert weights["default_policy"].keys() == expected.keys()
            for key, value in weights["default_policy"].items():
                np.testing.assert_allclose(value, expected[key], err_msg=key)
    finally:
        workers.stop()


def test_gradient_ops_average_and_apply():
    workers = make_workers(policy_cls=A2CTorchPolicy)
    metrics = Metrics()
    local = workers.local_worker()
    batches = [local.sample() for _ in range(3)]
    compute = ComputeGradients(workers, metrics)
    items = [compute(b) for b in batches]
    assert all(isinstance(item, Gradients) and "total_loss" in item.info["default_policy"]
               for item in items)
    averaged = AverageGradients()(items)
    assert averaged.count == sum(b.count for b in batches) and averaged.source is None
    for i, g in enumerate(averaged.grads["default_policy"]):
        expected = np.mean([item.grads["default_policy"][i] for item in items], axis=0)
        np.testing.assert_allclose(g, expected, rtol=1e-6)
    before = local.get_weights()["default_policy"]
    assert ApplyGradients(workers, metrics)(averaged) is averaged
    after = local.get_weights()["default_policy"]
    assert any(not np.allclose(before[k], after[k]) for k in before)
    assert metrics.get("num_steps_trained") == averaged.count


def test_apply_gradients_updates_only_the_source_worker(ray_session):
    workers = make_workers(num_workers=2, policy_cls=A2CTorchPolicy)
    try:
        metrics = Metrics()
        a, b = workers.remote_workers()
        grads, _ = workers.local_worker().compute_gradients(workers.local_worker().sample())
        ApplyGradients(workers, metrics, update_all=False)(Gradients(grads, 10, source=a))
        local = workers.local_worker().get_weights()["default_policy"]
        wa, wb = workers.foreach_worker(lambda w: w.get_weights())[1:]
        assert all(np.allclose(local[k], wa["default_policy"][k]) for k in local)
        assert any(not np.allclose(local[k], wb["default_policy"][k]) for k in local)
    finally:
        workers.stop()


def test_operators_reject_items_of_the_wrong_type_by_name():
    workers = make_workers(policy_cls=A2CTorchPolicy)
    metrics = Metrics()
    batch = batch_of(4)
    grads = ComputeGradients(workers, metrics)(workers.local_worker().sample())
    cases = [
        # A bare tuple that used to pass as "(grads, count)" is no longer accepted.
        (ApplyGradients(workers, metrics), (grads.grads, grads.count),
         "ApplyGradients expects Gradients items, got tuple"),
        (AverageGradients(), [grads, (grads.grads, 3)],
         "AverageGradients expects Gradients items, got tuple"),
        (AverageGradients(), grads, "AverageGradients expects a non-empty list of Gradients"),
        (ComputeGradients(workers, metrics), grads,
         "ComputeGradients expects SampleBatch or MultiAgentBatch items, got Gradients"),
        (TrainOneStep(workers, metrics), ("shard", batch),
         "TrainOneStep expects SampleBatch, MultiAgentBatch or SourcedItem of one, got tuple"),
        (TrainOneStep(workers, metrics), SourcedItem("shard", grads),
         "TrainOneStep expects .* got SourcedItem"),
        (CountSampledSteps(metrics), ("worker", batch), "CountSampledSteps expects"),
        (ConcatBatches(10), grads, "ConcatBatches expects SampleBatch or MultiAgentBatch"),
        (SelectExperiences(["a"]), "text", "SelectExperiences expects .* got str 'text'"),
        (StandardizeFields(["advantages"]), 3, "StandardizeFields expects .* got int 3"),
    ]
    for op, item, message in cases:
        with pytest.raises(TypeError, match=message):
            op(item)


def test_standard_metrics_reporting_waits_for_timesteps_per_iteration():
    workers = make_workers()
    metrics = Metrics()
    config = {"timesteps_per_iteration": 100, "min_iter_time_s": 0,
              "metrics_smoothing_episodes": 100}
    sampled = []

    def keep(batch):
        sampled.append(batch)
        return batch

    train = (ParallelRollouts(workers, metrics).for_each(keep)
             .for_each(TrainOneStep(workers, metrics)))
    report = StandardMetricsReporting(train, workers, config, metrics)
    result = next(report)
    assert result["timesteps_this_iter"] == 128  # 4 rounds of 32 steps reach >= 100
    assert result["timesteps_total"] == 128
    assert result["info"]["num_steps_trained"] == 128
    # The episodes the report counts are those that ended in the sampled rows, counted
    # here from the batches' own done flags (random CartPole ends every ~20 steps).
    assert sum(b.count for b in sampled) == 128
    ended = np.concatenate([b["terminateds"] | b["truncateds"] for b in sampled])
    lengths = np.concatenate([b["t"] for b in sampled])[ended] + 1
    assert len(lengths) >= 2
    assert result["episodes_this_iter"] == len(lengths)
    assert result["episodes_total"] == len(lengths)
    # CartPole pays 1 per step: each episode's return is its length.
    assert result["episode_len_mean"] == pytest.approx(lengths.mean())
    assert result["episode_reward_mean"] == pytest.approx(lengths.mean())
    assert "learn_time_ms" in result["timers"]


class ExplodingEnv(gym.Wrapper):
    """CartPole that raises on its 20th step."""

    def __init__(self, ctx):
        super().__init__(gym.make("CartPole-v1"))
        self.steps = 0

    def step(self, action):
        self.steps += 1
        if self.steps == 20:
            raise RuntimeError("env exploded at step 20")
        return super().step(action)


def test_remote_worker_error_names_operator_chain_and_worker(ray_session):
    workers = make_workers(num_workers=1, env=ExplodingEnv, num_envs_per_worker=1)
    try:
        rollouts = ParallelRollouts(workers, Metrics(), mode="bulk_sync")
        with pytest.raises(RuntimeError, match="env exploded at step 20") as info:
            for _ in range(3):
                next(rollouts)
        text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
        assert "ParallelRollouts" in text
        assert "worker index 1" in text and "pid" in text
    finally:
        workers.stop()


def test_a2c_microbatch_plan_trains():
    agent = A2CAgent(config={"microbatch_size": 40, "train_batch_size": 160},
                     env="CartPole-v1", log_to_disk=False)
    result = agent.train()
    assert result["info"]["num_steps_trained"] >= 160
    assert "ComputeGradients -> batch(4) -> AverageGradients" in repr(agent.plan)
    agent.stop()
