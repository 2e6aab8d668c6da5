"""Learning suite: final mean return of each (algorithm, env) row at a fixed step budget.

    python benchmarks/learning_suite.py                              # every row, flowrl
    python benchmarks/learning_suite.py --rows PPO:CartPole --seeds 3
    python benchmarks/learning_suite.py --rows PPO:LunarLander,DQN:CartPole --framework both
    python benchmarks/learning_suite.py --framework sb3 --out sb3_results.md
    python benchmarks/learning_suite.py --rows PPO:CartPole-v1 --budget 20000  # quick check
    python benchmarks/learning_suite.py --list                       # the rows, nothing run
    python benchmarks/learning_suite.py --report-only --framework both --out table.md

Each row is (algorithm, env, config, budget). A row whose config is ``None`` runs the
algorithm's DEFAULT config (exactly what ``train.py --run ALGO --env ENV`` with no
``--config`` trains): those rows check that the defaults learn. A row may instead name
a tuned YAML under flowrl/tuned_examples (its ``config`` section is used, its ``stop``
is not) or give a dict of overrides.

Every seed runs in a fresh Python process, one at a time. The result of a run is the
``episode_reward_mean`` (mean of the last 100 finished episodes) of the first training
result at or past the budget, and its wall time counts start-up (imports, Ray, actors).

``--framework sb3`` runs Stable-Baselines3 instead (``both``: flowrl, then SB3), with
SB3's own default hyperparameters at the same budgets, through benchmarks/sb3_baseline.py and the
interpreter given by ``--sb3-python`` (a separate venv: SB3 is no flowrl dependency).
flowrl algorithms map onto SB3 ones by ``SB3_ALGO``; rows that map onto the same
(SB3 algorithm, env, budget) share one SB3 run.

Each finished run is printed and appended to ``--results`` (JSON lines), so partial
results survive an interrupted suite; ``--resume`` skips runs already recorded there.
At the end (or with ``--report-only``) a Markdown table of every selected row that has
results is printed and, with ``--out``, written to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNED = os.path.join("flowrl", "tuned_examples")
DEFAULT_RESULTS = os.path.join("benchmarks", "results", "learning_suite.jsonl")
DEFAULT_SB3_PYTHON = "/work/sb3venv/bin/python"


@dataclass(frozen=True)
class Row:
    algo: str
    env: str
    budget: int
    # None: the algorithm's default config; str: a tuned YAML (path from the repo root);
    # dict: overrides of the default config.
    config: Any = None
    note: str = field(default="", compare=False)

    @property
    def config_label(self) -> str:
        if self.config is None:
            return "default"
        if isinstance(self.config, str):
            return os.path.basename(self.config)
        return json.dumps(self.config, sort_keys=True)

    @property
    def name(self) -> str:
        """``ALGO:ENV`` for default-config rows, ``ALGO:ENV:tuned-file`` otherwise."""
        if self.config is None:
            return f"{self.algo}:{self.env}"
        if isinstance(self.config, str):
            return f"{self.algo}:{self.env}:{os.path.splitext(os.path.basename(self.config))[0]}"
        return f"{self.algo}:{self.env}:custom"


# SB3 algorithm used as the reference for each flowrl algorithm (SB3 defaults).
# PG has no SB3 counterpart: A2C with its defaults (5-step returns, a value baseline) is
# the nearest. IMPALA is an actor-critic policy gradient with V-trace corrections and no
# clipped surrogate or extra epochs, so A2C is the nearer SB3 algorithm (not PPO).
# flowrl's DDPG defaults are TD3 (twin Q, delayed actor, target smoothing), so TD3.
SB3_ALGO = {"PPO": "PPO", "A2C": "A2C", "PG": "A2C", "IMPALA": "A2C", "DQN": "DQN",
            "APEX": "DQN", "DDPG": "TD3", "APEX_DDPG": "TD3"}

# Budgets (environment steps per run), sized for 2 shared CPU cores; see docs/LEARNING.md.
DISCRETE = {"CartPole-v1": 100_000, "MountainCar-v0": 300_000, "LunarLander-v3": 300_000}
CONTINUOUS_ON_POLICY = {"Pendulum-v1": 100_000, "MountainCarContinuous-v0": 100_000,
                        "HalfCheetah-v5": 200_000, "Hopper-v5": 200_000}
CONTINUOUS_OFF_POLICY = {"Pendulum-v1": 50_000, "MountainCarContinuous-v0": 30_000,
                         "HalfCheetah-v5": 50_000, "Hopper-v5": 50_000}


def _rows() -> list[Row]:
    rows = []
    for env, budget in DISCRETE.items():
        for algo in ("PG", "A2C", "PPO", "DQN", "APEX", "IMPALA"):
            rows.append(Row(algo, env, budget))
    for env in CONTINUOUS_ON_POLICY:
        rows.append(Row("PPO", env, CONTINUOUS_ON_POLICY[env]))
        for algo in ("DDPG", "APEX_DDPG"):
            rows.append(Row(algo, env, CONTINUOUS_OFF_POLICY[env]))
    # The tuned examples at the same budgets, beside the defaults.
    for algo in ("PG", "A2C", "PPO", "DQN", "APEX", "IMPALA"):
        name = {"APEX": "apex"}.get(algo, algo.lower())
        rows.append(Row(algo, "CartPole-v1", DISCRETE["CartPole-v1"],
                        os.path.join(TUNED, f"cartpole-{name}.yaml")))
    rows.append(Row("DDPG", "Pendulum-v1", CONTINUOUS_OFF_POLICY["Pendulum-v1"],
                    os.path.join(TUNED, "pendulum-ddpg.yaml")))
    rows.append(Row("APEX_DDPG", "Pendulum-v1", CONTINUOUS_OFF_POLICY["Pendulum-v1"],
                    os.path.join(TUNED, "pendulum-apex-ddpg.yaml")))
    return rows


SB3_ALGO["SAC"] = "SAC"


def _sac_rows() -> list[Row]:
    """SAC (default config and tuned examples) at the off-policy budgets, beside SB3's SAC."""
    rows = [Row("SAC", env, CONTINUOUS_OFF_POLICY[env]) for env in ("Pendulum-v1",
                                                                    "HalfCheetah-v5")]
    for env, name in (("Pendulum-v1", "pendulum-sac.yaml"),
                      ("HalfCheetah-v5", "halfcheetah-sac.yaml")):
        rows.append(Row("SAC", env, CONTINUOUS_OFF_POLICY[env], os.path.join(TUNED, name)))
    return rows


