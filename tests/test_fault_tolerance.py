"""Reliability on real processes: SIGKILLed rollout workers and replay shards are
replaced while training goes on; a crashing learner surfaces its own traceback; with
recreation off, or once max_worker_restarts are used, the error names the dead worker;
a stuck learner is reported."""

import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable

import numpy as np
import pytest
import ray

from flowrl import get_agent_class
from flowrl.plans.apex import ApexAgent
from flowrl.policies.dqn import DQNTorchPolicy
from learning_bars import SeedRun, two_of_three

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

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


# Small PPO iterations for the recovery tests: what they check is exact, not learning.
PPO_SMALL = {**PPO_TWO_WORKERS, "train_batch_size": 256, "rollout_fragment_length": 32,
             "num_sgd_iter": 1}


def remote_pids(agent) -> list[int]:
    return ray.get([w.get_pid.remote() for w in agent.workers.remote_workers()])


def test_ppo_replaces_a_kill_minus_9_worker_with_one_that_has_the_learners_weights(
        ray_session):
    agent = get_agent_class("PPO")(config={**PPO_SMALL, "seed": 0}, env="CartPole-v1",
                                   log_to_disk=False)
    try:
        before = agent.train()
        victim, survivor = agent.workers.remote_workers()
        survivor_pid = ray.get(survivor.get_pid.remote())
        killed_pid = sigkill(victim)
        after = agent.train()  # the iteration that meets the dead worker still completes
        assert after["info"]["num_worker_restarts"] == 1
        assert after["num_healthy_workers"] == 2
        assert after["timesteps_total"] >= before["timesteps_total"] + 256
        replacement, kept = agent.workers.remote_workers()
        assert kept is survivor and replacement is not victim  # same index 1, new actor
        assert agent.workers.restarter.index_of(replacement) == 1
        new_pid = ray.get(replacement.get_pid.remote())
        assert new_pid not in (killed_pid, survivor_pid)
        # The replacement samples, and acts with the learner's weights after each update.
        assert ray.get(replacement.sample.remote()).count >= 32 * 4
        final = agent.train()
        assert final["info"]["num_worker_restarts"] == 1
        local = agent.workers.local_worker().get_weights()["default_policy"]
        remote = ray.get(replacement.get_weights.remote())["default_policy"]
        for name, value in local.items():
            np.testing.assert_array_equal(remote[name], value, err_msg=name)
    finally:
        agent.stop()


# The one learning check here, light: the recovery itself is asserted exactly above; this
# guards that a run whose worker was SIGKILLed at KILL_AT_STEPS still learns (a
# replacement acting with stale or random weights would slow it down).
# Typical: the median env steps of seeds 0-2 to the bar, measured with FLOWRL_LEARNING_LOG
# (18.4k, 19.5k, 18.4k; seeds 3-5: 18.4k-20.5k; 11-17 s per seed on 2 idle cores,
# ~55 s on busy ones). Budget 1.6x.
KILL_AT_STEPS = 10_000
TYPICAL_STEPS_PPO_KILL = 18_432
BUDGET_STEPS_PPO_KILL = 30_000


def run_ppo_with_a_kill(seed: int, budget: int) -> SeedRun:
    """PPO with 2 workers; worker 1 is SIGKILLed once ``KILL_AT_STEPS`` were sampled."""
    agent = get_agent_class("PPO")(config={**PPO_TWO_WORKERS, "seed": seed},
                                   env="CartPole-v1", log_to_disk=False)
    history, killed = [], False
    try:
        while True:
            result = agent.train()
            steps = result["timesteps_total"]
            history.append((steps, round(result["episode_reward_mean"], 1)))
            if not killed and steps >= KILL_AT_STEPS:
                sigkill(agent.workers.remote_workers()[0])
                killed = True
                continue  # the bar counts only once the replacement is in
            if killed and result["episode_reward_mean"] >= 150:
                assert result["info"]["num_worker_restarts"] == 1, result["info"]
                assert result["num_healthy_workers"] == 2
                return SeedRun(seed, steps, history)
            if steps >= budget:
                return SeedRun(seed, None, history)
    finally:
        agent.stop()


@pytest.mark.learning
def test_ppo_still_learns_after_kill_minus_9_of_a_rollout_worker(ray_session):
    """2 of 3 seeds reach 150 within the step budget (typical steps stated above)."""
    two_of_three(run_ppo_with_a_kill, budget=BUDGET_STEPS_PPO_KILL,
                 typical=TYPICAL_STEPS_PPO_KILL,
                 what=f"PPO on CartPole-v1 to 150, worker killed at {KILL_AT_STEPS} steps")


