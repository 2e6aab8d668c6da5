"""Piecewise-linear hyperparameter schedules (``lr_schedule``, ``entropy_coeff_schedule``).

A schedule is a list of ``[timestep, value]`` points with non-decreasing timesteps; the
value at a timestep is the linear interpolation between the points around it, the first
value before the first point and the last value after the last one::

    schedule = PiecewiseLinear([[0, 1e-3], [100_000, 1e-4]], "lr_schedule")
    schedule.value(50_000)    # 5.5e-4
    schedule.value(10**7)     # 1e-4

The timestep is the policy's ``global_timestep``: the sampled env steps, as the plans
send them with the weights (``{"timestep": num_steps_sampled}``).
"""

from __future__ import annotations

import bisect
from typing import Any

__all__ = ["PiecewiseLinear", "make_schedule"]


class PiecewiseLinear:
    """The schedule through ``points`` (see the module docstring); ``name`` is the config
    key, for error messages."""

    def __init__(self, points: Any, name: str) -> None:
        if not isinstance(points, (list, tuple)) or not points:
            raise ValueError(f"{name} must be a non-empty list of [timestep, value] pairs, "
                             f"e.g. [[0, 1e-3], [100000, 1e-4]]; got {points!r}")
        steps: list[int] = []
        values: list[float] = []
        for point in points:
            if not isinstance(point, (list, tuple)) or len(point) != 2:
                raise ValueError(f"{name}: each point must be [timestep, value], got {point!r}")
            step, value = point
            if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 0 \
                    or int(step) != step:
                raise ValueError(f"{name}: timestep {step!r} must be an integer >= 0")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: value {value!r} at timestep {step} must be a number")
            if steps and step < steps[-1]:
                raise ValueError(f"{name}: timesteps must not decrease ({steps[-1]} then {step})")
            steps.append(int(step))
            values.append(float(value))
        self.name = name
        self.steps = steps
        self.values = values

    def value(self, timestep: int) -> float:
        """The scheduled value at ``timestep``."""
        index = bisect.bisect_right(self.steps, timestep)
        if index == 0:
            return self.values[0]
        if index == len(self.steps):
            return self.values[-1]
        t0, t1 = self.steps[index - 1], self.steps[index]
        v0, v1 = self.values[index - 1], self.values[index]
        return v0 + (v1 - v0) * (timestep - t0) / (t1 - t0)

    def __repr__(self) -> str:
        return f"PiecewiseLinear({[list(p) for p in zip(self.steps, self.values)]})"


def make_schedule(points: Any, name: str) -> PiecewiseLinear | None:
    """The schedule for a config value: None when the key is unset (None)."""
    return None if points is None else PiecewiseLinear(points, name)
