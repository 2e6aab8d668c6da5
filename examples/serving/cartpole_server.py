"""Trains PPO or DQN on CartPole episodes that a separate client process plays.

    python examples/serving/cartpole_server.py --run DQN --port 9900
    python examples/serving/cartpole_client.py --port 9900          # another terminal

The server registers an env whose creator returns an ExternalEnv with a PolicyServer in
front of it; the agent trains on whatever episodes the clients play. It prints the
address it listens on, one progress line per iteration, and checkpoints every
``--checkpoint-freq`` iterations (and at the end) with ``agent.save``. It stops at
``--stop-reward`` (mean return of the last 100 episodes) or ``--stop-timesteps``;
the exit status is 0 only when the reward was reached.
"""

from __future__ import annotations

import argparse
import sys
import time

import gymnasium as gym

from flowrl.envs import EnvContext, register_env
from flowrl.envs.serving import ExternalEnv, PolicyServer
from flowrl import get_agent_class

# Settings that learn CartPole quickly in one process (DQN as in
# flowrl/tuned_examples/cartpole-dqn.yaml, with a shorter exploration phase).
CONFIGS = {
    "DQN": {
        "rollout_fragment_length": 4, "train_batch_size": 32, "lr": 1e-3, "n_step": 3,
        "target_network_update_freq": 500, "learning_starts": 1000, "buffer_size": 50000,
        "model": {"fcnet_hiddens": [64], "fcnet_activation": "relu"}, "hiddens": [64],
        "exploration_config": {"initial_epsilon": 1.0, "final_epsilon": 0.02,
                               "epsilon_timesteps": 5000},
        "timesteps_per_iteration": 1000,
    },
    "PPO": {
        "rollout_fragment_length": 200, "train_batch_size": 2000, "sgd_minibatch_size": 128,
        "num_sgd_iter": 10, "lr": 3e-4, "entropy_coeff": 0.0,
        "model": {"fcnet_hiddens": [64, 64]},
    },
}


class CartPoleServing(ExternalEnv):
    """CartPole's spaces, played by remote clients through a PolicyServer.

    Worker ``i`` listens on ``port + i`` (this example trains with ``num_workers=0``:
    only the local worker, on ``port``).
    """

    def __init__(self, ctx: EnvContext):
        spec_env = gym.make("CartPole-v1")
        super().__init__(spec_env.observation_space, spec_env.action_space)
        spec_env.close()
        port = ctx["port"] + ctx.worker_index if ctx["port"] else 0
        self.server = PolicyServer(self, address=ctx["address"], port=port,
                                   token=ctx.get("token")).start()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=sorted(CONFIGS), default="DQN")
    parser.add_argument("--address", default="127.0.0.1",
                        help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=9900, help="0 picks a free port")
    parser.add_argument("--token", default=None, help="shared secret clients must send")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="results and checkpoints go here (default: ~/ray_results/...)")
    parser.add_argument("--checkpoint-freq", type=int, default=10,
                        help="checkpoint every N iterations (0: only at the end)")
    parser.add_argument("--stop-reward", type=float, default=150.0)
    parser.add_argument("--stop-timesteps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    register_env("cartpole_serving", CartPoleServing)
    config = {**CONFIGS[args.run], "num_workers": 0, "seed": args.seed,
              "env_config": {"address": args.address, "port": args.port, "token": args.token}}
    agent = get_agent_class(args.run)(config=config, env="cartpole_serving",
                                      logdir=args.checkpoint_dir)
    server = agent.workers.local_worker().env.server
    print(f"PolicyServer listening on {server.url} ({args.run})", flush=True)
    start, reached, result, saved_at = time.time(), False, {}, None
    try:
        while True:
            result = agent.train()
            reward, steps = result["episode_reward_mean"], result["timesteps_total"]
            print(f"iter {agent.iteration:3d}  reward_mean {reward:7.2f}  timesteps {steps:6d}  "
                  f"episodes {result['episodes_total']:5d}  {time.time() - start:6.1f}s",
                  flush=True)
            if args.checkpoint_freq and agent.iteration % args.checkpoint_freq == 0:
                print(f"checkpoint {agent.save()}", flush=True)
                saved_at = agent.iteration
            if reward >= args.stop_reward:
                reached = True
                break
            if steps >= args.stop_timesteps:
                break
        if saved_at != agent.iteration:
            print(f"checkpoint {agent.save()}", flush=True)
    finally:
        agent.stop()  # closes the env and with it the server: clients see it go away
    outcome = "reached" if reached else "did not reach"
    print(f"{outcome} reward {args.stop_reward:g}: mean {result.get('episode_reward_mean')} "
          f"after {result.get('timesteps_total')} steps in {time.time() - start:.1f}s", flush=True)
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main())
