"""One Stable-Baselines3 run with SB3's default hyperparameters, for comparison with flowrl.

Run it with the interpreter of the benchmark venv that has SB3 installed (SB3 is not a
flowrl dependency); benchmarks/learning_suite.py calls it as a subprocess:

    /work/sb3venv/bin/python benchmarks/sb3_baseline.py --algo PPO --env CartPole-v1 \\
        --steps 100000 --seed 0

The model is built as ``ALGO("MlpPolicy", env, seed=seed)`` and nothing else is set, so
every hyperparameter is the SB3 default (one env, SB3's network sizes, learning rates,
batch sizes, ...). The env is wrapped in a Monitor, so every finished episode is recorded;
the last line printed is one JSON object:

    {"framework": "sb3", "algo": ..., "env": ..., "steps": ..., "seed": ...,
     "final_return": mean of the last 100 finished episodes, "episodes": ...,
     "wall_s": ..., "steps_per_s": ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

START = time.perf_counter()

import torch  # noqa: E402

torch.set_num_threads(1)

import gymnasium as gym  # noqa: E402
import stable_baselines3 as sb3  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402

ALGOS = {"PPO": sb3.PPO, "A2C": sb3.A2C, "DQN": sb3.DQN, "TD3": sb3.TD3, "SAC": sb3.SAC,
         "DDPG": sb3.DDPG}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", required=True, choices=sorted(ALGOS))
    parser.add_argument("--env", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env = Monitor(gym.make(args.env))
    model = ALGOS[args.algo]("MlpPolicy", env, seed=args.seed, verbose=0, device="cpu")
    train_start = time.perf_counter()
    model.learn(total_timesteps=args.steps)
    train_s = time.perf_counter() - train_start
    returns = env.get_episode_rewards()
    last = returns[-100:]
    print(json.dumps({
        "framework": "sb3", "algo": args.algo, "env": args.env, "steps": args.steps,
        "seed": args.seed, "timesteps": int(model.num_timesteps),
        "final_return": statistics.fmean(last) if last else None,
        "episodes": len(returns), "wall_s": round(time.perf_counter() - START, 1),
        "steps_per_s": round(model.num_timesteps / train_s, 1),
        "sb3_version": sb3.__version__}), flush=True)


if __name__ == "__main__":
    main()
