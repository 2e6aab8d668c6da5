"""Plays CartPole-v1 with actions from a policy server (see cartpole_server.py).

    python examples/serving/cartpole_client.py --port 9900
    python examples/serving/cartpole_client.py --port 9900 --inference-mode local

``remote``: every step asks the server for the action. ``local``: the client keeps a
copy of the server's policy (weights refreshed every ``--update-interval`` seconds) and
ships its experience to the server. Runs ``--episodes`` episodes (0: until stopped),
or until the mean return of the last 20 episodes reaches ``--stop-reward``; exits
quietly when the server goes away.
"""

from __future__ import annotations

import argparse
import sys
import time

import gymnasium as gym
import numpy as np

from flowrl.envs.serving import PolicyClient, PolicyClientError


def connect(args: argparse.Namespace) -> PolicyClient:
    """A client, once the server answers (it may still be starting up)."""
    deadline = time.monotonic() + args.connect_timeout
    while True:
        try:
            client = PolicyClient(f"http://{args.address}:{args.port}", token=args.token,
                                  inference_mode=args.inference_mode,
                                  update_interval_s=args.update_interval)
            client.get_policy_spec()
            return client
        except PolicyClientError as error:
            if error.status is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9900)
    parser.add_argument("--token", default=None)
    parser.add_argument("--inference-mode", choices=["remote", "local"], default="remote")
    parser.add_argument("--update-interval", type=float, default=10.0,
                        help="local mode: seconds between weight refreshes")
    parser.add_argument("--episodes", type=int, default=0, help="0: play until stopped")
    parser.add_argument("--stop-reward", type=float, default=None)
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = gym.make("CartPole-v1")
    client = connect(args)
    returns: list[float] = []
    obs, _ = env.reset(seed=args.seed)
    try:
        while args.episodes == 0 or len(returns) < args.episodes:
            eid = client.start_episode()
            total = 0.0
            while True:
                action = client.get_action(eid, obs)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                client.log_returns(eid, reward)
                if terminated or truncated:
                    client.end_episode(eid, obs, truncated=truncated and not terminated)
                    break
            returns.append(total)
            obs, _ = env.reset()
            mean = float(np.mean(returns[-20:]))
            if len(returns) % 10 == 0:
                print(f"episode {len(returns):5d}  mean return (last 20) {mean:7.2f}", flush=True)
            if args.stop_reward is not None and len(returns) >= 20 and mean >= args.stop_reward:
                print(f"reached mean return {mean:.2f}", flush=True)
                break
    except PolicyClientError as error:
        if error.status not in (None, 503):  # 503 / no answer: the server shut down
            raise
        print(f"server went away after {len(returns)} episodes ({error.message})", flush=True)
    finally:
        client.close()
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
