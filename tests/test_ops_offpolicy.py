"""Off-policy operators: queues, learner thread, target updates, weight sync, auto resources."""

import queue
import time

import numpy as np
import pytest

from flowrl.algorithms.config import resolve_auto_resources
from flowrl.data.items import TrainedBatch
from flowrl.envs import make_env_creator
from flowrl.flow import Metrics, NotReady, SourcedItem, from_items
from flowrl.ops import (Concurrently, CountTrainedSteps, Dequeue, Enqueue, LearnerThread,
                        TrainOneStep, UpdateTargetNetwork, UpdateWorkerWeights)
from flowrl.plans.ppo import PPOAgent
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.workers import WorkerSet


def ppo_workers(num_workers=0):
    config = PPOAgent.merge_config({"env": "CartPole-v1", "num_workers": num_workers,
                                    "num_cpus_per_worker": 0.5, "num_envs_per_worker": 1,
                                    "rollout_fragment_length": 32, "seed": 0})
    return WorkerSet(make_env_creator("CartPole-v1"), PPOTorchPolicy, config)


def test_enqueue_retries_the_same_item_when_full():
    q = queue.Queue(maxsize=2)
    it = from_items([1, 2, 3, 4]).for_each(Enqueue(q))
    assert [next(it), next(it)] == [1, 2]
    assert next(it) is NotReady          # full: item 3 is kept, not dropped
    assert q.get_nowait() == 1
    assert next(it) == 3                 # offered again
    assert list(q.queue) == [2, 3]


def test_dequeue_yields_not_ready_when_empty_and_raises_a_dead_threads_error():
    q = queue.Queue()
    it = Dequeue(q)
    assert next(it) is NotReady
    q.put("x")
    assert next(it) == "x"

    def check():
        raise ZeroDivisionError("learner blew up")

    with pytest.raises(ZeroDivisionError, match="learner blew up"):
        next(Dequeue(q, check))


def test_learner_thread_trains_and_reports_its_own_traceback():
    workers = ppo_workers()
    metrics = Metrics()
    learner = LearnerThread(workers.local_worker(), metrics, queue_size=4)
    learner.start()
    try:
        batch = workers.local_worker().sample()
        learner.inqueue.put(SourcedItem("shard-0", batch))
        deadline = time.time() + 30
        while learner.outqueue.empty() and time.time() < deadline:
            time.sleep(0.01)
        trained = learner.outqueue.get_nowait()
        assert isinstance(trained, TrainedBatch)
        assert trained.source == "shard-0" and trained.batch is batch
        assert "total_loss" in trained.info["default_policy"]
        assert learner.weights_version == 1
        assert metrics.info["learner"] == trained.info  # merged per policy, a copy
        learner.inqueue.put(SourcedItem("shard-0", "not a batch"))
        deadline = time.time() + 30
        while learner.error is None and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(TypeError, match="LearnerThread expects .* got SourcedItem") as error:
            learner.check_alive()
        assert any("LearnerThread" in note for note in error.value.__notes__)
        assert error.value.__traceback__ is not None
    finally:
        learner.stop()


def test_update_target_network_by_sampled_and_trained_steps():
    workers = ppo_workers()
    updates = []
    policy = workers.local_worker().get_policy()
    policy.update_target = lambda: updates.append(1)  # PPO has no target net: count calls
    metrics = Metrics()
    op = UpdateTargetNetwork(workers, metrics, 100)
    for steps in (50, 60, 100, 250):
        metrics.set("num_steps_sampled", steps)
        op("item")
    assert len(updates) == 2                     # at 100 and 250
    assert metrics.get("num_target_updates") == 2
    assert metrics.get("last_target_update_ts") == 250
    trained = Metrics()
    op = UpdateTargetNetwork(workers, trained, 10, by_steps_trained=True)
    trained.set("num_steps_sampled", 1000)
    op("item")
    assert len(updates) == 2                     # trained steps still 0
    trained.set("num_steps_trained", 10)
    op("item")
    assert len(updates) == 3


def test_train_one_step_keeps_replay_provenance():
    workers = ppo_workers()
    metrics = Metrics()
    batch = workers.local_worker().sample()
    trained = TrainOneStep(workers, metrics)(SourcedItem("shard", batch))
    assert isinstance(trained, TrainedBatch)
    assert trained.source == "shard" and trained.batch is batch
    assert "default_policy" in trained.info
    assert TrainOneStep(workers, metrics)(batch).source is None
    assert CountTrainedSteps(metrics)(trained) is trained
    assert metrics.get("num_steps_trained") == 3 * batch.count  # 2 trainings + the count
    with pytest.raises(TypeError, match="CountTrainedSteps expects TrainedBatch items, "
                                        "got tuple"):
        CountTrainedSteps(metrics)((trained.source, trained.batch, trained.info))


