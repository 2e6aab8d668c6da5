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

from flowrl.algorithms.checkpoint import json_default


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


def scalar_items(result: dict) -> dict[str, float]:
    """The finite numeric entries of a result, flattened: what TensorBoard shows.

    Names are the result's own keys ("episode_reward_mean", "timesteps_total",
    "info/learner/default_policy/entropy", "timers/sampled_steps_per_s",
    "custom_metrics/<name>_mean", "evaluation/episode_reward_mean"), with no prefix.
    """
    scalars = {}
    for key, value in flatten_result(result).items():
        if key.startswith("config/") or key in ("pid", "timestamp"):
            continue
        if isinstance(value, numbers.Number) and not isinstance(value, bool) \
                and math.isfinite(value):
            scalars[key] = float(value)
    return scalars


class TensorBoardWriter:
    """Writes each result's scalars to a TensorBoard event file in ``logdir``.

    The x axis is ``timesteps_total`` (the training iteration when there is none).
    """

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(logdir, flush_secs=30)

    def write(self, result: dict) -> None:
        step = result.get("timesteps_total") or result.get("training_iteration", 0)
        for key, value in scalar_items(result).items():
            self._writer.add_scalar(key, value, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


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
        self._tb = TensorBoardWriter(logdir)

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
        self._tb.write(result)

    def close(self) -> None:
        self._json.close()
        self._csv_file.close()
        self._tb.close()


def progress_line(name: str, result: dict) -> str:
    """One readable line per iteration: what a user watches while training.

        PPO_CartPole-v1_00000  iter 12  ts 24,576  reward 187.3  eval 200.0
            3,150 sampled/s  3,150 trained/s  7.8 s
    """
    def number(key: str, fmt: str) -> str:
        value = result.get(key)
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
            else format(value, fmt)

    timers = result.get("timers", {})
    parts = [name, f"iter {result.get('training_iteration', '-')}",
             f"ts {number('timesteps_total', ',')}",
             f"reward {number('episode_reward_mean', '.1f')}"]
    evaluation = result.get("evaluation")
    if isinstance(evaluation, dict) and "episode_reward_mean" in evaluation:
        parts.append(f"eval {evaluation['episode_reward_mean']:.1f}")
    for key, label in (("sampled_steps_per_s", "sampled/s"),
                       ("trained_steps_per_s", "trained/s")):
        if key in timers:
            parts.append(f"{timers[key]:,.0f} {label}")
    parts.append(f"{number('time_total_s', '.1f')} s")
    return "  ".join(parts)
