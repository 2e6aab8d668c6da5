"""Callbacks and custom metrics, ``monitor: true`` videos, and evaluation."""

import json
import logging
import os
import pickle
import sys

import cv2
import gymnasium as gym
import pytest
import ray

from flowrl.workers.callbacks import DefaultCallbacks, resolve_callbacks
from flowrl.algorithms.checkpoint import PARAMS_FILE
from flowrl.envs.registry import EnvContext, make_env_creator
from flowrl.envs.video import (EpisodeVideoRecorder, capped_cubic_video_schedule,
                               make_recordable_env)
from flowrl.plans.pg import PGAgent
from flowrl.plans.ppo import PPOAgent
from flowrl.algorithms.result_logger import flatten_result
from flowrl.workers.sampler import EpisodeStats

# Remote workers unpickle the callbacks classes of this module by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Truncated fragments, so that every sampled step is a counted step.
PG_SMALL = {"batch_mode": "truncate_episodes", "num_envs_per_worker": 2,
            "rollout_fragment_length": 50, "train_batch_size": 200, "seed": 1}


class CountingCallbacks(DefaultCallbacks):
    """Counts hook calls; sets custom metrics; remembers env 0's episode lengths."""

    def __init__(self):
        self.counts = {"start": 0, "step": 0, "end": 0, "sample_end": 0}
        self.env0_lengths = []

    def on_episode_start(self, *, worker, episode, env_index):
        assert episode.length == 0 and episode.last_observation is not None
        episode.user_data["pole_angles"] = []
        self.counts["start"] += 1

    def on_episode_step(self, *, worker, episode, env_index):
        episode.user_data["pole_angles"].append(abs(float(episode.last_observation[2])))
        self.counts["step"] += 1

    def on_episode_end(self, *, worker, episode, env_index):
        assert episode.env_index == env_index
        assert len(episode.user_data["pole_angles"]) == episode.length
        episode.custom_metrics["max_angle"] = max(episode.user_data["pole_angles"])
        episode.custom_metrics["length_x2"] = 2.0 * episode.length
        if env_index == 0:
            self.env0_lengths.append(episode.length)
        self.counts["end"] += 1

    def on_sample_end(self, *, worker, samples):
        self.counts["sample_end"] += 1

    def on_train_result(self, *, agent, result):
        result["callback_iteration"] = agent.iteration
        result["agent_logdir"] = agent.logdir


def _assert_custom_metrics(result):
    flat = flatten_result(result)
    for stat in ("mean", "min", "max"):
        assert isinstance(flat[f"custom_metrics/max_angle_{stat}"], float)
    assert flat["custom_metrics/max_angle_min"] <= flat["custom_metrics/max_angle_max"]
    # length_x2 is summarized over the same window as episode_len_mean.
    assert flat["custom_metrics/length_x2_mean"] == pytest.approx(
        2 * result["episode_len_mean"])


def test_callbacks_fire_per_episode_and_step_and_add_custom_metrics(results_dir):
    agent = PGAgent(config={**PG_SMALL, "callbacks": CountingCallbacks}, env="CartPole-v1")
    for _ in range(2):
        result = agent.train()
    counts = agent.workers.local_worker().callbacks.counts
    assert counts["step"] == result["timesteps_total"] == 400
    assert counts["end"] == result["episodes_total"] > 0
    assert counts["start"] == counts["end"] + 2  # the 2 envs' episodes in progress
    assert counts["sample_end"] == 4
    assert result["callback_iteration"] == 2
    _assert_custom_metrics(result)
    agent.stop()


