"""Recurrent policies at inference time: the state threaded through compute_action, a
restored checkpoint, rollout.py, evaluation and the TorchScript export all give the same
greedy actions, step by step, over several episodes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl import Agent, get_agent_class
from flowrl.cli.rollout import rollout_main
from flowrl.envs import register_env

# TorchScript is what loads without Python code; torch 2.x marks its API deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

ENV = "recurrent_inference_masked_cartpole"
CELL = 32
STEPS = 200        # env steps compared, over several episodes
SEED = 100         # episode i starts from env.reset(seed=SEED + i), as rollout.py --seed
CONFIG = {
    "model": {"use_lstm": True, "lstm_cell_size": CELL, "fcnet_hiddens": [32],
              "lstm_use_prev_action": True, "lstm_use_prev_reward": True},
    "env_config": {"max_episode_steps": 60},
    "train_batch_size": 400, "rollout_fragment_length": 200, "sgd_minibatch_size": 100,
    "num_sgd_iter": 2, "seed": 0,
    "evaluation_interval": 2, "evaluation_num_episodes": 3,
}


class MaskedCartPole(gym.ObservationWrapper):
    """CartPole-v1 with both velocities zeroed: ``[x, 0, angle, 0]``. Only a policy
    with memory can tell which way the cart and pole move."""

    def __init__(self, config: dict | None = None) -> None:
        steps = int((config or {}).get("max_episode_steps", 500))
        super().__init__(gym.make("CartPole-v1", max_episode_steps=steps))

    def observation(self, observation: np.ndarray) -> np.ndarray:
        observation = np.array(observation, dtype=np.float32)
        observation[1] = 0.0
        observation[3] = 0.0
        return observation


register_env(ENV, MaskedCartPole)

#: ``act(obs, reward of the previous step or None) -> action``, one per episode.
Actor = Callable[[np.ndarray, "float | None"], Any]


def play(new_actor: Callable[[], Actor], steps: int = STEPS, seed: int = SEED,
         episodes_wanted: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(observations, actions)`` of each episode of a fresh env: ``steps`` env steps
    in all, or ``episodes_wanted`` whole episodes. Episode ``i`` is reset with
    ``seed + i`` and gets ``new_actor()``."""
    env = MaskedCartPole(CONFIG["env_config"])
    episodes, total = [], 0
    if episodes_wanted is not None:
        steps = np.inf
    while total < steps and len(episodes) != episodes_wanted:
        obs, _ = env.reset(seed=seed + len(episodes))
        act, observations, actions, reward = new_actor(), [], [], None
        while total < steps:
            action = int(act(obs, reward))
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += 1
            if terminated or truncated:
                break
        episodes.append((np.stack(observations), np.array(actions)))
    env.close()
    return episodes


def by_hand(agent: Agent) -> Callable[[], Actor]:
    """compute_action with the state, previous action and reward threaded by hand."""
    def new_actor() -> Actor:
        state, prev_action = None, None

        def act(obs: np.ndarray, reward: float | None) -> Any:
            nonlocal state, prev_action
            action, state = agent.compute_action(obs, state, prev_action, reward)
            prev_action = action
            return action
        return act
    return new_actor


def by_export(module: torch.jit.ScriptModule) -> Callable[[], Actor]:
    """The TorchScript module on batches of one, its state threaded by hand."""
    def new_actor() -> Actor:
        state = [module.initial_state_0[None], module.initial_state_1[None]]
        prev_action, prev_reward = torch.zeros(1, dtype=torch.int64), torch.zeros(1)

        def act(obs: np.ndarray, reward: float | None) -> Any:
            nonlocal state, prev_action, prev_reward
            if reward is not None:
                prev_reward = torch.tensor([reward], dtype=torch.float32)
            prev_action, *state = module(torch.as_tensor(obs)[None], *state, prev_action,
                                         prev_reward)
            return int(prev_action[0])
        return act
    return new_actor


