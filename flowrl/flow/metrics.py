"""Explicit, thread-safe metrics for dataflow plans.

A plan (or the Agent) creates one :class:`Metrics` object and hands it to the
operators that need it. There is no global or thread-local "current metrics":
a learner thread updates the same object the driver loop reads.

Example::

    metrics = Metrics()
    rollouts = from_actors(workers, "Rollouts", metrics=metrics).gather_sync()

    def count_steps(batch):
        metrics.inc("num_steps_sampled", batch.count)
        return batch

    train_op = rollouts.for_each(count_steps).for_each(TrainOneStep(...))
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["Metrics", "TimerStat"]


class TimerStat:
    """Wall-clock timer with a sliding window of the last ``window_size`` samples.

    Use it as a context manager around the timed work, then report how many
    units (e.g. env steps) the block processed to get a throughput::

        timer = metrics.timer("sample")

        def sample(batch):
            with timer:
                out = expensive(batch)
            timer.push_units_processed(out.count)
            return out

        it = it.for_each(sample)
        ...
        timer.mean             # seconds per block (window mean)
        timer.mean_throughput  # units per second over the window

    Thread-safe: several threads may time blocks with the same timer.
    """

    def __init__(self, window_size: int = 100) -> None:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size!r}")
        self._lock = threading.Lock()
        self._samples: deque[float] = deque(maxlen=window_size)
        self._units: deque[float] = deque(maxlen=window_size)
        # Start times per thread, as a stack, so that concurrent or nested
        # uses of one timer do not overwrite each other's start time.
        self._starts: dict[int, list[float]] = {}
        self._count = 0

    def __enter__(self) -> "TimerStat":
        tid = threading.get_ident()
        with self._lock:
            self._starts.setdefault(tid, []).append(time.perf_counter())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        end = time.perf_counter()
        tid = threading.get_ident()
        with self._lock:
            stack = self._starts[tid]
            start = stack.pop()
            if not stack:
                del self._starts[tid]
        self.push(end - start)

    def push(self, seconds: float) -> None:
        """Record one timed sample (in seconds) without using ``with``."""
        with self._lock:
            self._samples.append(float(seconds))
            self._count += 1

    def push_units_processed(self, n: float) -> None:
        """Record how many units the most recent timed block processed."""
        with self._lock:
            self._units.append(float(n))

    @property
    def count(self) -> int:
        """Number of timed samples recorded so far (not limited to the window)."""
        return self._count

    @property
    def mean(self) -> float:
        """Mean seconds per sample over the window (0.0 before any sample)."""
        with self._lock:
            return sum(self._samples) / len(self._samples) if self._samples else 0.0

    @property
    def has_units_processed(self) -> bool:
        """Whether ``push_units_processed`` was ever called."""
        return bool(self._units)

    @property
    def mean_throughput(self) -> float:
        """Units per second over the window: sum(units) / sum(seconds)."""
        with self._lock:
            if not self._units or not self._samples:
                return 0.0
            # Align the two windows on their most recent entries.
            k = min(len(self._units), len(self._samples))
            secs = sum(list(self._samples)[-k:])
            units = sum(list(self._units)[-k:])
        return units / secs if secs > 0 else 0.0

    def __repr__(self) -> str:
        return f"TimerStat(count={self.count}, mean={self.mean:.6f}s)"


class Metrics:
    """Counters, timers and the latest learner info of one plan; thread-safe.

    Counters are monotonic ints by convention (``num_steps_sampled``,
    ``num_steps_trained``, ...). ``save()``/``restore()`` round-trip the
    counters through a JSON-able dict for checkpoints. Usage in a plan::

        metrics = Metrics()
        train_op = (rollouts
                    .for_each(lambda b: (metrics.inc("num_steps_sampled", b.count), b)[1])
                    .for_each(TrainOneStep(workers, metrics)))
        ...
        metrics.set_info("learner", {"default_policy": stats})
        result = {"info": {**metrics.counters_snapshot(), **metrics.info},
                  "timers": metrics.timers_snapshot()}
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._counters: dict[str, int] = {}
        self._timers: dict[str, TimerStat] = {}
        #: Latest learner stats and other free-form info, e.g. ``info["learner"]``.
        self.info: dict[str, Any] = {}

    # -- counters ---------------------------------------------------------
    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (created at 0)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def get(self, name: str, default: int = 0) -> int:
        """Current value of counter ``name``, or ``default`` if unset."""
        with self._lock:
            return self._counters.get(name, default)

    def set(self, name: str, value: int) -> None:
        """Set counter ``name`` to ``value`` (e.g. ``last_target_update_ts``)."""
        with self._lock:
            self._counters[name] = value

    def counters_snapshot(self) -> dict[str, int]:
        """A copy of all counters."""
        with self._lock:
            return dict(self._counters)

    # -- timers -----------------------------------------------------------
    def timer(self, name: str) -> TimerStat:
        """Get or create the timer ``name``."""
        with self._lock:
            t = self._timers.get(name)
            if t is None:
                t = self._timers[name] = TimerStat()
            return t

    def timers_snapshot(self) -> dict[str, float]:
        """``{"<name>_time_ms": mean ms, "<name>_throughput": units/s}`` per timer.

        The throughput key is present only for timers that had units reported
        (a throughput of 0 would be misleading otherwise).
        """
        with self._lock:
            timers = list(self._timers.items())
        out: dict[str, float] = {}
        for name, t in timers:
            out[f"{name}_time_ms"] = round(1000.0 * t.mean, 3)
            if t.has_units_processed:
                out[f"{name}_throughput"] = round(t.mean_throughput, 3)
        return out

    # -- info -------------------------------------------------------------
    def set_info(self, key: str, value: Any) -> None:
        """Set ``info[key]`` (e.g. ``"learner"`` -> per-policy stats)."""
        with self._lock:
            self.info[key] = value

    def update_info(self, key: str, value: dict) -> None:
        """Merge ``value`` into the dict ``info[key]``: per-policy learner stats from
        several training branches (e.g. PPO and DQN in one plan) all stay visible."""
        with self._lock:
            merged = dict(self.info.get(key) or {})
            merged.update(value)
            self.info[key] = merged

    # -- checkpointing ----------------------------------------------------
    def save(self) -> dict:
        """JSON-able state: ``{"counters": {...}}`` (timers and info are transient)."""
        with self._lock:
            return {"counters": {k: v for k, v in self._counters.items()}}

    def restore(self, state: dict) -> None:
        """Replace the counters with those of a ``save()`` result."""
        counters = state.get("counters", state) if isinstance(state, dict) else None
        if not isinstance(counters, dict):
            raise ValueError(f"Metrics.restore expects the dict from save(), got {state!r}")
        with self._lock:
            self._counters = {str(k): v for k, v in counters.items()}

    def __repr__(self) -> str:
        return f"Metrics(counters={self.counters_snapshot()!r})"
