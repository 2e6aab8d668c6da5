#!/usr/bin/env python
"""Run a trained policy: ``python scripts/rollout.py CHECKPOINT --episodes 5``.

See ``python scripts/rollout.py --help``.
"""

import sys

from flowrl.cli import rollout_main

if __name__ == "__main__":
    sys.exit(rollout_main())
