"""A custom environment: a corridor the agent must walk to the end of.

Train it from Python (this file), or from the command line by naming the class:

    python examples/custom_env.py --stop-reward 0.9
    python scripts/train.py --run PPO --env examples/custom_env.py:SimpleCorridor \\
        --config '{"env_config": {"corridor_length": 8}}' --stop '{"episode_reward_mean": 0.9}'

``register_env("corridor", ...)`` makes the name "corridor" usable in configs of this
process (and of its Ray workers and Tune trials).
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

from flowrl import EnvContext, get_agent_class, register_env


class SimpleCorridor(gym.Env):
    """Start at cell 0; actions 0 = left, 1 = right; reward 1 at the end, -0.01 a step.

    ``env_config``: ``corridor_length`` (default 5). Episodes end at the goal or after
    ``4 * corridor_length`` steps (truncated).
    """

    def __init__(self, config: EnvContext | dict | None = None):
        config = config or {}
        self.length = int(config.get("corridor_length", 5))
        if self.length < 2:
            raise ValueError(f"corridor_length={self.length} must be >= 2")
        self.action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.spaces.Box(0.0, float(self.length), (1,), np.float32)
        self.position = 0
        self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position, self.steps = 0, 0
        return np.array([self.position], np.float32), {}

    def step(self, action):
        self.position = max(0, self.position + (1 if int(action) == 1 else -1))
        self.steps += 1
        terminated = self.position >= self.length - 1
        truncated = not terminated and self.steps >= 4 * self.length
        reward = 1.0 if terminated else -0.01
        return np.array([self.position], np.float32), reward, terminated, truncated, {}


register_env("corridor", lambda ctx: SimpleCorridor(ctx))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="PPO")
    parser.add_argument("--corridor-length", type=int, default=5)
    parser.add_argument("--stop-reward", type=float, default=0.9)
    parser.add_argument("--max-iterations", type=int, default=50)
    args = parser.parse_args(argv)
    agent = get_agent_class(args.run)(env="corridor", config={
        "env_config": {"corridor_length": args.corridor_length}, "seed": 0})
    try:
        for _ in range(args.max_iterations):
            result = agent.train()
            print(f"iter {result['training_iteration']}  reward "
                  f"{result['episode_reward_mean']:.2f}", flush=True)
            if result["episode_reward_mean"] >= args.stop_reward:
                break
        return result["episode_reward_mean"]
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