def test_update_worker_weights_only_after_delay_and_new_weights(ray_session):
    workers = ppo_workers(num_workers=1)
    try:
        metrics = Metrics()

        class FakeLearner:  # only the version counter matters to the operator
            weights_version = 0

        learner = FakeLearner()
        op = UpdateWorkerWeights(learner, workers, metrics, max_weight_sync_delay=64)
        (worker,) = workers.remote_workers()
        batch = workers.local_worker().sample()   # 32 steps
        item = SourcedItem(worker, batch)
        assert op(item) is item
        op(item)
        assert metrics.get("num_weight_syncs") == 0   # 64 steps, but no new weights
        learner.weights_version = 1
        op(item)
        assert metrics.get("num_weight_syncs") == 1
        op(item)
        assert metrics.get("num_weight_syncs") == 1   # delay not reached again
        with pytest.raises(TypeError, match="UpdateWorkerWeights expects SourcedItem items, "
                                            "got SampleBatch"):
            op(batch)
    finally:
        workers.stop()


def test_concurrently_round_robin_output_indexes():
    store = from_items(["s"] * 100)
    metrics = store.metrics
    replay = from_items(list(range(100)), metrics)
    merged = Concurrently([store, replay], mode="round_robin", output_indexes=[1],
                          round_robin_weights=[1, 2])
    assert merged.take(4) == [0, 1, 2, 3]


ALL_AUTO = {"num_workers": "auto", "num_cpus_per_worker": "auto", "num_gpus": "auto",
            "num_replay_buffer_shards": "auto", "num_cpus_for_driver": 1}


# (cluster CPUs, GPUs), config overrides -> the resolved values, written out by hand from
# the documented rules: workers = max(2, spare CPUs); per worker = spare / (rollout +
# evaluation workers), at most 1 (all CPUs when none is spare); shards = workers // 4
# within 1..4; one GPU when there is one (N with N learners and N GPUs).
AUTO_CASES = [
    ((1, 0), {}, {"num_workers": 2, "num_cpus_per_worker": 0.5, "num_gpus": 0,
                  "num_replay_buffer_shards": 1}),  # nothing spare: share the 1 CPU
    ((2, 0), {}, {"num_workers": 2, "num_cpus_per_worker": 0.5, "num_gpus": 0,
                  "num_replay_buffer_shards": 1}),
    ((4, 0), {}, {"num_workers": 3, "num_cpus_per_worker": 1, "num_gpus": 0,
                  "num_replay_buffer_shards": 1}),
    ((9, 1), {}, {"num_workers": 8, "num_cpus_per_worker": 1, "num_gpus": 1,
                  "num_replay_buffer_shards": 2}),
    ((13, 0), {}, {"num_workers": 12, "num_cpus_per_worker": 1, "num_gpus": 0,
                   "num_replay_buffer_shards": 3}),
    ((64, 4), {}, {"num_workers": 63, "num_cpus_per_worker": 1, "num_gpus": 1,
                   "num_replay_buffer_shards": 4}),
    ((4, 0), {"num_cpus_for_driver": 2}, {"num_workers": 2, "num_cpus_per_worker": 1,
                                          "num_gpus": 0, "num_replay_buffer_shards": 1}),
    ((5, 0), {"evaluation_num_workers": 2},  # 4 spare CPUs over 4 + 2 workers
     {"num_workers": 4, "num_cpus_per_worker": 4 / 6, "num_gpus": 0,
      "num_replay_buffer_shards": 1}),
    ((4, 2), {"num_workers": 6, "num_learners": 2},  # 3 spare CPUs over 6 workers
     {"num_cpus_per_worker": 0.5, "num_gpus": 2, "num_replay_buffer_shards": 1}),
    ((4, 1), {"num_workers": 6, "num_learners": 2},  # too few GPUs: CPU learners
     {"num_cpus_per_worker": 0.5, "num_gpus": 0, "num_replay_buffer_shards": 1}),
]


@pytest.mark.parametrize("cluster, overrides, expected", AUTO_CASES,
                         ids=[f"{c[0]}cpu-{c[1]}gpu-{'-'.join(o) or 'all-auto'}"
                              for c, o, _ in AUTO_CASES])
