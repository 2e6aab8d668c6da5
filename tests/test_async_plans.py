"""A3C and IMPALA building blocks on real actors; MixInReplay."""

import numpy as np

from flowrl.data.items import Gradients
from flowrl.envs import make_env_creator
from flowrl.flow import Metrics
from flowrl.ops import ApplyGradients, AsyncGradients, MixInReplay
from flowrl.plans.a3c import A3CAgent
from flowrl.policies.a2c import A2CTorchPolicy
from flowrl.workers import WorkerSet


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
