"""Hyperparameter schedules, and population-based training that keeps each trial's own
hyperparameters after it copies another trial's weights."""

from __future__ import annotations

import random
import re

import pytest
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining

import flowrl  # noqa: F401  (registers the trainables)
from flowrl import get_agent_class
from flowrl.algorithms.trainable import reset_agent_config
from flowrl.policies.schedules import PiecewiseLinear

FAST_PPO = {"train_batch_size": 256, "rollout_fragment_length": 64, "num_sgd_iter": 1,
            "sgd_minibatch_size": 128}


def test_piecewise_linear_interpolates_and_holds_the_ends():
    schedule = PiecewiseLinear([[0, 1.0], [100, 0.5], [100, 0.2], [300, 0.0]], "lr_schedule")
    assert schedule.value(0) == 1.0
    assert schedule.value(50) == pytest.approx(0.75)
    assert schedule.value(100) == pytest.approx(0.2)  # a step: the later point wins
    assert schedule.value(200) == pytest.approx(0.1)
    assert schedule.value(10**9) == 0.0
    assert PiecewiseLinear([[1000, 3.0]], "x").value(0) == 3.0


@pytest.mark.parametrize("bad,words", [
    ([], "non-empty list"), ([[0, 1.0], [-5, 2.0]], ">= 0"), ([[10, 1.0], [5, 2.0]], "decrease"),
    ([[0, "fast"]], "must be a number"), ([[0.5, 1.0]], "integer"), ([[0, 1.0, 2.0]], "[timestep, value]")])
def test_bad_schedules_say_what_is_wrong(bad, words):
    with pytest.raises(ValueError, match="lr_schedule") as info:
        PiecewiseLinear(bad, "lr_schedule")
    assert words in str(info.value)


@pytest.mark.parametrize("algorithm,extra", [
    ("PPO", FAST_PPO), ("A2C", {"rollout_fragment_length": 64, "train_batch_size": 256}),
    ("PG", {"rollout_fragment_length": 64, "train_batch_size": 256})])
def test_cur_lr_and_entropy_coeff_follow_their_schedules(algorithm, extra):
    config = {**extra, "seed": 0, "lr_schedule": [[0, 1e-3], [1024, 1e-4]]}
    if algorithm != "PG":
        config["entropy_coeff_schedule"] = [[0, 0.1], [512, 0.0]]
    agent = get_agent_class(algorithm)(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        for _ in range(5):
            result = agent.train()
            learner = result["info"]["learner"]["default_policy"]
            # The learner used the schedule at the steps sampled before this update.
            t = agent.get_policy().global_timestep
            assert t == result["timesteps_total"]
            assert learner["cur_lr"] == pytest.approx(1e-3 + (1e-4 - 1e-3) * min(t, 1024) / 1024)
            if algorithm != "PG":
                assert learner["cur_entropy_coeff"] == pytest.approx(0.1 * max(0, 512 - t) / 512)
    finally:
        agent.stop()


def test_restore_keeps_the_restoring_agents_own_lr(tmp_path):
    donor = get_agent_class("PPO")(config={**FAST_PPO, "lr": 1e-2}, env="CartPole-v1",
                                   log_to_disk=False)
    try:
        donor.train()
        checkpoint = donor.save(str(tmp_path))
    finally:
        donor.stop()
    for algorithm, keys in (("PPO", {"lr": 3e-5}),):
        agent = get_agent_class(algorithm)(config={**FAST_PPO, **keys}, env="CartPole-v1",
                                           log_to_disk=False)
        try:
            agent.restore(checkpoint)
            assert agent.get_policy().optimizer.param_groups[0]["lr"] == 3e-5
            assert agent.train()["info"]["learner"]["default_policy"]["cur_lr"] == 3e-5
        finally:
            agent.stop()


def test_ddpg_restore_keeps_its_own_actor_and_critic_lrs(tmp_path):
    config = {"learning_starts": 50, "timesteps_per_iteration": 100, "train_batch_size": 32}
    donor = get_agent_class("DDPG")(config={**config, "actor_lr": 1e-2, "critic_lr": 2e-2},
                                    env="Pendulum-v1", log_to_disk=False)
    try:
        donor.train()
        checkpoint = donor.save(str(tmp_path))
    finally:
        donor.stop()
    agent = get_agent_class("DDPG")(config={**config, "actor_lr": 1e-5, "critic_lr": 2e-5},
                                    env="Pendulum-v1", log_to_disk=False)
    try:
        agent.restore(checkpoint)
        policy = agent.get_policy()
        assert policy.actor_optimizer.param_groups[0]["lr"] == 1e-5
        assert policy.critic_optimizer.param_groups[0]["lr"] == 2e-5
    finally:
        agent.stop()


def test_reset_config_changes_hyperparameters_in_place_or_says_no():
    agent = get_agent_class("PPO")(config={**FAST_PPO, "lr": 1e-3}, env="CartPole-v1",
                                   log_to_disk=False)
    try:
        assert reset_agent_config(agent, {**FAST_PPO, "lr": 2e-4, "entropy_coeff": 0.05})
        policy = agent.get_policy()
        assert policy.optimizer.param_groups[0]["lr"] == 2e-4 and policy.entropy_coeff == 0.05
        assert agent.config["lr"] == 2e-4
        # A different batch size shapes the plan: Tune must build a new actor.
        assert not reset_agent_config(agent, {**FAST_PPO, "train_batch_size": 512})
    finally:
        agent.stop()


class LrRecorder(tune.Callback):
    """Keeps (trial, iteration, config lr, the optimizer's lr) of every result."""

    def __init__(self) -> None:
        self.rows = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.rows.append((trial.trial_id, result["training_iteration"], result["config"]["lr"],
                          result["info"]["learner"]["default_policy"]["cur_lr"]))


@pytest.mark.parametrize("reuse_actors", [False, True])
def test_pbt_trials_train_with_their_own_lr_after_every_exploit(ray_session, tmp_path,
                                                                 reuse_actors):
    recorder = LrRecorder()
    pbt = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=2, quantile_fraction=0.5,
        synch=True,  # every trial reaches each interval first: an exploit always happens
        hyperparam_mutations={"lr": [3e-3, 1e-3, 3e-4, 1e-4, 3e-5]})
    random.seed(0)  # PBT's explore draws from Python's random
    # Half a CPU per trial: all four run at once on 2 CPUs, as PBT's population should.
    tune.run("PPO", config={**FAST_PPO, "env": "CartPole-v1", "num_cpus_for_driver": 0.5,
                            "lr": tune.grid_search([3e-3, 1e-3, 1e-4, 3e-5])},
             scheduler=pbt, metric="episode_reward_mean", mode="max",
             stop={"training_iteration": 6}, storage_path=str(tmp_path),
             callbacks=[recorder], reuse_actors=reuse_actors, verbose=0)
    assert len({row[0] for row in recorder.rows}) == 4
    assert len(recorder.rows) == 4 * 6
    for trial_id, iteration, config_lr, optimizer_lr in recorder.rows:
        assert optimizer_lr == pytest.approx(config_lr), (trial_id, iteration)
    # PBT exploited (copied a better trial's checkpoint into a worse one) at least once.
    perturbs = int(re.search(r"(\d+) perturbs", pbt.debug_string()).group(1))
    assert perturbs >= 1, pbt.debug_string()
