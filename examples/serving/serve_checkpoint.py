"""Serves a trained checkpoint for inference only (no training) over HTTP.

    python examples/serving/serve_checkpoint.py ~/ray_results/.../checkpoint_000028 \
        --port 9900 --spaces-from CartPole-v1
    python examples/serving/cartpole_client.py --port 9900 --episodes 10

Actions are greedy unless ``--explore``. ``--spaces-from`` names a gymnasium env whose
observation and action spaces the policy was trained with; it is needed when the
checkpoint's own env cannot be built here (e.g. the ExternalEnv that
cartpole_server.py registers only in its own process). Stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time

import gymnasium as gym

from flowrl.serving import serve_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9900, help="0 picks a free port")
    parser.add_argument("--token", default=None)
    parser.add_argument("--explore", action="store_true", help="sample actions, not greedy")
    parser.add_argument("--spaces-from", default=None, metavar="GYM_ID",
                        help="take the spaces from this gymnasium env")
    args = parser.parse_args(argv)
    spaces = {}
    if args.spaces_from:
        env = gym.make(args.spaces_from)
        spaces = {"observation_space": env.observation_space, "action_space": env.action_space}
        env.close()
    server = serve_checkpoint(args.checkpoint, address=args.address, port=args.port,
                              token=args.token, explore=args.explore, **spaces)
    print(f"PolicyServer listening on {server.url} (inference only)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how this server is meant to stop; shut down below
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
