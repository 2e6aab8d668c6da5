"""Atari preprocessing and short names, on real ALE envs (no mocks)."""

from __future__ import annotations

import pickle
import subprocess
import sys

# ale-py and opencv are flowrl dependencies: a broken install fails here, not skips.
import ale_py  # noqa: F401
import cv2
import gymnasium as gym
import numpy as np
import pytest

from flowrl.envs import atari  # (registers the ALE ids)
from flowrl.envs.atari import AtariCreator, AtariFrames, resolve_short_name, wrap_deepmind
from flowrl.envs.registry import EnvContext, make_env_creator


def _raw(game: str = "Breakout", obs_type: str = "grayscale") -> gym.Env:
    return gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0,
                    obs_type=obs_type)


def _find(env: gym.Env, cls: type) -> gym.Env | None:
    while True:
        if isinstance(env, cls):
            return env
        if not isinstance(env, gym.Wrapper):
            return None
        env = env.env


class _Passthrough(gym.Wrapper):
    """A user wrapper: makes AtariFrames step through env.step instead of ale.act."""


def test_shapes_dtypes_and_spaces():
    for training in (True, False):
        env = resolve_short_name("Breakout")(EnvContext({"training": training}))
        space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
        assert env.observation_space == space
        obs, _ = env.reset(seed=0)
        assert obs.shape == (84, 84, 4) and obs.dtype == np.uint8 and obs in space
        obs, reward, terminated, truncated, _ = env.step(1)
        assert obs.shape == (84, 84, 4) and obs.dtype == np.uint8
        assert isinstance(reward, float)
        assert isinstance(terminated, bool) and isinstance(truncated, bool)
        env.close()


def test_frame_stack_repeats_first_frame_then_shifts():
    env = wrap_deepmind(_raw(), frame_stack=4)
    obs, _ = env.reset(seed=1)
    for c in range(1, 4):
        np.testing.assert_array_equal(obs[..., c], obs[..., 0])
    history = [obs]
    for a in [2, 3, 2, 3, 0, 2]:
        obs, *_ = env.step(a)
        np.testing.assert_array_equal(obs[..., :-1], history[-1][..., 1:])
        history.append(obs)
    # Each step's newest frame: obs[..., -1] of step t is obs[..., -1 - k] of step t + k.
    np.testing.assert_array_equal(history[-1][..., 0], history[-4][..., -1])
    assert not np.array_equal(history[-1][..., -1], history[0][..., -1])  # things moved
    # a custom stack size, k=1 included
    assert wrap_deepmind(_raw(), frame_stack=1).reset(seed=0)[0].shape == (84, 84, 1)


