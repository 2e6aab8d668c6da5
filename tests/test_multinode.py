"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): rollout workers
and Ape-X replay shards run on nodes other than the driver's, PPO and APEX go on with
replacements when a node is removed mid-training, and ``flowrl train --ray-address``
resumes an experiment from checkpoints written to a storage URI by another node.

The cluster: a head node with no CPUs (it runs only this driver, as on a real cluster
whose head is kept free) and two nodes with 1 CPU each.

A process joins one Ray cluster at a time, and a Ray restart loses what was
registered with Tune (trainables, envs, models) for the tests that follow. So the
cluster tests run in a pytest process of their own, started by
``test_cluster_tests_in_a_process_of_their_own``; in the calling session they are
skipped. Its Ray temp dir is private too: a ``Cluster`` publishes its address there,
and a plain ``ray.init()`` elsewhere on the machine would join it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

import flowrl.plans.apex
from flowrl import get_agent_class
from flowrl.replay.actor import ReplayShards
from test_storage_uri import PACED_PG, assert_resumed_to, interrupt_then_resume

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHILD_FLAG = "FLOWRL_MULTINODE_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
cluster_test = pytest.mark.skipif(
    not IN_CHILD, reason="runs in the pytest process that "
    "test_cluster_tests_in_a_process_of_their_own starts")

# Nodes that may hold replay shards advertise this resource (see the APEX test).
REPLAY_RESOURCE = "replay_node"
# Dead raylets are noticed in ~1 s instead of Ray's default ~15-30 s.
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0,
                          "health_check_period_ms": 500,
                          "health_check_failure_threshold": 3}
PPO_TWO_WORKERS = {"num_workers": 2, "num_cpus_per_worker": 1, "num_envs_per_worker": 2,
                   "rollout_fragment_length": 64, "train_batch_size": 256,
                   "sgd_minibatch_size": 64, "num_sgd_iter": 2}
APEX_TWO_WORKERS = {"num_workers": 2, "num_cpus_per_worker": 1, "num_gpus": 0,
                    "num_replay_buffer_shards": 2, "buffer_size": 5000,
                    "learning_starts": 200, "train_batch_size": 32,
                    "rollout_fragment_length": 50, "timesteps_per_iteration": 400,
                    "min_iter_time_s": 0, "target_network_update_freq": 500,
                    "max_weight_sync_delay": 100,
                    "model": {"fcnet_hiddens": [32]}, "hiddens": [32]}


def add_cpu_node(cluster: Cluster) -> Any:
    """One more node with 1 CPU that may hold replay shards."""
    node = cluster.add_node(num_cpus=1, resources={REPLAY_RESOURCE: 1})
    cluster.wait_for_nodes()
    return node


