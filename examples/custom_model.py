"""A custom torch model: a shared trunk with separate policy and value heads.

Every flowrl model is built as ``cls(obs_space, action_space, num_outputs,
model_config)`` and maps a raw observation batch to ``(dist_inputs [B, num_outputs],
value [B])``. Use it by name after ``register_custom_model``, or name the class in a
config from the command line:

    python examples/custom_model.py
    python scripts/train.py --run PPO --env CartPole-v1 --stop '{"episode_reward_mean": 150}' \\
        --config '{"model": {"custom_model": "examples/custom_model.py:TrunkAndHeads",
                             "custom_model_config": {"trunk_size": 64}}}'
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flowrl import get_agent_class, register_custom_model


class TrunkAndHeads(nn.Module):
    """obs -> Linear(trunk_size) -> tanh -> {policy head, value head}.

    ``custom_model_config``: ``trunk_size`` (default 64).
    """

    def __init__(self, obs_space: gym.Space, action_space: gym.Space, num_outputs: int,
                 model_config: dict):
        super().__init__()
        size = int(model_config.get("custom_model_config", {}).get("trunk_size", 64))
        self.trunk = nn.Sequential(nn.Linear(int(np.prod(obs_space.shape)), size), nn.Tanh(),
                                   nn.Linear(size, size), nn.Tanh())
        self.policy_head = nn.Linear(size, num_outputs)
        self.value_head = nn.Linear(size, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(obs.float().flatten(1))
        return self.policy_head(features), self.value_head(features).squeeze(-1)


register_custom_model("trunk_and_heads", TrunkAndHeads)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop-reward", type=float, default=150.0)
    parser.add_argument("--max-iterations", type=int, default=40)
    args = parser.parse_args(argv)
    agent = get_agent_class("PPO")(env="CartPole-v1", config={
        "model": {"custom_model": "trunk_and_heads",
                  "custom_model_config": {"trunk_size": 64}}, "seed": 0})
    try:
        assert isinstance(agent.get_policy().model, TrunkAndHeads)
        for _ in range(args.max_iterations):
            result = agent.train()
            print(f"iter {result['training_iteration']}  reward "
                  f"{result['episode_reward_mean']:.1f}", flush=True)
            if result["episode_reward_mean"] >= args.stop_reward:
                break
        return result["episode_reward_mean"]
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
