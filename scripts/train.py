#!/usr/bin/env python
"""Train a flowrl agent: ``python scripts/train.py --run PPO --env CartPole-v1``.

See ``python scripts/train.py --help``.
"""

import sys

from flowrl.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
