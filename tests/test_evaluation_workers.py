"""Evaluation on ``evaluation_num_workers`` remote evaluation workers.

The episodes are split among the workers (each episode records the pid of the process
that played it through a custom metric), the workers play the learner's weights as
they were when the evaluation started, train() runs them alongside the iteration, a
dead evaluation worker is replaced, and 0 (the default) keeps evaluating in the driver.
"""

import os
import sys

import numpy as np
import pytest
import ray

from flowrl import DefaultCallbacks, get_agent_class

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAST_PPO = {"num_envs_per_worker": 1, "train_batch_size": 256, "rollout_fragment_length": 128,
            "sgd_minibatch_size": 64, "num_sgd_iter": 2, "seed": 3}


class RecordPid(DefaultCallbacks):
    """Each episode's ``pid`` custom metric: the process that played it."""

    def on_episode_end(self, *, worker, episode, env_index):
        episode.custom_metrics["pid"] = float(os.getpid())


def make_agent(**config):
    return get_agent_class("PPO")(env="CartPole-v1", log_to_disk=False,
                                  config={**FAST_PPO, "callbacks": RecordPid, **config})


def weights_of(worker_set):
    """The default policy's weights on each worker of a WorkerSet, local first."""
    return worker_set.foreach_worker(lambda w: w.get_weights()["default_policy"])


def same_weights(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_evaluation_workers_split_the_episodes_and_play_current_weights(ray_session):
    agent = make_agent(evaluation_interval=1, evaluation_num_workers=2,
                       evaluation_num_episodes=4)
    try:
        eval_pids = set(agent.evaluation_workers.foreach_worker(lambda w: os.getpid())[1:])
        assert len(eval_pids) == 2 and os.getpid() not in eval_pids
        assert agent.evaluation_workers.foreach_worker(
            lambda w: w.config["explore"]) == [False, False, False]
        before = agent.workers.local_worker().get_weights()["default_policy"]

        result = agent.train()

        evaluation = result["evaluation"]
        assert evaluation["episodes_this_iter"] == 4
        assert 8 <= evaluation["episode_len_mean"] <= 500
        # Both evaluation workers played (2 episodes each), none ran in the driver.
        pids = evaluation["custom_metrics"]
        assert {pids["pid_min"], pids["pid_max"]} == {float(p) for p in eval_pids}
        assert pids["pid_mean"] == np.mean(sorted(eval_pids))
        # They played the weights the iteration started from (sent before it trained).
        after = agent.workers.local_worker().get_weights()["default_policy"]
        assert not same_weights(before, after)
        assert all(same_weights(w, before) for w in weights_of(agent.evaluation_workers))

        # evaluate() sends the learner's current weights and waits for the episodes.
        again = agent.evaluate()
        assert again["episodes_this_iter"] == 4
        assert all(same_weights(w, after) for w in weights_of(agent.evaluation_workers))
    finally:
        agent.stop()


def test_evaluation_workers_use_the_evaluation_config(ray_session):
    agent = make_agent(evaluation_num_workers=1, evaluation_num_episodes=3,
                       evaluation_config={"explore": True,
                                          "env_config": {"max_episode_steps": 20}})
    try:
        result = agent.evaluate()  # evaluate() works without evaluation_interval
        assert result["episodes_this_iter"] == 3
        assert result["episode_len_mean"] <= 20
        assert agent.evaluation_workers.foreach_worker(
            lambda w: w.config["explore"]) == [True, True]
    finally:
        agent.stop()


def test_a_dead_evaluation_worker_is_replaced(ray_session):
    agent = make_agent(evaluation_num_workers=2, evaluation_num_episodes=4)
    try:
        victim = agent.evaluation_workers.remote_workers()[0]
        ray.kill(victim)
        result = agent.evaluate()
        assert result["episodes_this_iter"] == 4
        assert victim not in agent.evaluation_workers.remote_workers()
        assert agent.evaluation_workers.num_worker_restarts == 1
        assert len(agent.evaluation_workers.remote_workers()) == 2
    finally:
        agent.stop()


def test_zero_evaluation_workers_evaluates_in_the_driver():
    agent = make_agent(evaluation_interval=1, evaluation_num_episodes=2)
    try:
        assert agent.evaluation_workers is None
        evaluation = agent.train()["evaluation"]
        assert evaluation["episodes_this_iter"] == 2
        assert evaluation["custom_metrics"]["pid_max"] == float(os.getpid())
    finally:
        agent.stop()


def test_evaluation_num_workers_is_validated():
    with pytest.raises(ValueError, match="evaluation_num_workers=-1 must be >= 0"):
        get_agent_class("PPO").merge_config({"env": "CartPole-v1",
                                              "evaluation_num_workers": -1})


def test_evaluation_workers_in_a_tune_trial(ray_session, tmp_path):
    from ray import tune

    import flowrl  # noqa: F401  (registers the trainables)
    trials = tune.run_experiments(
        {"eval_workers": {"run": "PPO", "env": "CartPole-v1",
                          "stop": {"training_iteration": 1}, "storage_path": str(tmp_path),
                          "config": {**FAST_PPO, "evaluation_interval": 1,
                                     "evaluation_num_workers": 1,
                                     "evaluation_num_episodes": 2}}},
        verbose=0, raise_on_failed_trial=False)
    (trial,) = trials
    assert trial.status == "TERMINATED", open(trial.error_file).read() \
        if trial.error_file else trial.status
    assert trial.last_result["evaluation"]["episodes_this_iter"] == 2
