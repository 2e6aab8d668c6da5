"""The one episode runner (flowrl.envs.episodes): terminated / truncated, step limits,
clipped Box actions, hooks, and envs that report whole games in info["episode"]."""

import gymnasium as gym
import numpy as np
import pytest

from flowrl.envs.episodes import EpisodeRunner, env_reports_episodes


class LivesGame(gym.Env):
    """A game of ``lives`` lives, ``life_steps`` steps each, reward 2 per step.

    Like an Atari training env: a lost life ends the "episode" (terminated=True) while
    the game goes on (the next reset continues it); the step that ends the game
    reports the whole game in ``info["episode"]``. The env's own score is halved
    (as if clipped) so that the runner must prefer the reported game score.
    """

    reports_episode_stats = True
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, lives=3, life_steps=4, truncate_at=None):
        self.lives, self.life_steps, self.truncate_at = lives, life_steps, truncate_at
        self.game_over = True
        self.full_resets = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.game_over:
            self.game_over, self.lives_left, self.game_steps = False, self.lives, 0
            self.full_resets += 1
        self.life_step = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.life_step += 1
        self.game_steps += 1
        info = {}
        lost_life = self.life_step == self.life_steps
        if lost_life:
            self.lives_left -= 1
        truncated = self.truncate_at is not None and self.game_steps >= self.truncate_at
        if (lost_life and self.lives_left == 0) or truncated:
            self.game_over = True
            if not truncated:
                info["episode"] = {"r": np.array(2.0 * self.game_steps),
                                   "l": np.array(self.game_steps)}
        return np.zeros(1, np.float32), 1.0, lost_life, truncated, info


def test_cartpole_episode_matches_a_plain_loop_and_calls_hooks():
    env = gym.make("CartPole-v1")
    act = lambda obs: int(obs[2] > 0)  # noqa: E731  push towards the pole's lean
    starts, steps = [], []
    result = EpisodeRunner(env).run(act, seed=3, on_start=lambda o, i: starts.append(o),
                                    on_step=steps.append)
    obs, _ = env.reset(seed=3)
    total, length, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(act(obs))
        total, length, done = total + reward, length + 1, terminated or truncated
    assert result == (total, length, length, True)
    assert len(starts) == 1 and len(steps) == length
    assert steps[-1].terminated or steps[-1].truncated
    assert all(s.action == s.env_action == act(s.obs) for s in steps)
    np.testing.assert_array_equal(steps[1].obs, steps[0].next_obs)
    assert not env_reports_episodes(env)


def test_max_steps_cuts_the_episode_and_time_limits_truncate():
    env = gym.make("CartPole-v1", max_episode_steps=7)
    runner = EpisodeRunner(env)
    cut = runner.run(lambda obs: int(obs[2] > 0), seed=0, max_steps=3)
    assert cut == (3.0, 3, 3, False)
    steps = []
    full = runner.run(lambda obs: int(obs[2] > 0), seed=0, on_step=steps.append)
    assert full == (7.0, 7, 7, True) and steps[-1].truncated and not steps[-1].terminated


def test_box_actions_are_clipped_only_for_the_env():
    env = gym.make("Pendulum-v1")
    steps = []
    EpisodeRunner(env, clip_actions=True).run(lambda obs: np.array([5.0], np.float32),
                                              seed=0, max_steps=3, on_step=steps.append)
    assert [float(s.action[0]) for s in steps] == [5.0] * 3
    assert [float(s.env_action[0]) for s in steps] == [2.0] * 3
    unclipped = []
    EpisodeRunner(env).run(lambda obs: np.array([5.0], np.float32), seed=0, max_steps=1,
                           on_step=unclipped.append)
    assert float(unclipped[0].env_action[0]) == 5.0


def test_lost_lives_play_on_and_the_game_score_is_reported():
    env = LivesGame(lives=3, life_steps=4)
    runner = EpisodeRunner(env)
    assert runner.reports_episodes
    steps = []
    result = runner.run(lambda obs: 0, on_step=steps.append)
    # One game: 3 lives x 4 steps; the reported score (2 per step), not the sum (1).
    assert result == (24.0, 12, 12, True)
    assert sum(s.terminated for s in steps) == 3 and env.full_resets == 1
    assert runner.run(lambda obs: 0) == (24.0, 12, 12, True) and env.full_resets == 2


def test_truncation_mid_game_ends_the_episode_with_the_runners_sums():
    runner = EpisodeRunner(LivesGame(lives=3, life_steps=4, truncate_at=6))
    assert runner.run(lambda obs: 0) == (6.0, 6, 6, True)


@pytest.mark.parametrize("max_steps", [5, 12])
def test_step_limit_counts_steps_across_lost_lives(max_steps):
    result = EpisodeRunner(LivesGame(lives=3, life_steps=4)).run(lambda obs: 0,
                                                                 max_steps=max_steps)
    assert result.num_steps == max_steps
    assert result.finished == (max_steps == 12)