ROWS: list[Row] = _rows() + _sac_rows()


# -- flowrl runs ------------------------------------------------------------------------
FLOWRL_CHILD = r"""
import json, math, sys, time
start = time.perf_counter()
import torch
torch.set_num_threads(1)
import flowrl
algo, env, budget, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = json.loads(sys.argv[5])
config["seed"] = seed
cls = flowrl.get_agent_class(algo)
if cls.merge_config({**config, "env": env})["num_workers"] > 0:
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
agent = cls(config=config, env=env, log_to_disk=False)
while True:
    r = agent.train()
    if r["timesteps_total"] >= budget:
        break
ret = r.get("episode_reward_mean")
ret = None if ret is None or math.isnan(ret) else float(ret)
print(json.dumps({"final_return": ret, "timesteps": int(r["timesteps_total"]),
                  "episodes": r.get("episodes_total"), "iterations": r.get("training_iteration"),
                  "wall_s": round(time.perf_counter() - start, 1),
                  "time_total_s": round(r.get("time_total_s", float("nan")), 1)}))
agent.stop()
"""


def row_config(row: Row) -> dict:
    """The config the run gets: {} for the default, a tuned YAML's config section, or
    the row's dict."""
    if row.config is None:
        return {}
    if isinstance(row.config, dict):
        return dict(row.config)
    import yaml
    with open(os.path.join(ROOT, row.config)) as f:
        spec = next(iter(yaml.safe_load(f).values()))
    if spec["run"] != row.algo or spec["env"] != row.env:
        raise ValueError(f"{row.config} runs {spec['run']} on {spec['env']}, not "
                         f"{row.algo} on {row.env}")
    return dict(spec.get("config", {}))


def _child_env() -> dict:
    env = dict(os.environ)
    # One thread per process for numpy/torch, in Ray workers too (they inherit this).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def _run_child(cmd: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_child_env(),
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s",
                "wall_s": round(time.perf_counter() - start, 1)}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {out.returncode}: {out.stderr[-3000:]}",
                "wall_s": round(time.perf_counter() - start, 1)}
    try:
        return {"ok": True, **json.loads(lines[-1])}
    except json.JSONDecodeError:
        return {"ok": False, "error": f"unreadable output: {lines[-1][:500]}",
                "wall_s": round(time.perf_counter() - start, 1)}


def run_flowrl(row: Row, seed: int, timeout: float) -> dict:
    cmd = [sys.executable, "-c", FLOWRL_CHILD, row.algo, row.env, str(row.budget),
           str(seed), json.dumps(row_config(row))]
    return {"framework": "flowrl", "key": row.name, "algo": row.algo, "env": row.env,
            "config": row.config_label, "budget": row.budget, "seed": seed,
            **_run_child(cmd, timeout)}