def test_callbacks_run_on_remote_workers(ray_session, results_dir):
    config = {**PG_SMALL, "callbacks": CountingCallbacks, "num_workers": 2,
              "num_cpus_per_worker": 0.5}
    agent = PGAgent(config=config, env="CartPole-v1")
    result = agent.train()
    counts = agent.workers.foreach_worker(lambda w: w.callbacks.counts)
    assert counts[0]["step"] == 0  # the local worker only learns
    # bulk_sync: one fragment per worker, nothing sampled beyond the reported steps.
    assert sum(c["step"] for c in counts[1:]) == result["timesteps_total"] == 200
    assert sum(c["end"] for c in counts[1:]) == result["episodes_total"] > 0
    assert [c["start"] - c["end"] for c in counts[1:]] == [2, 2]
    assert [c["sample_end"] for c in counts[1:]] == [1, 1]
    assert result["callback_iteration"] == 1
    _assert_custom_metrics(result)
    agent.stop()


def test_tune_trials_run_on_train_result_and_write_videos_in_the_agent_logdir(
        ray_session, tmp_path):
    from ray import tune

    import flowrl  # noqa: F401  (registers the trainables)
    trials = tune.run_experiments(
        {"cb": {"run": "PG", "env": "CartPole-v1", "stop": {"training_iteration": 1},
                "storage_path": str(tmp_path),
                "config": {**PG_SMALL, "callbacks": CountingCallbacks, "monitor": True}}},
        verbose=0)
    (trial,) = trials
    assert trial.status == "TERMINATED"
    assert trial.last_result["callback_iteration"] == 1
    assert "max_angle_mean" in trial.last_result["custom_metrics"]
    # Videos go to the logdir Tune hands the agent (the Trainable's logdir).
    videos = os.listdir(os.path.join(trial.last_result["agent_logdir"], "videos"))
    assert "worker0_episode_000000.mp4" in videos


def test_callbacks_given_by_import_path(results_dir):
    for path in (f"{__name__}:CountingCallbacks", f"{__name__}.CountingCallbacks"):
        assert PGAgent.merge_config({"callbacks": path})["callbacks"] is CountingCallbacks
    agent = PGAgent(config={**PG_SMALL, "callbacks": f"{__name__}:CountingCallbacks"},
                    env="CartPole-v1")
    result = agent.train()
    assert result["callback_iteration"] == 1
    assert "max_angle_mean" in result["custom_metrics"]
    # params.json names the class; a checkpoint restores with it.
    path = agent.save()
    params = json.load(open(os.path.join(path, PARAMS_FILE)))
    assert params["callbacks"] == f"{__name__}.CountingCallbacks"
    agent.stop()
    restored = PGAgent.from_checkpoint(path)
    assert restored.config["callbacks"] is CountingCallbacks
    restored.stop()


def test_checkpoint_with_unimportable_callbacks_restores_with_defaults(results_dir,
                                                                        caplog):
    class LocalCallbacks(DefaultCallbacks):
        pass

    agent = PGAgent(config={**PG_SMALL, "callbacks": LocalCallbacks}, env="CartPole-v1")
    path = agent.save()
    agent.stop()
    with caplog.at_level(logging.WARNING):
        restored = PGAgent.from_checkpoint(path)
    assert restored.config["callbacks"] is DefaultCallbacks
    assert "LocalCallbacks" in caplog.text
    restored.stop()
    restored = PGAgent.from_checkpoint(path, config_overrides={"callbacks": LocalCallbacks})
    assert restored.config["callbacks"] is LocalCallbacks
    restored.stop()


@pytest.mark.parametrize("value, match", [
    ("no_such_module_xyz:Callbacks", r"no_such_module_xyz:Callbacks"),
    ("flowrl.workers.callbacks:NoSuchCallbacks", r"has no 'NoSuchCallbacks'"),
    ("NoDots", r"not an import path"),
    (dict, r"not a subclass of flowrl.workers.callbacks.DefaultCallbacks"),
    ("flowrl.workers.callbacks.Episode", r"not a subclass"),
    (CountingCallbacks(), r"pass the class CountingCallbacks, not an instance"),
    (42, r"'callbacks' has value 42"),
])
def test_bad_callbacks_fail_at_config_merge(value, match):
    with pytest.raises(ValueError, match=match):
        PPOAgent.merge_config({"env": "CartPole-v1", "callbacks": value})


