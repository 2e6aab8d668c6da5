"""Trial files written by an Agent used outside Tune (Tune writes the same ones itself).

    <logdir>/params.json   the config
    <logdir>/result.json   one JSON line per train() call
    <logdir>/progress.csv  one row per train() call (flattened keys, "/" separated)
    <logdir>/events.out.tfevents.*   TensorBoard scalars (tensorboardX)
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os

from flowrl.checkpoint import json_default


def flatten_result(result: dict, prefix: str = "") -> dict:
    """``{"info": {"learner": {"kl": 0.1}}}`` -> ``{"info/learner/kl": 0.1}``."""
    flat = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_result(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


class ResultLogger:
    """Appends each result to result.json, progress.csv and a TensorBoard event file."""

    def __init__(self, logdir: str, config: dict):
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        with open(os.path.join(logdir, "params.json"), "w") as f:
            json.dump(config, f, indent=2, default=json_default, sort_keys=True)
        self._json = open(os.path.join(logdir, "result.json"), "a")
        self._csv_file = open(os.path.join(logdir, "progress.csv"), "a", newline="")
        self._csv = None
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir, flush_secs=30)

    def log(self, result: dict) -> None:
        self._json.write(json.dumps(result, default=json_default) + "\n")
        self._json.flush()
        flat = {k: v for k, v in flatten_result(result).items()
                if not isinstance(v, (list, tuple))}
        if self._csv is None:
            self._csv = csv.DictWriter(self._csv_file, fieldnames=list(flat),
                                       extrasaction="ignore")
            self._csv.writeheader()
        self._csv.writerow(flat)
        self._csv_file.flush()
        step = result.get("timesteps_total", result.get("training_iteration", 0))
        for key, value in flat.items():
            if isinstance(value, numbers.Number) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self._tb.add_scalar(f"ray/tune/{key}", value, global_step=step)
        self._tb.flush()

    def close(self) -> None:
        self._json.close()
        self._csv_file.close()
        self._tb.close()