def assert_same_episodes(got: list, expected: list) -> None:
    assert [len(a) for _, a in got] == [len(a) for _, a in expected]
    for (obs, actions), (expected_obs, expected_actions) in zip(got, expected):
        np.testing.assert_array_equal(actions, expected_actions)
        np.testing.assert_allclose(obs, expected_obs, rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PPO LSTM agent after two iterations (the second one evaluates), its last
    result, its checkpoint, and its greedy episodes by compute_action."""
    root = tmp_path_factory.mktemp("recurrent_inference")
    agent = get_agent_class("PPO")(config=CONFIG, env=ENV, logdir=str(root / "log"))
    try:
        results = [agent.train() for _ in range(2)]
        checkpoint = agent.save(str(root / "checkpoint_000002"))
        reference = play(by_hand(agent))
        yield {"agent": agent, "result": results[-1], "checkpoint": checkpoint,
               "reference": reference, "root": root}
    finally:
        agent.stop()


def test_compute_action_threads_the_state(trained):
    agent, reference = trained["agent"], trained["reference"]
    assert agent.get_policy().recurrent
    assert len(reference) >= 3 and sum(len(a) for _, a in reference) == STEPS
    initial = agent.get_initial_state()
    assert [part.shape for part in initial] == [(CELL,), (CELL,)]
    assert all(part.dtype == np.float32 and not part.any() for part in initial)

    obs = reference[0][0][0]
    action, state = agent.compute_action(obs)  # state=None: the initial state
    assert action in (0, 1) and [part.shape for part in state] == [(CELL,), (CELL,)]
    assert agent.compute_action(obs, initial)[0] == action
    # The same observations from a fresh state each step: the memory changes actions.
    fresh = [agent.compute_action(o)[0] for obs, _ in reference for o in obs]
    assert fresh != [int(a) for _, actions in reference for a in actions]
    # Deterministic: a second pass gives the same episodes.
    assert_same_episodes(play(by_hand(agent)), reference)


def test_restored_agent_acts_the_same(trained):
    restored = Agent.from_checkpoint(trained["checkpoint"], log_to_disk=False)
    try:
        assert_same_episodes(play(by_hand(restored)), trained["reference"])
    finally:
        restored.stop()


def test_rollout_script_carries_the_state(trained, tmp_path, capsys):
    out = tmp_path / "episodes.npz"
    assert rollout_main([trained["checkpoint"], "--steps", str(STEPS), "--seed", str(SEED),
                         "--no-render", "--out", str(out)]) == 0
    assert "Episode 3:" in capsys.readouterr().out
    saved = np.load(out)
    cuts = np.cumsum(saved["episode_lengths"])[:-1]
    episodes = list(zip(np.split(saved["obs"], cuts), np.split(saved["actions"], cuts)))
    assert_same_episodes(episodes, trained["reference"])


def test_evaluation_carries_the_state(trained):
    evaluation = trained["result"]["evaluation"]
    # Agent.evaluate resets episode i with seed + 10_000_000 + i (config seed 0).
    returns = [len(actions) for _, actions in  # CartPole: reward 1 per step
               play(by_hand(trained["agent"]), seed=10_000_000, episodes_wanted=3)]
    assert evaluation["episodes_this_iter"] == 3
    assert evaluation["episode_reward_min"] == min(returns)
    assert evaluation["episode_reward_max"] == max(returns)
    assert evaluation["episode_reward_mean"] == pytest.approx(np.mean(returns))


def test_torchscript_export_takes_and_returns_the_state(trained, tmp_path):
    agent, reference = trained["agent"], trained["reference"]
    path = agent.export_policy(str(tmp_path / "export"))
    module = torch.jit.load(path)
    assert_same_episodes(play(by_export(module)), reference)

    meta = json.load(open(os.path.join(os.path.dirname(path), "policy.json")))
    assert meta["recurrent"] is True
    assert meta["input"]["arguments"] == ["obs", "state_in_0", "state_in_1",
                                          "prev_actions", "prev_rewards"]
    assert meta["output"]["returns"] == "a tuple (actions, *state_out)"
    assert [part["shape"] for part in meta["state"]] == [["B", CELL], ["B", CELL]]
    assert all(part["initial"] == "zeros" for part in meta["state"])
    assert "*state" in meta["usage"]

    # A batch of three episodes stepped together gives each one's actions.
    episodes = reference[:3]
    length = min(len(actions) for _, actions in episodes)
    state = [torch.zeros(3, CELL), torch.zeros(3, CELL)]
    prev_actions, prev_rewards = torch.zeros(3, dtype=torch.int64), torch.zeros(3)
    for t in range(length):
        obs = torch.as_tensor(np.stack([o[t] for o, _ in episodes]))
        prev_actions, *state = module(obs, *state, prev_actions, prev_rewards)
        assert prev_actions.tolist() == [int(a[t]) for _, a in episodes]
        prev_rewards = torch.ones(3)  # CartPole's reward of every step

    # Policy.export: one model step, (dist_inputs, value, *state_out).
    model = torch.jit.load(agent.get_policy().export(str(tmp_path / "model")))
    obs, actions = reference[0]
    state = [torch.zeros(1, CELL), torch.zeros(1, CELL)]
    prev_action, prev_reward = torch.zeros(1, dtype=torch.int64), torch.zeros(1)
    for o, action in zip(obs, actions):
        dist_inputs, value, *state = model(torch.as_tensor(o)[None], *state, prev_action,
                                           prev_reward)
        assert int(dist_inputs.argmax(-1)[0]) == action and value.shape == (1,)
        prev_action, prev_reward = torch.tensor([action]), torch.ones(1)


def test_wrong_state_is_a_clear_error(trained):
    agent = trained["agent"]
    obs = trained["reference"][0][0][0]
    with pytest.raises(ValueError, match=r"state\[0\] has shape \(16,\).*\(32,\)"):
        agent.compute_action(obs, [np.zeros(16), np.zeros(CELL)])
    with pytest.raises(ValueError, match=r"state\[1\] has shape \(1, 32\)"):
        agent.compute_action(obs, [np.zeros(CELL), np.zeros((1, CELL))])
    with pytest.raises(ValueError, match="state has 1 parts.*2 unbatched"):
        agent.compute_action(obs, [np.zeros(CELL)])
    with pytest.raises(TypeError, match="state must be a list"):
        agent.compute_action(obs, np.zeros((2, CELL)))
    with pytest.raises(TypeError, match="explore by keyword"):
        agent.compute_action(obs, True)
    with pytest.raises(ValueError, match="does not fit the action space"):
        agent.compute_action(obs, None, prev_action=5)


def test_plain_policy_takes_no_state():
    agent = get_agent_class("PPO")(config={"model": {"fcnet_hiddens": [8]}},
                                   env="CartPole-v1", log_to_disk=False)
    try:
        obs, _ = MaskedCartPole().reset(seed=0)
        assert agent.compute_action(obs) in (0, 1)  # the action alone, as before
        assert agent.get_initial_state() == []
        with pytest.raises(ValueError, match="not recurrent.*state"):
            agent.compute_action(obs, [np.zeros(4)])
        with pytest.raises(ValueError, match="not recurrent.*prev_action / prev_reward"):
            agent.compute_action(obs, prev_action=1, prev_reward=1.0)
    finally:
        agent.stop()