def test_resolve_auto_resources_sizes_for_the_cluster(cluster, overrides, expected):
    config = {**ALL_AUTO, **overrides}
    resolved = resolve_auto_resources(config, cluster=cluster)
    assert resolved == pytest.approx(expected)
    assert {k: config[k] for k in expected} == pytest.approx(expected)  # written in place
    assert resolve_auto_resources({"num_workers": 3}) == {}  # nothing "auto": untouched


def test_resolve_auto_resources_reads_the_running_ray_cluster(ray_session):
    # conftest starts Ray with 2 CPUs and no GPU: the 2-CPU row, not this machine's.
    config = dict(ALL_AUTO)
    assert resolve_auto_resources(config) == {"num_workers": 2, "num_cpus_per_worker": 0.5,
                                              "num_gpus": 0, "num_replay_buffer_shards": 1}


def test_reporting_ends_an_iteration_without_output_once_thresholds_are_met():
    """Ape-X before learning starts: samples flow, but the output branch yields nothing."""
    from flowrl.ops import ParallelRollouts, StandardMetricsReporting

    workers = ppo_workers()
    metrics = Metrics()
    sampling = ParallelRollouts(workers, metrics)
    never = Dequeue(queue.Queue(), metrics=metrics)  # like a learner with nothing yet
    merged = Concurrently([sampling, never], mode="async", output_indexes=[1])
    config = {"timesteps_per_iteration": 64, "min_iter_time_s": 0,
              "metrics_smoothing_episodes": 100}
    result = next(StandardMetricsReporting(merged, workers, config, metrics))
    assert result["timesteps_this_iter"] >= 64


def test_reporting_waits_only_when_no_branch_made_progress(monkeypatch):
    """A side branch's NotReady (DQN's sampling) is progress: no sleep after it."""
    from flowrl.ops.metrics import IdleBackoff

    sleeps = []
    monkeypatch.setattr("flowrl.ops.metrics.time.sleep", sleeps.append)
    metrics = Metrics()
    backoff = IdleBackoff(metrics)
    metrics.inc("num_steps_sampled", 4)
    backoff.not_ready()  # the counters moved: pull again at once
    assert sleeps == []
    backoff.not_ready()  # nothing moved: a short sleep, doubling while idle
    backoff.not_ready()
    assert sleeps == [IdleBackoff.MIN_S, 2 * IdleBackoff.MIN_S]
    metrics.inc("num_steps_trained", 32)
    backoff.not_ready()
    backoff.not_ready()  # idle again: starts short again
    assert sleeps[2:] == [IdleBackoff.MIN_S]


def test_update_priorities_reach_the_shard_the_batch_came_from():
    from flowrl.ops import Replay, UpdatePriorities
    from flowrl.replay.actor import ReplayActor

    metrics = Metrics()
    config = {"buffer_size": 1000, "learning_starts": 10, "train_batch_size": 8, "seed": 0}
    shard_a, shard_b = ReplayActor(config, 0, 1), ReplayActor(config, 0, 1)
    workers = ppo_workers()
    batch = workers.local_worker().sample()
    shard_a.add_batch(batch)
    shard_b.add_batch(batch)
    sourced = next(Replay(metrics, local_buffer=shard_a))
    assert isinstance(sourced, SourcedItem) and sourced.actor is shard_a
    replayed = sourced.item
    boosted = replayed["batch_indexes"][:1]
    td = np.full(len(replayed["batch_indexes"]), 1e-3)
    td[0] = 1e3
    info = {"default_policy": {"td_error": td}}
    with pytest.raises(TypeError, match="UpdatePriorities expects TrainedBatch items, got tuple"):
        UpdatePriorities(metrics)((sourced.actor, replayed, info))
    with pytest.raises(ValueError, match="without a source shard"):
        UpdatePriorities(metrics)(TrainedBatch(replayed, info))
    UpdatePriorities(metrics)(TrainedBatch(replayed, info, source=sourced.actor))
    assert metrics.get("num_priority_updates") == 1
    hits_a = sum(np.isin(shard_a.replay()["batch_indexes"], boosted).sum() for _ in range(20))
    hits_b = sum(np.isin(shard_b.replay()["batch_indexes"], boosted).sum() for _ in range(20))
    assert hits_a > 100 and hits_b < 20   # only shard A saw the new priorities
