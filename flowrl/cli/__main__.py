"""``python -m flowrl.cli train ...`` (same as the ``flowrl`` command)."""

import sys

from flowrl.cli import main

sys.exit(main())