def test_episode_stats_are_backwards_compatible_tuples():
    stats = EpisodeStats(4.0, 4, {"x": 1.0})
    assert stats == (4.0, 4)
    ret, length = stats
    assert (ret, length) == (4.0, 4)
    clone = pickle.loads(pickle.dumps(stats))
    assert clone == (4.0, 4) and clone.custom_metrics == {"x": 1.0}
    assert EpisodeStats(1.0, 2).custom_metrics == {}


# ----------------------------------------------------------------------------- videos


def _frames(path):
    cap = cv2.VideoCapture(path)
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    return count


def _assert_mp4(path):
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        assert f.read(8)[4:8] == b"ftyp"


def test_capped_cubic_schedule():
    recorded = [i for i in range(3001) if capped_cubic_video_schedule(i)]
    assert recorded[:5] == [0, 1, 8, 27, 64]
    assert recorded[-4:] == [729, 1000, 2000, 3000]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_monitor_writes_mp4_videos_of_episodes(num_workers, results_dir, request):
    if num_workers:
        request.getfixturevalue("ray_session")
    config = {**PG_SMALL, "monitor": True, "callbacks": CountingCallbacks,
              "num_workers": num_workers, "num_cpus_per_worker": 0.5}
    agent = PGAgent(config=config, env="CartPole-v1")
    agent.train()
    recorder_lengths = agent.workers.foreach_worker(lambda w: w.callbacks.env0_lengths)
    agent.stop()  # finishes a video in progress
    video_dir = os.path.join(agent.logdir, "videos")
    names = sorted(os.listdir(video_dir))
    prefix = f"worker{num_workers}_episode_"
    assert f"{prefix}000000.mp4" in names and f"{prefix}000001.mp4" in names
    assert all(name.startswith(prefix) for name in names)  # one recording env only
    for name in names:
        _assert_mp4(os.path.join(video_dir, name))
    # The frame after reset plus one per step.
    lengths = recorder_lengths[num_workers]
    assert _frames(os.path.join(video_dir, f"{prefix}000000.mp4")) == lengths[0] + 1
    assert _frames(os.path.join(video_dir, f"{prefix}000001.mp4")) == lengths[1] + 1


def test_recorder_needs_rgb_array_render_mode(tmp_path):
    with pytest.raises(ValueError, match=r"CartPole-v1.*render_mode='rgb_array'.*env_config"):
        EpisodeVideoRecorder(gym.make("CartPole-v1"), str(tmp_path))
    # Standalone use (the rollout script): every episode, partial one finished on close.
    env = EpisodeVideoRecorder(gym.make("CartPole-v1", render_mode="rgb_array"),
                               str(tmp_path), episode_trigger=lambda i: True)
    env.reset(seed=0)
    for _ in range(3):
        env.step(0)
    env.close()
    assert [os.path.basename(p) for p in env.videos] == ["episode_000000.mp4"]
    assert _frames(env.videos[0]) == 4


def test_atari_videos_span_whole_games_not_lives(tmp_path):
    creator = make_env_creator("Breakout")
    env = EpisodeVideoRecorder(make_recordable_env(creator, EnvContext({})), str(tmp_path),
                               episode_trigger=lambda i: True)
    assert env.real_episodes
    env.reset(seed=0)
    env.action_space.seed(0)
    steps = lives_lost = 0
    while True:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
        if terminated or truncated:
            if "episode" in info:
                break
            lives_lost += 1
            assert env.videos == []  # a lost life does not end the video
            env.reset()
    assert lives_lost == 4  # Breakout: 5 lives
    assert len(env.videos) == 1
    _assert_mp4(env.videos[0])
    # Reset frame, one per step, and one per reset after a lost life.
    assert _frames(env.videos[0]) == steps + 1 + lives_lost
    env.close()