# -- SB3 runs ---------------------------------------------------------------------------
def sb3_key(row: Row) -> str:
    return f"{SB3_ALGO[row.algo]}:{row.env}@{row.budget}"


def sb3_groups(rows: list[Row]) -> dict[str, list[Row]]:
    """One SB3 run per (SB3 algorithm, env, budget), with the rows it stands beside."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(sb3_key(row), []).append(row)
    return groups


def run_sb3(key: str, seed: int, sb3_python: str, timeout: float) -> dict:
    algo, rest = key.split(":", 1)
    env, budget = rest.rsplit("@", 1)
    cmd = [sb3_python, os.path.join(ROOT, "benchmarks", "sb3_baseline.py"), "--algo", algo,
           "--env", env, "--steps", budget, "--seed", str(seed)]
    result = _run_child(cmd, timeout)
    result.pop("framework", None)
    result.pop("steps", None)
    result.pop("algo", None)
    result.pop("env", None)
    result.pop("seed", None)
    return {"framework": "sb3", "key": key, "algo": algo, "env": env, "config": "SB3 defaults",
            "budget": int(budget), "seed": seed, **result}


# -- results ----------------------------------------------------------------------------
def load_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_result(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.1f}"


def _summary(records: list[dict]) -> tuple[str, str, str, str]:
    """(seeds, mean ± std, per-seed returns, mean wall time) of one row's records."""
    ok = [r for r in records if r.get("ok")]
    rets = [r["final_return"] for r in ok if r.get("final_return") is not None]
    if not rets:
        mean = "n/a"
    elif len(rets) == 1:
        mean = _fmt(rets[0])
    else:
        mean = f"{statistics.fmean(rets):.1f} ± {statistics.stdev(rets):.1f}"
    per_seed = ", ".join(
        f"{_fmt(r.get('final_return'))}" if r.get("ok") else "failed"
        for r in sorted(records, key=lambda r: r["seed"]))
    walls = [r["wall_s"] for r in ok if r.get("wall_s") is not None]
    wall = f"{statistics.fmean(walls):.0f}" if walls else "n/a"
    seeds = f"{len(ok)}" + (f" (+{len(records) - len(ok)} failed)" if len(ok) < len(records) else "")
    return seeds, mean, per_seed, wall


def _latest(records: list[dict]) -> list[dict]:
    """The last record of each (framework, key, seed)."""
    last: dict[tuple, dict] = {}
    for r in records:
        last[(r["framework"], r["key"], r["seed"])] = r
    return list(last.values())


def side_by_side(rows: list[Row], records: list[dict]) -> list[str]:
    """One line per row that has both results: flowrl's and its SB3 counterpart's."""
    out = ["| Row | Config | Budget (steps) | flowrl | SB3 (defaults) | SB3 algo |",
           "|---|---|---:|---:|---:|---|"]
    for row in rows:
        mine = [r for r in records if r["framework"] == "flowrl" and r["key"] == row.name
                and r["budget"] == row.budget]
        theirs = [r for r in records if r["framework"] == "sb3" and r["key"] == sb3_key(row)]
        if mine and theirs:
            out.append(f"| {row.algo} {row.env} | {row.config_label} | {row.budget:,} | "
                       f"{_summary(mine)[1]} | {_summary(theirs)[1]} | {theirs[0]['algo']} |")
    return out + [""]


def markdown(rows: list[Row], records: list[dict], frameworks: list[str]) -> str:
    records = _latest(records)
    out = side_by_side(rows, records) if len(frameworks) == 2 else []
    if "flowrl" in frameworks:
        out += ["| Row | Config | Budget (steps) | Seeds | Final return (mean ± std) | "
                "Per seed | Wall s (mean) |", "|---|---|---:|---:|---:|---|---:|"]
        for row in rows:
            mine = [r for r in records if r["framework"] == "flowrl" and r["key"] == row.name
                    and r["budget"] == row.budget]
            if mine:
                seeds, mean, per_seed, wall = _summary(mine)
                out.append(f"| {row.algo} {row.env} | {row.config_label} | {row.budget:,} | "
                           f"{seeds} | {mean} | {per_seed} | {wall} |")
        out.append("")
    if "sb3" in frameworks:
        out += ["| SB3 algo (defaults) | Env | Budget (steps) | Stands beside | Seeds | "
                "Final return (mean ± std) | Per seed | Wall s (mean) |",
                "|---|---|---:|---|---:|---:|---|---:|"]
        for key, group in sb3_groups(rows).items():
            mine = [r for r in records if r["framework"] == "sb3" and r["key"] == key]
            if mine:
                seeds, mean, per_seed, wall = _summary(mine)
                beside = ", ".join(sorted({r.algo for r in group}))
                out.append(f"| {mine[0]['algo']} | {mine[0]['env']} | {mine[0]['budget']:,} | "
                           f"{beside} | {seeds} | {mean} | {per_seed} | {wall} |")
        out.append("")
    return "\n".join(out)