def test_max_and_skip_matches_manual_frames():
    wrapped = AtariFrames(_raw(obs_type="rgb"), noop_max=0, frame_skip=4)
    manual = _raw(obs_type="grayscale")
    obs, _ = wrapped.reset(seed=7)
    frame, _ = manual.reset(seed=7)
    np.testing.assert_array_equal(obs, cv2.resize(frame, (84, 84), interpolation=cv2.INTER_AREA))
    actions = np.random.default_rng(0).integers(0, 4, size=150)
    actions[::10] = 1  # FIRE now and then, so the ball is in play
    pooled_differs = 0
    for a in actions.tolist():
        obs, reward, terminated, truncated, _ = wrapped.step(a)
        frames, total = [], 0.0
        for _ in range(4):
            frame, r, m_term, m_trunc, _ = manual.step(a)
            frames.append(frame)
            total += r
        pooled = np.maximum(frames[-2], frames[-1])
        pooled_differs += not np.array_equal(pooled, frames[-1])
        expected = cv2.resize(pooled, (84, 84), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(obs, expected)
        assert reward == total
        assert (terminated, truncated) == (m_term, m_trunc)
        if terminated:
            break
    assert pooled_differs > 0  # the max over two frames mattered somewhere


def test_direct_ale_path_equals_env_step_path():
    fast = AtariFrames(_raw(), noop_max=30)
    slow = AtariFrames(_Passthrough(_raw()), noop_max=30)
    assert fast._direct and not slow._direct
    obs_f, info_f = fast.reset(seed=3)
    obs_s, info_s = slow.reset(seed=3)
    np.testing.assert_array_equal(obs_f, obs_s)
    assert info_f == info_s
    for a in np.random.default_rng(1).integers(0, 4, size=300).tolist():
        out_f, out_s = fast.step(a), slow.step(a)
        np.testing.assert_array_equal(out_f[0], out_s[0])
        assert out_f[1:] == out_s[1:]
        if out_f[2] or out_f[3]:
            break


def test_noop_reset_takes_1_to_noop_max_frames():
    env = AtariFrames(_raw(), noop_max=30)
    counts = {env.reset(seed=s)[1]["episode_frame_number"] for s in range(8)}
    assert all(1 <= c <= 30 for c in counts) and len(counts) > 3
    assert AtariFrames(_raw(), noop_max=0).reset(seed=0)[1]["episode_frame_number"] == 0


def test_reward_clipping_only_in_training():
    # Same dynamics (no episodic life), only clipping differs: SpaceInvaders scores 5..30.
    clipped = wrap_deepmind(_raw("SpaceInvaders"), training=True, episodic_life=False)
    raw = wrap_deepmind(_raw("SpaceInvaders"), training=False)
    clipped.reset(seed=0)
    raw.reset(seed=0)
    seen = []
    for a in np.random.default_rng(0).integers(0, 6, size=400).tolist():
        _, r_clip, term, trunc, _ = clipped.step(a)
        _, r_raw, *_ = raw.step(a)
        assert r_clip == float(np.sign(r_raw))
        seen.append(r_raw)
        if term or trunc:
            break
    assert max(seen) > 1  # unclipped scores reached the eval env


def test_episodic_life_ends_training_episode_but_game_goes_on():
    env = resolve_short_name("Breakout")(EnvContext({"training": True}))
    ale = env.unwrapped.ale
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    life_losses, lives = 0, ale.lives()
    assert lives == 5
    for _ in range(5000):
        _, _, terminated, truncated, info = env.step(int(rng.integers(0, 4)))
        if not (terminated or truncated):
            continue
        if "episode" in info:  # the real game over
            assert ale.game_over()
            break
        life_losses += 1
        assert ale.lives() == lives - 1 and not ale.game_over()
        frame_before = ale.getEpisodeFrameNumber()
        _, reset_info = env.reset()
        lives = ale.lives()
        assert reset_info["lives"] == lives == 5 - life_losses
        # no emulator reset: the episode frame counter keeps running (FIRE advanced it)
        assert ale.getEpisodeFrameNumber() > frame_before
    else:
        pytest.fail("no game over within 5000 steps")
    assert life_losses == 4
    # Evaluation envs play whole games: a lost life is not a terminal.
    eval_env = resolve_short_name("Breakout")(EnvContext({"training": False}))
    eval_env.reset(seed=0)
    for _ in range(2000):
        _, _, terminated, _, _ = eval_env.step(0)
        if eval_env.unwrapped.ale.lives() < 5:
            assert not terminated
            break
    else:
        pytest.fail("no life lost")


@pytest.mark.parametrize("game,reference_config", [
    # no FIRE: an eval env sees exactly the emulator actions of the training env
    ("MsPacman", {"training": False}),
    # FIRE after each lost life changes the emulator inputs: compare with an unclipped
    # training env (FIRE scores nothing in Breakout, so all points are in step rewards)
    ("Breakout", {"training": True, "clip_rewards": False}),
])
def test_episode_info_reports_unclipped_game_return(game, reference_config):
    train = resolve_short_name(game)(EnvContext({"training": True}))
    reference = resolve_short_name(game)(EnvContext(reference_config))
    train.reset(seed=5)
    reference.reset(seed=5)
    clipped_sum, unclipped_sum, lives_lost, steps = 0.0, 0.0, 0, 0
    rng = np.random.default_rng(5)
    train_info = None
    while train_info is None:
        a = int(rng.integers(0, train.action_space.n))
        obs_t, r_train, t_term, t_trunc, t_info = train.step(a)
        obs_r, r_ref, r_term, r_trunc, r_info = reference.step(a)
        # same game (only the newest frame: stacks restart at each lost life in training)
        np.testing.assert_array_equal(obs_t[..., -1], obs_r[..., -1])
        steps += 1
        clipped_sum += r_train
        unclipped_sum += r_ref
        if "episode" in t_info:
            train_info = t_info["episode"]
            assert "episode" in r_info and (r_term or r_trunc)
        elif t_term or t_trunc:
            lives_lost += 1
            assert "episode" not in r_info
            train.reset()
            if r_term or r_trunc:
                reference.reset()
        assert steps < 20_000
    assert lives_lost >= 2  # lives were lost before the game ended
    assert train_info["r"] == unclipped_sum == r_info["episode"]["r"]
    if game == "MsPacman":  # 10 points a pellet; random Breakout scores only 1s
        assert unclipped_sum > clipped_sum > 0  # the scores were really clipped
    fire_steps = lives_lost + 1 if game == "Breakout" else 0  # FIRE after each reset
    assert train_info["l"] == steps + fire_steps


def test_fire_on_reset_launches_breakout():
    # NOOP only: with FIRE on reset the ball is served and lives get lost.
    env = wrap_deepmind(_raw(), training=False)
    assert _find(env, atari.FireReset) is not None
    env.reset(seed=0)
    for _ in range(300):
        env.step(0)
    assert env.unwrapped.ale.lives() < 5
    no_fire = AtariFrames(_raw())
    no_fire.reset(seed=0)
    for _ in range(300):
        no_fire.step(0)
    assert no_fire.unwrapped.ale.lives() == 5  # never served
    # games without FIRE get no FireReset
    assert _find(wrap_deepmind(_raw("MsPacman")), atari.FireReset) is None


def test_short_names_resolve():
    for name in ["Breakout", "Pong", "SpaceInvaders", "Qbert", "Seaquest", "BeamRider"]:
        creator = resolve_short_name(name)
        assert isinstance(creator, AtariCreator)
        assert creator.env_id == f"ALE/{name}-v5"
        env = creator(EnvContext({}))
        assert env.observation_space.shape == (84, 84, 4)
        env.close()
    assert resolve_short_name("pong") == resolve_short_name("Pong")
    for unknown in ["CartPole", "CartPole-v1", "Breakout-v5", "NotAGame", ""]:
        assert resolve_short_name(unknown) is None
    assert len(atari.atari_game_names()) >= 100
    # through the registry hook, as the CLI does
    env = make_env_creator("Pong")(EnvContext({"training": False}))
    assert env.observation_space.shape == (84, 84, 4)


def test_short_name_config_keys():
    creator = resolve_short_name("Breakout")
    env = creator(EnvContext({"frame_stack": 2, "screen_size": 64,
                              "repeat_action_probability": 0.25}))
    assert env.observation_space.shape == (64, 64, 2)
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.25
    assert creator({}).unwrapped.ale.getFloat("repeat_action_probability") == 0.0


def test_full_ids_make_with_plain_gym_make():
    for env_id in ["ALE/Breakout-v5", "BreakoutNoFrameskip-v4", "PongDeterministic-v4"]:
        env = gym.make(env_id)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (210, 160, 3)  # unwrapped: no DeepMind preprocessing
        env.close()
    env = make_env_creator("ALE/Breakout-v5")(EnvContext({}))
    assert env.observation_space.shape == (210, 160, 3)


def test_wrap_deepmind_rejects_frameskipping_env():
    with pytest.raises(ValueError, match="frameskip=1"):
        wrap_deepmind(gym.make("ALE/Breakout-v5"))


def test_creator_pickles_and_creates_env():
    creator = pickle.loads(pickle.dumps(resolve_short_name("Breakout")))
    env = creator(EnvContext({"training": False}, worker_index=1, vector_index=2))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (84, 84, 4)
    wrapped = pickle.loads(pickle.dumps(make_env_creator("Breakout")))
    assert wrapped(EnvContext({})).observation_space.shape == (84, 84, 4)


def test_missing_ale_py_fails_only_for_atari_names():
    code = (
        "import sys; sys.modules['ale_py'] = None\n"
        "from flowrl.envs import atari\n"
        "assert atari.resolve_short_name('CartPole') is None\n"
        "try:\n"
        "    atari.resolve_short_name('Breakout')\n"
        "except ImportError as e:\n"
        "    assert 'pip install ale-py' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