class GameLengths(DefaultCallbacks):
    def __init__(self):
        self.lengths = []

    def on_episode_end(self, *, worker, episode, env_index):
        self.lengths.append(episode.length)


def test_monitor_and_evaluation_on_atari_short_name(results_dir):
    config = {"monitor": True, "callbacks": GameLengths, "num_envs_per_worker": 1,
              "rollout_fragment_length": 100, "train_batch_size": 100,
              "batch_mode": "truncate_episodes", "seed": 0, "evaluation_interval": 1,
              "evaluation_num_episodes": 1}
    agent = PGAgent(config=config, env="Breakout")
    for _ in range(10):
        result = agent.train()
        if agent.workers.local_worker().env.videos:
            break
    # Evaluation played one whole game (all lives) and reports its real score.
    assert result["evaluation"]["episodes_this_iter"] == 1
    assert agent._eval_env.unwrapped.ale.lives() == 0
    lengths = agent.workers.local_worker().callbacks.lengths
    agent.stop()
    videos = sorted(os.listdir(os.path.join(agent.logdir, "videos")))
    assert videos[0] == "worker0_episode_000000.mp4"
    # Callbacks' episodes are games too; the video adds the 4 resets after lost lives.
    assert _frames(os.path.join(agent.logdir, "videos", videos[0])) == lengths[0] + 1 + 4


def test_monitor_needs_rgb_frames_from_custom_envs(results_dir):
    with pytest.raises(ValueError, match=r"render_mode='rgb_array'"):
        PGAgent(config={"monitor": True}, env=lambda ctx: gym.make("CartPole-v1"))


# ------------------------------------------------------------------------- evaluation


def test_evaluation_is_greedy_and_reports_custom_metrics(results_dir):
    agent = PGAgent(config={**PG_SMALL, "evaluation_interval": 1,
                            "evaluation_num_episodes": 3,
                            "evaluation_config": {"callbacks": CountingCallbacks,
                                                  "env_config": {"max_episode_steps": 30}}},
                    env="CartPole-v1")
    explore_flags = []
    compute_action = agent.compute_action

    def spy(obs, explore=False, **kwargs):
        explore_flags.append(explore)
        return compute_action(obs, explore=explore, **kwargs)

    agent.compute_action = spy
    result = agent.train()
    evaluation = result["evaluation"]
    assert evaluation["episodes_this_iter"] == 3
    for key in ("episode_reward_mean", "episode_reward_min", "episode_reward_max",
                "episode_len_mean"):
        assert isinstance(evaluation[key], float)
    assert evaluation["episode_len_mean"] <= 30  # evaluation's env_config applies
    assert set(explore_flags) == {False}
    assert evaluation["custom_metrics"]["length_x2_mean"] == pytest.approx(
        2 * evaluation["episode_len_mean"])
    # Training used the default callbacks.
    assert "custom_metrics/length_x2_mean" not in flatten_result(
        {k: v for k, v in result.items() if k != "evaluation"})
    agent.stop()


@pytest.mark.parametrize("evaluation_config, match", [
    ({"explor": False}, r"'explor' in 'evaluation_config'.*Did you mean 'explore'"),
    ({"model": {"fcnet_hidden": [8]}}, r"Did you mean 'fcnet_hiddens'"),
    ({"explore": "no"}, r"evaluation_config.explore"),
    ({"callbacks": "nowhere_module:X"}, r"evaluation_config.callbacks"),
])
def test_evaluation_config_is_validated(evaluation_config, match):
    with pytest.raises(ValueError, match=match):
        PPOAgent.merge_config({"env": "CartPole-v1", "evaluation_config": evaluation_config})


def test_evaluation_config_env_config_stays_free_form():
    config = PPOAgent.merge_config({"env": "CartPole-v1", "evaluation_config": {
        "env_config": {"anything": 1}, "explore": True}})
    assert config["evaluation_config"]["env_config"] == {"anything": 1}
    assert resolve_callbacks(None) is DefaultCallbacks