def select(rows: list[Row], patterns: list[str]) -> list[Row]:
    if not patterns:
        return list(rows)
    def matches(row: Row, pattern: str) -> bool:
        # A pattern that is a row's full name picks that row alone (PPO:CartPole-v1 is
        # the default-config row, not also PPO:CartPole-v1:cartpole-ppo).
        exact = any(pattern.lower() == r.name.lower() for r in rows)
        return (pattern.lower() == row.name.lower() if exact
                else pattern.lower() in row.name.lower())
    chosen = [r for r in rows if any(matches(r, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"no row matches {patterns}; --list shows the rows")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", action="append", default=[], metavar="PATTERN[,PATTERN]",
                        help="run rows whose name (ALGO:ENV[:tuned-file]) contains one of "
                             "these substrings, case-insensitive (e.g. --rows PPO:LunarLander); "
                             "a row's full name picks that row alone; repeatable; "
                             "default: all rows")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row (default 1)")
    parser.add_argument("--framework", choices=("flowrl", "sb3", "both"), default="flowrl")
    parser.add_argument("--out", metavar="FILE.md", help="write the Markdown table here")
    parser.add_argument("--results", default=os.path.join(ROOT, DEFAULT_RESULTS),
                        help="JSON-lines file each finished run is appended to "
                             f"(default {DEFAULT_RESULTS})")
    parser.add_argument("--resume", action="store_true",
                        help="skip (row, seed) runs already recorded as ok in --results")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; build the table from --results")
    parser.add_argument("--list", action="store_true", help="print the selected rows and exit")
    parser.add_argument("--sb3-python", default=DEFAULT_SB3_PYTHON,
                        help=f"interpreter with stable-baselines3 (default {DEFAULT_SB3_PYTHON})")
    parser.add_argument("--budget", type=int, metavar="STEPS",
                        help="replace the budget of every selected row (quick checks; "
                             "e.g. --rows PPO:CartPole-v1 --budget 20000)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds before one run is killed (default 3600)")
    args = parser.parse_args()

    patterns = [p.strip() for arg in args.rows for p in arg.split(",") if p.strip()]
    rows = select(ROWS, patterns)
    if args.budget:
        rows = [dataclasses.replace(row, budget=args.budget) for row in rows]
    frameworks = ["flowrl", "sb3"] if args.framework == "both" else [args.framework]

    if args.list:
        for row in rows:
            print(f"{row.name:45s} {row.budget:>8,} steps  config: {row.config_label}  "
                  f"SB3: {sb3_key(row)}")
        return

    if not args.report_only:
        done = {(r["framework"], r["key"], r["seed"]) for r in load_results(args.results)
                if r.get("ok")} if args.resume else set()
        jobs: list[tuple[str, Any]] = []
        if "flowrl" in frameworks:
            jobs += [("flowrl", row) for row in rows]
        if "sb3" in frameworks:
            jobs += [("sb3", key) for key in sb3_groups(rows)]
        print(f"{len(jobs)} runs x {args.seeds} seed(s), one process at a time "
              f"({os.cpu_count()} cores); results -> {args.results}", flush=True)
        for framework, job in jobs:
            for seed in range(args.seeds):
                key = job.name if framework == "flowrl" else job
                if (framework, key, seed) in done:
                    print(f"  [{framework}] {key} seed {seed}: already recorded, skipped")
                    continue
                if framework == "flowrl":
                    record = run_flowrl(job, seed, args.timeout)
                else:
                    record = run_sb3(job, seed, args.sb3_python, args.timeout)
                record["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
                append_result(args.results, record)
                if record["ok"]:
                    print(f"  [{framework}] {key} seed {seed}: final return "
                          f"{_fmt(record.get('final_return'))}  wall {record['wall_s']:.1f} s  "
                          f"({record.get('timesteps')} steps, {record.get('episodes')} "
                          f"episodes)", flush=True)
                else:
                    print(f"  [{framework}] {key} seed {seed}: FAILED after "
                          f"{record['wall_s']:.1f} s: {record['error'][-1500:]}", flush=True)

    table = markdown(rows, load_results(args.results), frameworks)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
