"""A3C and IMPALA building blocks on real actors; MixInReplay; IMPALA's
``broadcast_interval`` and ``replay_proportion`` through the agent."""

import sys

import numpy as np
import pytest
import ray

from flowrl.data.items import Gradients
from flowrl.envs import make_env_creator
from flowrl.flow import Metrics
from flowrl.ops import ApplyGradients, AsyncGradients, MixInReplay
from flowrl.plans.a3c import A3CAgent
from flowrl.plans.impala import ImpalaAgent
from flowrl.policies.a2c import A2CTorchPolicy
from flowrl.policies.impala import VTraceTorchPolicy
from flowrl.workers import WorkerSet

# The policy below runs in the rollout worker actors too.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a3c_plan_updates_only_the_source_worker(ray_session):
    config = A3CAgent.merge_config({"env": "CartPole-v1", "num_workers": 2,
                                    "num_cpus_per_worker": 0.5, "seed": 0})
    workers = WorkerSet(make_env_creator("CartPole-v1"), A2CTorchPolicy, config)
    try:
        metrics = Metrics()
        train_op = AsyncGradients(workers, metrics).for_each(
            ApplyGradients(workers, metrics, update_all=False))
        applied = next(train_op)
        assert isinstance(applied, Gradients) and "default_policy" in applied.info
        source, count = applied.source, applied.count
        assert count == config["rollout_fragment_length"]
        assert metrics.get("num_steps_sampled") == count
        assert metrics.get("num_steps_trained") == count
        local = workers.local_worker().get_weights()["default_policy"]
        index_of = {w: i for i, w in enumerate(workers.remote_workers())}
        remote = workers.foreach_worker(lambda w: w.get_weights())[1:]
        sender, other = remote[index_of[source]], remote[1 - index_of[source]]
        assert all(np.allclose(local[k], sender["default_policy"][k]) for k in local)
        assert any(not np.allclose(local[k], other["default_policy"][k]) for k in local)
    finally:
        workers.stop()


def test_mix_in_replay_proportion_and_slots():
    op = MixInReplay(num_slots=3, replay_proportion=0.5, seed=0)
    outputs = [op(i) for i in range(2000)]
    assert all(out[0] == i for i, out in enumerate(outputs))     # new batch first
    replayed = sum(len(out) - 1 for out in outputs)
    assert abs(replayed / 2000 - 0.5) < 0.05
    # Replayed batches come from the last 3 only.
    assert all(set(out[1:]) <= {i - 1, i - 2, i - 3} for i, out in enumerate(outputs))
    assert MixInReplay(0, 2.0)("b") == ["b"]


# ------------------------------------------------ IMPALA: broadcast_interval, replay_proportion
UPDATE_COUNT_KEY = "_test/num_updates"


class UpdateCountingVTracePolicy(VTraceTorchPolicy):
    """V-trace policy whose weights carry how many updates made them.

    On the learner, ``learn_on_batch`` counts updates and ``get_weights`` adds that
    count; on a rollout worker, ``set_weights`` records each count it receives. The
    count is taken after ``learn_on_batch`` returned, so it is at least the learner
    thread's ``weights_version`` that UpdateWorkerWeights read before sending.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_updates = 0
        self.received_update_counts: list[int] = []

    def learn_on_batch(self, *args, **kwargs):
        stats = super().learn_on_batch(*args, **kwargs)
        self.num_updates += 1
        return stats

    def get_weights(self):
        return {**super().get_weights(), UPDATE_COUNT_KEY: np.array(self.num_updates)}

    def set_weights(self, weights):
        weights = dict(weights)
        count = weights.pop(UPDATE_COUNT_KEY, None)
        if count is not None:
            self.received_update_counts.append(int(count))
        super().set_weights(weights)


class UpdateCountingImpala(ImpalaAgent):
    _name = "IMPALA"
    _policy_class = UpdateCountingVTracePolicy


# One worker, one 50-step fragment per learner update, a short learner queue: the
# learner cannot run far ahead of or behind the sampling.
IMPALA_ONE_FRAGMENT_PER_UPDATE = {
    "num_workers": 1, "num_cpus_per_worker": 0.5, "num_envs_per_worker": 1,
    "rollout_fragment_length": 50, "train_batch_size": 50, "learner_queue_size": 2,
    "min_iter_time_s": 0, "timesteps_per_iteration": 200, "seed": 0}


def received_update_counts(agent) -> list[int]:
    """The update counts the (single) rollout worker received with its weights."""
    (counts,) = agent.workers.foreach_worker(
        lambda w: w.get_policy().received_update_counts)[1:]
    return counts


@pytest.mark.parametrize("broadcast_interval", [1, 4])
def test_impala_sends_a_worker_new_weights_only_every_broadcast_interval_updates(
        broadcast_interval, ray_session):
    agent = UpdateCountingImpala(
        config={**IMPALA_ONE_FRAGMENT_PER_UPDATE, "broadcast_interval": broadcast_interval},
        env="CartPole-v1", log_to_disk=False)
    try:
        # Weights of 0 updates: the worker set's start and the plan's first sync.
        initial = received_update_counts(agent)
        assert initial and set(initial) == {0}
        synced = []
        for _ in range(500):
            result = agent.train()
            synced = [c for c in received_update_counts(agent)[len(initial):] if c > 0]
            if len(synced) >= 6:
                break
        assert len(synced) >= 6, (synced, result["info"])
        # The k-th sync left the learner at least k * broadcast_interval updates after
        # the initial weights (each sync needs that many updates since the last one).
        assert all(count >= k * broadcast_interval
                   for k, count in enumerate(synced, start=1)), synced
        assert synced == sorted(synced)
        # Every sync is counted, and nothing else sent this worker weights.
        assert received_update_counts(agent)[len(initial):] == synced
        assert agent.metrics.get("num_weight_syncs") == len(synced)
        learner = agent.get_policy()
        assert learner.num_updates >= synced[-1] >= 6 * broadcast_interval
    finally:
        agent.stop()


@pytest.mark.parametrize("replay_proportion", [0.0, 1.0])
def test_impala_replay_proportion_mixes_that_many_replayed_batches_per_new_one(
        replay_proportion, ray_session):
    config = {**IMPALA_ONE_FRAGMENT_PER_UPDATE, "replay_proportion": replay_proportion,
              "replay_buffer_num_slots": 10}
    agent = ImpalaAgent(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        for _ in range(500):
            info = agent.train()["info"]
            if info["num_steps_sampled"] >= 3000:
                break
        sampled, trained = info["num_steps_sampled"], info["num_steps_trained"]
        assert sampled >= 3000, info
        # Every new 50-step batch goes to the learner, followed by replay_proportion
        # replayed ones (none after the first batch: nothing to replay yet) ...
        assert trained <= sampled + replay_proportion * (sampled - 50)
        # ... less what is still on its way: at most 2 queued + 1 in the learner +
        # 2 done but not counted + 1 waiting to be queued + 1 being mixed in, 50 each.
        in_flight = (2 + 1 + 2 + 1 + 1) * 50
        assert trained >= sampled + replay_proportion * (sampled - 50) - in_flight, \
            (sampled, trained)
    finally:
        agent.stop()
