"""Raw Atari rates: the yardstick flowrl's Atari samplers are compared with.

    python benchmarks/atari_env_rate.py [--game Breakout] [--seconds 5]

Measured in one run, single env, one process, uniformly random actions:

* the raw ALE frame rate: ``ale.act`` on a ``frameskip=1`` env, no screen reads;
* the preprocessed step rate: ``wrap_deepmind`` (training mode) through the short-name
  creator, agent steps of 4 frames each, 84x84x4 uint8 observations;
* for reference, gymnasium's ``AtariPreprocessing`` + ``FrameStackObservation`` doing
  the same preprocessing (channels-first, no episodic life).

The three are measured in alternating slices, so that load from other processes
hits them alike and the ratios stay meaningful on a shared machine.

Other benchmarks import :func:`preprocessed_step_rate`.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import gymnasium as gym
import numpy as np


def _step_runner(env: gym.Env, seed: int = 0) -> Callable[[float], tuple[int, float]]:
    """``run(seconds) -> (agent steps, elapsed)`` for ``env`` under random actions."""
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, env.action_space.n, size=512).tolist()

    def run(seconds: float) -> tuple[int, float]:
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for a in actions:
                _, _, terminated, truncated, _ = env.step(a)
                if terminated or truncated:
                    env.reset()
            steps += len(actions)
        return steps, time.perf_counter() - start

    run(0.05)  # warm-up (first-call checks, caches)
    return run


def _raw_ale_runner(game: str) -> Callable[[float], tuple[int, float]]:
    """``run(seconds) -> (emulator frames, elapsed)`` of bare ``ale.act`` calls."""
    import ale_py

    import flowrl.envs.atari  # noqa: F401  (registers the ALE ids)

    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0)
    env.reset(seed=0)
    ale = env.unwrapped.ale
    action_set = [ale_py.Action.__members__[m] for m in env.unwrapped.get_action_meanings()]
    actions = [action_set[a] for a in
               np.random.default_rng(0).integers(0, len(action_set), size=2048)]

    def run(seconds: float) -> tuple[int, float]:
        frames, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for a in actions:
                ale.act(a)
                if ale.game_over():
                    ale.reset_game()
            frames += len(actions)
        return frames, time.perf_counter() - start

    return run


def _deepmind_env(game: str) -> gym.Env:
    from flowrl.envs.atari import resolve_short_name
    from flowrl.envs.registry import EnvContext

    creator = resolve_short_name(game)
    if creator is None:
        raise ValueError(f"{game!r} is not an Atari game name")
    return creator(EnvContext({"training": True}))


def _gymnasium_env(game: str) -> gym.Env:
    """gymnasium's AtariPreprocessing + FrameStackObservation(4), for reference."""
    import flowrl.envs.atari  # noqa: F401

    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
    return gym.wrappers.FrameStackObservation(env, 4)


def preprocessed_step_rate(game: str = "Breakout", seconds: float = 5.0) -> float:
    """Agent steps/s of one ``wrap_deepmind`` env (short name ``game``, training mode)."""
    env = _deepmind_env(game)
    try:
        steps, elapsed = _step_runner(env)(seconds)
        return steps / elapsed
    finally:
        env.close()


def raw_ale_frame_rate(game: str = "Breakout", seconds: float = 5.0) -> float:
    """Emulator frames/s of bare ``ale.act`` calls (no observations at all)."""
    frames, elapsed = _raw_ale_runner(game)(seconds)
    return frames / elapsed


def measure_interleaved(game: str = "Breakout", seconds: float = 5.0,
                        rounds: int = 5) -> dict[str, float]:
    """All three rates, measured in alternating slices so that they share machine load.

    Returns ``{"raw_frames": frames/s, "deepmind_steps": steps/s, "gymnasium_steps":
    steps/s}``; each rate gets ``seconds`` in total.
    """
    runners = {"raw_frames": _raw_ale_runner(game),
               "deepmind_steps": _step_runner(_deepmind_env(game)),
               "gymnasium_steps": _step_runner(_gymnasium_env(game))}
    return interleaved_rates(runners, seconds, rounds)


def interleaved_rates(runners: dict[str, Callable[[float], tuple[int, float]]],
                      seconds: float, rounds: int) -> dict[str, float]:
    """``{name: count / elapsed}`` of ``run(slice) -> (count, elapsed)`` runners, each
    given ``seconds`` in total, in ``rounds`` alternating slices (shared load hits all)."""
    totals = {name: [0, 0.0] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            count, elapsed = run(seconds / rounds)
            totals[name][0] += count
            totals[name][1] += elapsed
    return {name: count / elapsed for name, (count, elapsed) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measuring time per rate (default 5)")
    args = parser.parse_args()

    rates = measure_interleaved(args.game, args.seconds)
    frames, steps, reference = (rates["raw_frames"], rates["deepmind_steps"],
                                rates["gymnasium_steps"])
    print(f"{args.game}, one env, random actions, {args.seconds:g} s each "
          "(interleaved in 5 slices)")
    print(f"  raw ALE frame rate             {frames:10.0f} frames/s "
          f"(= {frames / 4:.0f} agent steps/s at 4 frames/step)")
    print(f"  wrap_deepmind step rate        {steps:10.0f} steps/s  "
          f"({steps * 4:.0f} frames/s, {steps * 4 / frames:.0%} of raw)")
    print(f"  gymnasium AtariPreprocessing   {reference:10.0f} steps/s  "
          f"(wrap_deepmind is {steps / reference:.2f}x)")


if __name__ == "__main__":
    main()
