"""The Plan value: results, owned resources and named state, kept when results are extended."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from flowrl import build_agent
from flowrl.flow import LocalIterator, Metrics, Plan, as_plan
from flowrl.ops import ConcatBatches, ParallelRollouts, TrainOneStep
from flowrl.ops.concurrency import LearnerThread
from flowrl.plans import apex
from flowrl.plans.pg import DEFAULT_CONFIG as PG_CONFIG
from flowrl.policies.dqn import DQNTorchPolicy
from flowrl.policies.pg import PGTorchPolicy


class Resource:
    def __init__(self, name: str, log: list, fail: bool = False):
        self.name, self.log, self.fail = name, log, fail

    def stop(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} failed to stop")


class Counter:
    def __init__(self, value=0):
        self.value = value

    def save(self):
        return self.value

    def restore(self, state):
        self.value = state


def numbers() -> LocalIterator:
    return LocalIterator(lambda: iter({"n": i} for i in range(100)), name="Numbers")


def test_for_each_keeps_what_the_plan_owns_and_saves():
    log = []
    plan = Plan(numbers(), owns=(Resource("a", log),), state={"count": Counter(3)})
    extended = plan.for_each(lambda r: {**r, "twice": 2 * r["n"]})
    assert extended.owns == plan.owns and extended.state == plan.state
    assert next(extended) == {"n": 0, "twice": 0}
    assert "Numbers -> " in repr(extended)
    extended.stop()
    assert log == ["a"]
    assert extended.save() == {"count": 3}


def test_stop_runs_newest_first_and_reports_the_first_failure_after_all():
    log = []
    plan = Plan(numbers()).owning(Resource("shards", log), Resource("learner", log, fail=True))
    plan = plan.owning(Resource("last", log))
    with pytest.raises(RuntimeError, match="learner failed to stop"):
        plan.stop()
    assert log == ["last", "learner", "shards"]


def test_save_leaves_out_none_and_restore_names_unknown_state():
    plan = Plan(numbers(), state={"a": Counter(1), "off": Counter(None)})
    assert plan.save() == {"a": 1}
    plan.restore({"a": 7})
    assert plan.state["a"].value == 7
    with pytest.raises(ValueError, match=r"\['replay'\].*declares \['a', 'off'\]"):
        plan.restore({"replay": []})


def test_bad_declarations_are_rejected():
    with pytest.raises(TypeError, match="no stop"):
        Plan(numbers(), owns=(object(),))
    with pytest.raises(TypeError, match="'replay'.*lacks save"):
        Plan(numbers(), state={"replay": object()})
    with pytest.raises(ValueError, match="already declared"):
        Plan(numbers(), state={"a": Counter()}).saving(a=Counter())
    with pytest.raises(TypeError, match="returned dict, not a Plan"):
        as_plan({"not": "a plan"}, "my_plan")


def test_a_bare_iterator_is_wrapped_with_one_warning():
    with pytest.warns(FutureWarning, match="my_plan returned a bare iterator") as caught:
        plan = as_plan(numbers(), "my_plan")
    assert len(caught) == 1
    assert next(plan) == {"n": 0} and plan.owns == () and plan.state == {}


def old_style_plan(workers, config, metrics: Metrics):
    """A plan written before Plan values: it returns the bare results iterator."""
    from flowrl.ops import StandardMetricsReporting
    train_op = (ParallelRollouts(workers, metrics)
                .combine(ConcatBatches(config["train_batch_size"], metrics))
                .for_each(TrainOneStep(workers, metrics)))
    return StandardMetricsReporting(train_op, workers, config, metrics).results


def test_an_old_style_plan_still_trains_with_one_warning(results_dir):
    OldPG = build_agent("OldStylePG", PG_CONFIG, PGTorchPolicy, old_style_plan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        agent = OldPG(env="CartPole-v1", config={"train_batch_size": 200}, log_to_disk=False)
    try:
        assert [str(w.message) for w in caught if w.category is FutureWarning] == [
            "OldStylePG.execution_plan returned a bare iterator; return a flowrl.flow.Plan "
            "(StandardMetricsReporting(...) already is one) so that the Agent can stop "
            "what the plan started and checkpoint what it holds. Bare iterators will stop "
            "being accepted."]
        assert agent.train()["timesteps_total"] >= 200
    finally:
        agent.stop()


def apex_with_a_result_hook(workers, config, metrics: Metrics) -> Plan:
    """Ape-X's plan with one more step after reporting."""
    return apex.execution_plan(workers, config, metrics).for_each(
        lambda result: {**result, "seen_by_hook": True})