def test_cluster_tests_in_a_process_of_their_own():
    if IN_CHILD:
        pytest.skip("this is that process")
    ray_tmp = tempfile.mkdtemp(prefix="flowrl-mn-")  # short: Ray's socket paths live here
    try:
        child = subprocess.run(
            # Without hypothesis's plugin: its end-of-session import (ast.parse) trips
            # CPython 3.11.7's "AST constructor recursion depth mismatch" after Ray tears
            # down a cluster (see tests/conftest.py).
            [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x",
             "-p", "no:cacheprovider", "-p", "no:hypothesispytest"],
            env={**os.environ, CHILD_FLAG: "1", "RAY_TMPDIR": ray_tmp},
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    report = child.stdout[-8000:] + child.stderr[-3000:]
    assert child.returncode == 0, report
    assert "3 passed" in child.stdout, report


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    assert not ray.is_initialized(), "the cluster tests need a process of their own"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
    try:
        for _ in range(2):
            add_cpu_node(cluster)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def node_of(cluster: Cluster, pid: int) -> str:
    """The id of the node whose raylet started process ``pid`` (an actor's process)."""
    raylets = {node.all_processes["raylet"][0].process.pid: node
               for node in cluster.list_all_nodes()}
    for parent in psutil.Process(pid).parents():
        if parent.pid in raylets:
            return raylets[parent.pid].node_id
    raise LookupError(f"process {pid} belongs to no node of the cluster")


def nodes_of(cluster: Cluster, actors: list) -> list[str]:
    return [node_of(cluster, pid) for pid in ray.get([a.get_pid.remote() for a in actors])]


def node_by_id(cluster: Cluster, node_id: str) -> Any:
    (node,) = [n for n in cluster.list_all_nodes() if n.node_id == node_id]
    return node


def train_until(agent: Any, predicate, max_iterations: int) -> list[dict]:
    """Trains until ``predicate(result)``; returns every result of the way."""
    results = []
    for _ in range(max_iterations):
        results.append(agent.train())
        if predicate(results[-1]):
            return results
    last = results[-1]
    pytest.fail(f"condition not met in {max_iterations} iterations; last: "
                f"{ {k: last.get(k) for k in ('timesteps_total', 'num_healthy_workers')} } "
                f"info={last.get('info')} replay={last.get('replay')}")


def assert_progress(results: list[dict], key: str = "timesteps_total") -> None:
    """Every iteration moved ``key`` forward."""
    values = [r[key] if key in r else r["info"][key] for r in results]
    assert all(b > a for a, b in zip(values, values[1:])), values


@cluster_test
def test_ppo_workers_on_other_nodes_survive_a_removed_node(cluster):
    driver_node = ray.get_runtime_context().get_node_id()
    agent = get_agent_class("PPO")(config={**PPO_TWO_WORKERS, "seed": 0},
                                   env="CartPole-v1", log_to_disk=False)
    try:
        placed = nodes_of(cluster, agent.workers.remote_workers())
        # The driver's node has no CPU: each 1-CPU worker takes one of the other nodes.
        assert driver_node not in placed and len(set(placed)) == 2, placed
        before = [agent.train() for _ in range(2)]

        spare = add_cpu_node(cluster)  # where the replacement can go (an autoscaler's job)
        victim = agent.workers.remote_workers()[0]
        cluster.remove_node(node_by_id(cluster, placed[0]), allow_graceful=False)

        after = train_until(agent, lambda r: r["num_healthy_workers"] == 2
                            and r["info"]["num_worker_restarts"] == 1, 8)
        after += [agent.train()]  # and one more with both workers
        assert_progress(before + after)
        assert after[-1]["timesteps_total"] - after[-2]["timesteps_total"] == 256
        assert victim not in agent.workers.remote_workers()
        replaced = nodes_of(cluster, agent.workers.remote_workers())
        assert sorted(replaced) == sorted([placed[1], spare.node_id]), (replaced, placed)
    finally:
        agent.stop()


@cluster_test
def test_apex_workers_and_replay_shards_on_other_nodes_survive_a_removed_node(
        cluster, monkeypatch):
    # Ray places zero-CPU actors such as replay shards on a random node, the driver's
    # included, and the plan has no placement option: the shards ask for a resource
    # that only the CPU nodes have (how one would keep them on large-memory machines).
    monkeypatch.setattr(flowrl.plans.apex, "ReplayShards", functools.partial(
        ReplayShards, resources={REPLAY_RESOURCE: 0.01}))
    driver_node = ray.get_runtime_context().get_node_id()
    agent = get_agent_class("APEX")(config={**APEX_TWO_WORKERS, "seed": 0},
                                    env="CartPole-v1", log_to_disk=False)
    try:
        shards = agent.plan.state["replay"].buffers
        workers = nodes_of(cluster, agent.workers.remote_workers())
        shard_nodes = nodes_of(cluster, shards)
        assert driver_node not in workers + shard_nodes, (workers, shard_nodes)
        assert len(set(workers)) == 2, workers
        before = train_until(agent, lambda r: r["info"].get("num_steps_trained", 0) > 0, 20)

        # A node holding a worker and at least one shard (each CPU node holds a worker).
        victim = shard_nodes[0]
        lost_shards = shard_nodes.count(victim)
        spare = add_cpu_node(cluster)
        cluster.remove_node(node_by_id(cluster, victim), allow_graceful=False)

        after = train_until(
            agent, lambda r: r["num_healthy_workers"] == 2
            and r["info"]["num_worker_restarts"] == 1
            and r["replay"]["num_healthy_shards"] == 2
            and r["replay"]["num_shard_restarts"] == lost_shards, 20)
        trained = after[-1]["info"]["num_steps_trained"]
        after += train_until(  # the new shards filled past learning_starts, and trained on
            agent, lambda r: r["info"]["num_steps_trained"] > trained, 10)
        assert_progress(before[-1:] + after)
        assert_progress(before[-1:] + after[-1:], "num_steps_trained")
        now = nodes_of(cluster, agent.workers.remote_workers() + shards)
        assert victim not in now and driver_node not in now, now
        assert spare.node_id in now
    finally:
        agent.stop()


@cluster_test
def test_cli_resumes_from_a_storage_uri_written_by_other_nodes(cluster, tmp_path):
    """`flowrl train --ray-address ... --storage-path file://...`: the trial and its
    rollout worker take the two CPU nodes (the head has no CPU), the trial writes its
    checkpoints to the URI from there, and --resume continues from them."""
    store = tmp_path / "store"
    args = ["--run", "PG", "--env", "CartPole-v1", "--config", json.dumps(PACED_PG),
            "--stop", '{"training_iteration": 4}', "--checkpoint-freq", "1",
            "--experiment-name", "cluster-resume", "--storage-path", store.as_uri(),
            "--ray-address", cluster.address]
    iterations, results = interrupt_then_resume(args, store / "cluster-resume", stop=4)
    assert_resumed_to(iterations, results, stop=4, min_steps_per_iteration=100)