def test_apex_replaces_a_killed_worker_and_replay_shard_and_trains_from_the_new_shard(
        ray_session):
    config = {"num_workers": 2, "num_cpus_per_worker": 0.5, "num_replay_buffer_shards": 2,
              "buffer_size": 10000, "learning_starts": 400, "rollout_fragment_length": 32,
              "train_batch_size": 64, "timesteps_per_iteration": 500, "min_iter_time_s": 0,
              "max_weight_sync_delay": 100, "seed": 0}
    agent = ApexAgent(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        before = train_until(agent, lambda r: r["info"].get("num_steps_trained", 0) > 0, 60)
        worker_victim = agent.workers.remote_workers()[1]
        sigkill(worker_victim)
        replay = agent.plan.state["replay"]
        shard_victim = replay.buffers[0]
        sigkill(shard_victim)
        recovered = train_until(
            agent, lambda r: r["num_healthy_workers"] == 2
            and r["replay"]["num_healthy_shards"] == 2
            and r["info"]["num_worker_restarts"] == 1
            and r["replay"]["num_replay_shard_restarts"] == 1, 60)
        assert worker_victim not in agent.workers.remote_workers()
        new_shard = replay.buffers[0]
        assert new_shard is not shard_victim
        # The new shard starts empty, refills from the workers, and its batches reach
        # the learner again (learning_starts is per shard: 400 / 2 rows).
        train_until(agent, lambda r: ray.get(new_shard.stats.remote())
                    ["num_replayed_batches"] > 0, 60)
        final = agent.train()
        stats = ray.get(new_shard.stats.remote())
        assert stats["shard_index"] == 0 and stats["num_added"] >= 200
        assert final["info"]["num_steps_trained"] > recovered["info"]["num_steps_trained"] \
            > before["info"]["num_steps_trained"]
        assert final["info"]["num_worker_restarts"] == 1
        assert final["replay"]["num_replay_shard_restarts"] == 1
    finally:
        agent.stop()


@pytest.mark.parametrize("algorithm", ["PPO", "IMPALA"])
def test_a_worker_killed_after_max_worker_restarts_raises_the_clear_error(algorithm,
                                                                          ray_session):
    """Sync (PPO) and async (IMPALA) gathers: once the one allowed restart is used, the
    next death raises ActorRestartError naming the worker, instead of hanging."""
    from flowrl.flow.restart import ActorRestartError

    config = {"num_workers": 2, "num_cpus_per_worker": 0.5, "max_worker_restarts": 1,
              "seed": 0}
    if algorithm == "PPO":
        config.update(PPO_SMALL, max_worker_restarts=1)
    else:
        config.update(rollout_fragment_length=32, train_batch_size=256, min_iter_time_s=0)
    agent = get_agent_class(algorithm)(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        agent.train()
        sigkill(agent.workers.remote_workers()[0])
        train_until(agent, lambda r: r["info"]["num_worker_restarts"] == 1
                    and r["num_healthy_workers"] == 2, 30)
        victim = agent.workers.remote_workers()[1]
        index = agent.workers.restarter.index_of(victim)
        pid = sigkill(victim)
        with pytest.raises(ActorRestartError) as info:
            for _ in range(30):
                agent.train()
        assert f"Rollout worker {index} (pid {pid}) died after max_worker_restarts=1 " \
            "rollout worker replacements were used" in str(info.value)
        assert isinstance(info.value.__cause__, ray.exceptions.RayActorError)
        assert agent.workers.num_worker_restarts == 1
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


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Polls ``condition`` until it holds; fails naming ``what`` after ``timeout_s``
    (generous: a loaded machine only makes it slower)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.01)


class BlockedWorker:
    """A local worker whose learn_on_batch blocks until released: a stuck learner."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def learn_on_batch(self, batch):
        self.entered.set()
        self.release.wait()
        return {}


def test_stalled_learner_is_reported_with_queue_sizes(caplog):
    from flowrl.data.sample_batch import SampleBatch
    from flowrl.flow import Metrics
    from flowrl.ops import LearnerThread

    worker = BlockedWorker()
    stall_s = 0.2
    learner = LearnerThread(worker, Metrics(), queue_size=2, stall_warning_s=stall_s)
    learner.start()
    batch = SampleBatch({"obs": np.zeros((1, 4))})
    try:
        learner.inqueue.put(batch)
        assert worker.entered.wait(60), "the learner thread never took the batch"
        wait_for(lambda: time.monotonic() - learner.last_progress > stall_s,
                 "the stall period to pass")
        # Stuck, but nothing queued behind it: an idle learner is not a stall.
        with caplog.at_level("WARNING", logger="flowrl.ops.concurrency"):
            learner.check_alive()
        assert "finished no update" not in caplog.text
        # Work queued behind the stuck update: reported with the exact queue sizes.
        learner.inqueue.put_nowait(batch)
        learner.inqueue.put_nowait(batch)
        with caplog.at_level("WARNING", logger="flowrl.ops.concurrency"):
            learner.check_alive()
        assert "finished no update for" in caplog.text
        assert "inqueue 2/2, outqueue 0/2, 0 updates so far" in caplog.text
        # Released, the learner catches up on everything queued.
        worker.release.set()
        wait_for(lambda: learner.weights_version == 3, "the 3 queued updates")
    finally:
        worker.release.set()
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
    # Once it answered, its pid is known: a slow start must not turn it into "pid ?".
    assert ray.get(third.get_index.remote()) == 1
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