def learner_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, LearnerThread) and t.is_alive()]


def test_apex_extended_after_reporting_stops_its_learner_and_saves_replay(ray_session,
                                                                          tmp_path):
    HookedApex = build_agent("HookedApex", apex.DEFAULT_CONFIG, DQNTorchPolicy,
                             apex_with_a_result_hook, validate_config=apex.validate_dqn_config)
    config = {"num_workers": 1, "num_cpus_per_worker": 0.5, "num_gpus": 0,
              "num_replay_buffer_shards": 1, "buffer_size": 5000, "learning_starts": 200,
              "rollout_fragment_length": 50, "train_batch_size": 32,
              "timesteps_per_iteration": 400, "min_iter_time_s": 0,
              "checkpoint_replay_buffer": True, "seed": 0}
    before = set(learner_threads())
    agent = HookedApex(env="CartPole-v1", config=config, log_to_disk=False)
    try:
        result = agent.train()
        assert result["seen_by_hook"] is True
        assert len(set(learner_threads()) - before) == 1
        path = agent.save(str(tmp_path / "apex"))
        stored = result["replay"]["size"]
    finally:
        agent.stop()
    assert set(learner_threads()) - before == set()
    fresh = HookedApex(env="CartPole-v1", config=config, log_to_disk=False)
    try:
        fresh.restore(path)
        (shard,) = fresh.plan.state["replay"].buffers
        import ray
        assert ray.get(shard.stats.remote())["size"] >= stored > 0
    finally:
        fresh.stop()


def test_two_trainer_example_checkpoints_its_replay(ray_session, tmp_path):
    from examples.two_trainer_workflow import TwoTrainerWorkflow
    config = {"seed": 0, "checkpoint_replay_buffer": True}
    agent = TwoTrainerWorkflow(config=config, log_to_disk=False)
    try:
        agent.train()
        agent.train()
        (buffer,) = agent.plan.state["replay"].buffers
        size = buffer.stats()["size"]
        assert size > 0
        path = agent.save(str(tmp_path / "two"))
    finally:
        agent.stop()
    fresh = TwoTrainerWorkflow(config=config, log_to_disk=False)
    try:
        fresh.restore(path)
        (restored,) = fresh.plan.state["replay"].buffers
        assert restored.stats()["size"] == size
        np.testing.assert_equal(restored.get_state()["buffer"], buffer.get_state()["buffer"])
    finally:
        fresh.stop()


@pytest.mark.parametrize("kl_target, factor", [(1e-7, 1.5), (10.0, 0.5)])
def test_ppo_train_adapts_kl_coeff_through_update_kl(kl_target, factor):
    """UpdateKL inside PPO's plan: after each train() the learner's kl_coeff follows the
    KL reported by that iteration (x1.5 above 2x the target, x0.5 below half of it),
    and the next iteration's loss uses the new coefficient."""
    from flowrl import get_agent_class
    agent = get_agent_class("PPO")(config={
        "train_batch_size": 200, "rollout_fragment_length": 50, "sgd_minibatch_size": 100,
        "num_sgd_iter": 2, "lr": 1e-3, "seed": 0, "kl_coeff": 0.2, "kl_target": kl_target},
        env="CartPole-v1", log_to_disk=False)
    try:
        expected = 0.2
        for _ in range(3):
            stats = agent.train()["info"]["learner"]["default_policy"]
            assert stats["cur_kl_coeff"] == pytest.approx(expected)
            assert 2 * kl_target < stats["kl"] if factor > 1 else stats["kl"] < kl_target / 2
            expected *= factor
            assert agent.get_policy().kl_coeff == pytest.approx(expected)
    finally:
        agent.stop()
