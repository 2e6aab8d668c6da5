"""Command line: ``flowrl train ...`` and ``flowrl rollout ...``.

    flowrl train --run PPO --env CartPole-v1 --stop '{"episode_reward_mean": 150}'
    flowrl rollout ~/ray_results/.../checkpoint_000010 --episodes 5

``scripts/train.py`` and ``scripts/rollout.py`` are thin wrappers over
:func:`~flowrl.cli.train.train_main` and :func:`~flowrl.cli.rollout.rollout_main`.
"""

from __future__ import annotations

import sys

from flowrl.cli.rollout import rollout_main
from flowrl.cli.train import make_train_parser, train_main

__all__ = ["main", "make_train_parser", "rollout_main", "train_main"]

COMMANDS = {"train": train_main, "rollout": rollout_main}


def main(argv: list[str] | None = None) -> int:
    """``flowrl train ...`` / ``flowrl rollout ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: flowrl {train,rollout} [options]   (flowrl train --help, "
              "flowrl rollout --help for the options)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"flowrl: unknown command {command!r}; expected one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)
