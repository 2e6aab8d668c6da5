"""Reliability on real processes: SIGKILLed rollout workers and replay shards are
replaced while training goes on; a crashing learner surfaces its own traceback; with
recreation off the error names the dead worker."""

import os
import signal
import sys
import time
import traceback

import numpy as np
import pytest
import ray
import yaml

from flowrl import get_agent_class
from flowrl.plans.apex import ApexAgent
from flowrl.policies.dqn import DQNTorchPolicy

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PPO_TWO_WORKERS = {"num_workers": 2, "num_cpus_per_worker": 0.5, "num_envs_per_worker": 4,
                   "rollout_fragment_length": 128, "train_batch_size": 1024,
                   "sgd_minibatch_size": 128, "num_sgd_iter": 10, "lr": 3e-4}


def sigkill(actor) -> int:
    """kill -9 the actor's process (what the OOM killer does); returns its pid."""
    pid = ray.get(actor.get_pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def train_until(agent, predicate, max_iterations):
    for _ in range(max_iterations):
        result = agent.train()
        if predicate(result):
            return result
    pytest.fail(f"condition not met in {max_iterations} iterations; last: "
                f"{ {k: result.get(k) for k in ('timesteps_total', 'episode_reward_mean', 'num_healthy_workers')} }")


@pytest.mark.learning
def test_ppo_survives_kill_minus_9_of_a_rollout_worker(ray_session):
    agent = get_agent_class("PPO")(config={**PPO_TWO_WORKERS, "seed": 0}, env="CartPole-v1",
                                   log_to_disk=False)
    try:
        before = train_until(agent, lambda r: r["episode_reward_mean"] >= 40, 40)
        victim = agent.workers.remote_workers()[0]
        sigkill(victim)
        after = [agent.train() for _ in range(2)]
        assert all(r["timesteps_total"] > before["timesteps_total"] for r in after)
        # Training goes on and later iterations see both workers again, one restart.
        final = train_until(agent, lambda r: r["episode_reward_mean"] >= 150, 60)
        assert final["num_healthy_workers"] == 2
        assert final["info"]["num_worker_restarts"] == 1
        assert victim not in agent.workers.remote_workers()
        assert final["timesteps_total"] > before["timesteps_total"]
    finally:
        agent.stop()


@pytest.mark.learning
def test_apex_survives_kill_of_a_worker_and_a_replay_shard(ray_session):
    (spec,) = yaml.safe_load(open(os.path.join(
        ROOT, "flowrl", "tuned_examples", "cartpole-apex.yaml"))).values()
    config = {**spec["config"], "num_replay_buffer_shards": 2, "seed": 0}
    agent = ApexAgent(config=config, env=spec["env"], log_to_disk=False)
    try:
        before = train_until(agent, lambda r: r["info"].get("num_steps_trained", 0) > 0, 30)
        sigkill(agent.workers.remote_workers()[1])
        shard = agent.plan.state["replay"].buffers[0]
        sigkill(shard)
        final = train_until(
            agent, lambda r: r["episode_reward_mean"] >= 100 and r["num_healthy_workers"] == 2
            and r["replay"]["num_healthy_shards"] == 2, 80)
        assert final["info"]["num_worker_restarts"] == 1
        assert final["replay"]["num_shard_restarts"] == 1
        assert shard not in agent.plan.state["replay"].buffers
        assert final["info"]["num_steps_trained"] > before["info"]["num_steps_trained"]
        assert final["timesteps_total"] > before["timesteps_total"]
    finally:
        agent.stop()


def test_with_recreation_off_the_error_names_the_dead_worker(ray_session):
    config = {**PPO_TWO_WORKERS, "train_batch_size": 256, "rollout_fragment_length": 32,
              "num_sgd_iter": 1, "recreate_failed_workers": False}
    agent = get_agent_class("PPO")(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        agent.train()
        pid = sigkill(agent.workers.remote_workers()[1])
        with pytest.raises(RuntimeError) as info:
            for _ in range(10):
                agent.train()
        message = str(info.value)
        assert f"Rollout worker 2 (pid {pid}) died and recreate_failed_workers is off" \
            in message
        assert isinstance(info.value.__cause__, ray.exceptions.RayActorError)
    finally:
        agent.stop()


class LossInjectedError(ValueError):
    pass


class FailingDQNPolicy(DQNTorchPolicy):
    """Its loss raises on the third learner update."""

    calls = 0

    def learn_on_batch(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 3:
            self.raised_at = time.monotonic()
            FailingDQNPolicy.raised_at = self.raised_at
            broken_custom_loss()
        return super().learn_on_batch(*args, **kwargs)


def broken_custom_loss():
    raise LossInjectedError("injected failure in the custom loss")


class FailingApex(ApexAgent):
    _name = "APEX"
    _policy_class = FailingDQNPolicy


def test_learner_thread_exception_surfaces_with_its_own_traceback_quickly(ray_session):
    config = {"num_workers": 1, "num_cpus_per_worker": 0.5, "num_replay_buffer_shards": 1,
              "learning_starts": 200, "buffer_size": 5000, "train_batch_size": 32,
              "timesteps_per_iteration": 200, "min_iter_time_s": 0,
              "rollout_fragment_length": 50}
    agent = FailingApex(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        with pytest.raises(LossInjectedError, match="injected failure in the custom loss") \
                as info:
            for _ in range(100):
                agent.train()
        surfaced = time.monotonic()
        assert surfaced - FailingDQNPolicy.raised_at < 10
        frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "broken_custom_loss" in frames and "learn_on_batch" in frames
        assert any("LearnerThread" in note for note in info.value.__notes__)
    finally:
        agent.stop()


def test_stalled_learner_is_reported_with_queue_sizes(caplog):
    import queue

    from flowrl.data.sample_batch import SampleBatch
    from flowrl.flow import Metrics
    from flowrl.ops import LearnerThread

    class SlowWorker:
        def learn_on_batch(self, batch):
            time.sleep(2.0)
            return {}

    learner = LearnerThread(SlowWorker(), Metrics(), queue_size=2, stall_warning_s=0.5)
    learner.start()
    try:
        for _ in range(3):
            try:
                learner.inqueue.put_nowait(SampleBatch({"obs": np.zeros((1, 4))}))
            except queue.Full:
                break
        time.sleep(1.0)
        with caplog.at_level("WARNING", logger="flowrl.ops.concurrency"):
            learner.check_alive()
        assert "finished no update for" in caplog.text
        assert "inqueue 1/2" in caplog.text or "inqueue 2/2" in caplog.text
        assert "outqueue 0/2" in caplog.text
    finally:
        learner.stop()


# ------------------------------------------------------------ the restart policy
class Echo:
    """A minimal actor: its index back, and its pid."""

    def __init__(self, index):
        self.index = index

    def get_index(self):
        return self.index

    def get_pid(self):
        return os.getpid()


def test_actor_restarter_replaces_counts_and_names_the_dead_actor(ray_session, caplog):
    from flowrl.flow.restart import ActorRestarter, ActorRestartError

    echo_cls = ray.remote(num_cpus=0)(Echo)
    restarter = ActorRestarter("thing", "Thing", lambda i: echo_cls.remote(i),
                               max_restarts=1)
    first = restarter.start(7)
    pid = sigkill(first)
    with pytest.raises(ray.exceptions.RayActorError) as died:
        ray.get(first.get_index.remote())
    with caplog.at_level("WARNING", logger="flowrl.flow.restart"):
        second = restarter.replace(first, died.value)
    assert f"Thing 7 (pid {pid}) died" in caplog.text
    assert ray.get(second.get_index.remote()) == 7 and restarter.index_of(second) == 7
    assert restarter.counters() == {"num_thing_restarts": 1}
    assert restarter.replace(first, died.value) is None  # already replaced

    pid = sigkill(second)
    with pytest.raises(ray.exceptions.RayActorError) as died:
        ray.get(second.get_index.remote())
    with pytest.raises(ActorRestartError) as exhausted:
        restarter.replace(second, died.value)
    assert f"Thing 7 (pid {pid}) died after max_worker_restarts=1" in str(exhausted.value)
    assert exhausted.value.__cause__ is died.value  # the original error and traceback
    assert restarter.num_restarts == 1

    off = ActorRestarter.from_config("thing", "Thing", lambda i: echo_cls.remote(i),
                                     {"recreate_failed_workers": False})
    third = off.start(1)
    with pytest.raises(ActorRestartError, match=r"Thing 1 \(pid \d+\) died and "
                       "recreate_failed_workers is off"):
        off.replace(third, RuntimeError("gone"))
    ray.kill(third)


def test_replay_shards_and_workers_count_restarts_by_kind(ray_session):
    from flowrl.replay.actor import ReplayShards

    shards = ReplayShards({"buffer_size": 100, "learning_starts": 10}, num_shards=2)
    try:
        victim = shards.actors[1]
        sigkill(victim)
        with pytest.raises(ray.exceptions.RayActorError) as died:
            ray.get(victim.stats.remote())
        new = shards.handle_failure(victim, died.value)
        assert shards.actors[1] is new and ray.get(new.stats.remote())["shard_index"] == 1
        stats = shards.stats()
        assert stats["num_replay_shard_restarts"] == stats["num_shard_restarts"] == 1
        assert stats["num_healthy_shards"] == 2
    finally:
        shards.stop()
