"""Learning bars shared by every ``@pytest.mark.learning`` test.

A learning test passes when at least 2 of 3 seeds reach its return within its step
budget, and each test states the typical steps measured for it: the budget may be at
most twice that, so a change that makes learning twice as slow fails.

Only step budgets count, never wall time, so a loaded machine is slower, not flakier.

Measuring the typical steps: ``FLOWRL_LEARNING_LOG=/tmp/bars.jsonl pytest -m learning``
runs all three seeds of every learning test, with four times each budget so that slow
seeds still give a number, and appends one JSON line per test to that file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import pytest

SEEDS = (0, 1, 2)
SEEDS_NEEDED = 2
MEASURE_BUDGET_FACTOR = 4


@dataclass
class SeedRun:
    """One seed's attempt: the steps at which the bar was first met (None: not met within
    the budget) and the last (steps, return) points, for the failure message."""

    seed: int
    steps: int | None
    history: list = field(default_factory=list)


def measuring() -> bool:
    """True when this run records every seed's steps instead of stopping at 2 of 3."""
    return bool(os.environ.get("FLOWRL_LEARNING_LOG"))


def two_of_three(run_seed: Callable[[int, int], SeedRun], *, budget: int, typical: int,
                 what: str, concurrent: bool = False) -> None:
    """Runs ``run_seed(seed, budget)`` for seeds 0, 1, 2 until 2 have passed (or 2 failed)
    and fails unless at least 2 reached the bar within ``budget`` steps.

    ``typical`` is the median steps measured for this test (see the module docstring);
    a budget of more than twice that is refused, so the bar keeps catching regressions.
    ``concurrent``: seeds 0 and 1 run at once in two fresh processes (one torch thread
    each), which halves the wall time of a test that trains in one process on the
    2-core machine; ``run_seed`` must then be picklable (a module-level function).
    """
    if budget > 2 * typical:
        raise ValueError(f"{what}: step budget {budget} is more than twice the typical "
                         f"{typical} steps; a bar this loose hides a 2x regression")
    log_path = os.environ.get("FLOWRL_LEARNING_LOG")
    run_budget = budget * MEASURE_BUDGET_FACTOR if log_path else budget
    runs: list[SeedRun] = []

    def record(run: SeedRun) -> None:
        runs.append(run)
        print(f"{what}: seed {run.seed}: "
              f"{'bar met at ' + str(run.steps) if run.steps is not None else 'not met'} "
              f"(budget {budget}, typical {typical})")

    def decided() -> bool:
        passed = sum(r.steps is not None and r.steps <= budget for r in runs)
        failed = len(runs) - passed
        return not log_path and (passed >= SEEDS_NEEDED
                                 or failed > len(SEEDS) - SEEDS_NEEDED)

    if concurrent:
        # spawn, not fork: the test process may hold Ray and torch threads.
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            first = [pool.submit(_one_thread, run_seed, seed, run_budget)
                     for seed in SEEDS[:SEEDS_NEEDED]]
            for future in first:
                record(future.result())
            if not decided():
                for seed in SEEDS[SEEDS_NEEDED:]:
                    record(pool.submit(_one_thread, run_seed, seed, run_budget).result())
    else:
        for seed in SEEDS:
            record(run_seed(seed, run_budget))
            if decided():
                break
    if log_path:
        with open(log_path, "a") as log:
            log.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", what),
                                  "what": what, "budget": budget, "typical": typical,
                                  "steps": [r.steps for r in runs]}) + "\n")
    passed = sum(r.steps is not None and r.steps <= budget for r in runs)
    if passed < SEEDS_NEEDED:
        details = [(r.seed, r.steps, r.history[-5:]) for r in runs]
        pytest.fail(f"{what}: {passed} of {len(runs)} seeds met the bar within {budget} "
                    f"steps ({SEEDS_NEEDED} needed): {details}")


def _one_thread(run_seed: Callable[[int, int], SeedRun], seed: int, budget: int) -> SeedRun:
    """``run_seed`` in a process of its own, on one torch thread (two seeds share 2 cores)."""
    import torch
    torch.set_num_threads(1)
    return run_seed(seed, budget)


def train_agent(algorithm: str, config: dict, threshold: float, env, seed: int,
                budget: int) -> SeedRun:
    """Trains ``algorithm`` until ``episode_reward_mean`` reaches ``threshold`` or
    ``timesteps_total`` reaches ``budget``."""
    from flowrl import get_agent_class
    agent = get_agent_class(algorithm)(config={**config, "seed": seed}, env=env,
                                       log_to_disk=False)
    history = []
    try:
        while True:
            result = agent.train()
            steps = result["timesteps_total"]
            history.append((steps, round(result["episode_reward_mean"], 1)))
            if result["episode_reward_mean"] >= threshold:
                return SeedRun(seed, steps, history)
            if steps >= budget:
                return SeedRun(seed, None, history)
    finally:
        agent.stop()


def agent_run(algorithm: str, config: dict, threshold: float, env="CartPole-v1",
              ) -> Callable[[int, int], SeedRun]:
    """A picklable ``run_seed`` for :func:`train_agent`."""
    return partial(train_agent, algorithm, config, threshold, env)


def runs_in_one_process(algorithm: str, config: dict) -> bool:
    """True when the agent trains without Ray actors (no rollout, evaluation or learner
    actors): its seeds can run side by side in two plain processes."""
    from flowrl import get_agent_class
    merged = get_agent_class(algorithm).merge_config(config)
    return not (merged["num_workers"] or merged["evaluation_num_workers"]
                or merged["num_learners"])


def assert_learns(algorithm: str, config: dict, threshold: float, budget: int, *,
                  typical: int, env="CartPole-v1", concurrent: bool | None = None) -> None:
    """2 of 3 seeds of ``algorithm`` reach ``threshold`` within ``budget`` env steps.

    ``concurrent`` (default: when the agent runs in one process) trains seeds 0 and 1
    in two fresh processes; an ``env`` named by id must then be registered by importing
    gymnasium and flowrl alone, and an env class must be importable from its module.
    """
    env_name = env if isinstance(env, str) else env.__name__
    if concurrent is None:
        concurrent = runs_in_one_process(algorithm, config)
    two_of_three(agent_run(algorithm, config, threshold, env), budget=budget,
                 typical=typical, what=f"{algorithm} on {env_name} to {threshold}",
                 concurrent=concurrent)
