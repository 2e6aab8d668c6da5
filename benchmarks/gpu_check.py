"""GPU check: APEX on Breakout with a GPU learner, and learner step times on CPU and GPU.

    python benchmarks/gpu_check.py [--out DIR]     # full check, about 8 minutes
    python benchmarks/gpu_check.py --smoke         # about a minute on CPU (test suite)

Sized for one machine with 16 CPU cores and one NVIDIA GPU (issue 16, part 4). In one
run, in this order (each phase is timed against one wall-clock budget, ``--budget-s``,
and shortened or skipped when the budget runs out; results are written after every
phase and every APEX iteration, so a run cut short still leaves its figures):

1. **Learner step time** of PPO and DQN on the Atari CNN (the Nature conv net of the
   catalog, 84x84x4 uint8 frames, 4 actions), on the CPU (all cores, torch threads =
   ``--cpu-threads``) and on the GPU: ``policy.learn_on_batch`` on one synthetic batch
   of ``--learner-batch`` rows (default 4096), host-to-device copy and the stats'
   transfer back included. PPO makes one SGD pass with minibatch ``--ppo-minibatch``
   (default: the whole batch); DQN is the APEX Breakout configuration (double-Q,
   dueling, 3-step, prioritized-replay weights). A few warm-up steps, then the median
   of several timed steps (at most ``--learner-cell-s`` seconds of timed steps per
   cell, at least 3 steps).
2. **APEX on Breakout with the GPU learner** (``num_gpus=1``): ``--num-workers`` rollout
   workers (default 14, 1 CPU each) x ``--num-envs-per-worker`` envs (default 16), the
   settings of ``flowrl/tuned_examples/breakout-apex.yaml`` otherwise, for
   ``--apex-seconds``. Every iteration (``--iter-seconds`` long) prints and records
   sampled agent steps/s (x4 = frames/s), trained rows/s (rows the learner consumed)
   and the game return (``episode_reward_mean``: unclipped whole-game scores of the
   least-exploring third of the workers).
3. **The same with the workers acting on the GPU too**: each worker gets
   ``--worker-gpu-share`` of the GPU (``num_gpus_per_worker``, default 0.04) and the
   learner the rest, for ``--gpu-workers-seconds`` (0 skips it): the workers' batched
   CNN forward moves off their CPU core.
4. **The same APEX run with the CPU-only learner** (``num_gpus=0``; the driver's
   learner thread then has ``num_cpus_for_driver`` = 1 torch thread, as a user gets it)
   for ``--cpu-learner-seconds`` (0 skips it), so that GPU figures stand beside CPU-only
   ones measured on the same machine.

Outputs, under ``--out`` (default ``$OUT`` when set, else ``./gpu_check_out``):
``gpu_check.json`` (every figure, the per-iteration series, versions, the machine) and
``gpu_check.md`` (Markdown tables ready for docs/BENCHMARKS.md, also printed at the end).

Without a CUDA device the script says "no CUDA device", skips the GPU timings, and runs
the APEX phase with the CPU learner only (labelled so). ``--smoke`` runs the whole path
in about a minute on CPU: 2 workers, a small replay buffer, a 64-row learner batch.

Exit status: 0 when every phase that ran succeeded, 1 when one raised (its traceback is
in the JSON under ``errors``; the other phases still run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

FRAMES_PER_STEP = 4  # wrap_deepmind's frame skip: one agent step = 4 emulator frames
OBS_SHAPE = (84, 84, 4)
NUM_ACTIONS = 4  # Breakout's minimal action set


# ----------------------------------------------------------------------------- output
class Report:
    """The JSON document, rewritten atomically after every change of substance."""

    def __init__(self, out_dir: str, meta: dict):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "gpu_check.json")
        self.data: dict[str, Any] = {"meta": meta, "learner_timing": [], "apex": [],
                                     "errors": [], "skipped": []}
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=_json_default, allow_nan=True)
        os.replace(tmp, self.path)

    def error(self, phase: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception(exc))
        print(f"[gpu_check] {phase} FAILED:\n{text}", file=sys.stderr, flush=True)
        self.data["errors"].append({"phase": phase, "error": repr(exc), "traceback": text})
        self.save()

    def skip(self, phase: str, why: str) -> None:
        print(f"[gpu_check] {phase} skipped: {why}", flush=True)
        self.data["skipped"].append({"phase": phase, "why": why})
        self.save()


def _json_default(value: Any) -> Any:
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001 - a missing or broken package is a fact to report
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # no /proc (not Linux): fall back to what platform says
    return platform.processor() or None


def _git_commit() -> str | None:
    import subprocess
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def machine_info(args: argparse.Namespace) -> dict:
    import torch
    cuda = torch.cuda.is_available()
    info = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": (round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                           if cuda else None),
        "cuda_version": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "gymnasium": _version("gymnasium"),
        "ale_py": _version("ale_py"),
        "numpy": _version("numpy"),
        "flowrl_commit": _git_commit(),
    }
    try:
        import shutil
        info["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    except OSError:
        info["dev_shm_gib"] = None
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = None
    return info


# ----------------------------------------------------------------------- (1) learner
def _tuned_config(name: str) -> dict:
    import yaml
    path = os.path.join(REPO, "flowrl", "tuned_examples", f"{name}.yaml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    return dict(next(iter(doc.values()))["config"])


def make_policy(algo: str, device: str, args: argparse.Namespace):
    """A PPO or DQN policy with the Breakout tuned example's settings, on ``device``."""
    import gymnasium as gym
    import numpy as np
    obs_space = gym.spaces.Box(0, 255, OBS_SHAPE, np.uint8)
    act_space = gym.spaces.Discrete(NUM_ACTIONS)
    resources = {"num_gpus": 1 if device == "cuda" else 0, "num_workers": 0,
                 "num_cpus_per_worker": 1, "seed": 0}
    if algo == "PPO":
        from flowrl.plans.ppo import PPOAgent
        from flowrl.policies.ppo import PPOTorchPolicy
        config = PPOAgent.merge_config({**_tuned_config("breakout-ppo"), **resources})
        return PPOTorchPolicy(obs_space, act_space, config)
    from flowrl.plans.apex import ApexAgent
    from flowrl.policies.dqn import DQNTorchPolicy
    config = ApexAgent.merge_config({**_tuned_config("breakout-apex"), **resources,
                                     "num_workers": 1, "num_replay_buffer_shards": 1})
    return DQNTorchPolicy(obs_space, act_space, config)


def synthetic_batch(algo: str, rows: int, seed: int = 0):
    """Random 84x84x4 uint8 frames and plausible loss columns for ``algo``."""
    import numpy as np

    from flowrl.data import SampleBatch
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, size=(rows, *OBS_SHAPE), dtype=np.uint8)
    actions = rng.integers(0, NUM_ACTIONS, size=rows).astype(np.int64)
    if algo == "PPO":
        logits = rng.normal(size=(rows, NUM_ACTIONS)).astype(np.float32)
        logp_all = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return SampleBatch({
            SampleBatch.OBS: obs,
            SampleBatch.ACTIONS: actions,
            SampleBatch.ADVANTAGES: rng.normal(size=rows).astype(np.float32),
            SampleBatch.ACTION_LOGP: logp_all[np.arange(rows), actions].astype(np.float32),
            SampleBatch.ACTION_DIST_INPUTS: logits,
            SampleBatch.VALUE_TARGETS: rng.normal(size=rows).astype(np.float32),
            SampleBatch.VF_PREDS: rng.normal(size=rows).astype(np.float32),
        })
    return SampleBatch({
        SampleBatch.OBS: obs,
        SampleBatch.NEW_OBS: rng.integers(0, 256, size=(rows, *OBS_SHAPE), dtype=np.uint8),
        SampleBatch.ACTIONS: actions,
        SampleBatch.REWARDS: rng.choice([0.0, 1.0], size=rows, p=[0.9, 0.1]).astype(np.float32),
        SampleBatch.TERMINATEDS: rng.random(rows) < 0.01,
        SampleBatch.WEIGHTS: rng.uniform(0.2, 1.0, size=rows).astype(np.float32),
    })


def time_learner(algo: str, device: str, batch, args: argparse.Namespace) -> dict:
    import torch
    policy = make_policy(algo, device, args)
    kwargs = {}
    if algo == "PPO":
        minibatch = args.ppo_minibatch or batch.count
        kwargs = {"num_sgd_iter": 1, "sgd_minibatch_size": minibatch}

    def step() -> float:
        start = time.perf_counter()
        policy.learn_on_batch(batch, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warmup = [step() for _ in range(args.learner_warmup if device == "cpu"
                                    else max(args.learner_warmup, 3))]
    times: list[float] = []
    budget_end = time.perf_counter() + args.learner_cell_s
    while len(times) < args.learner_steps and (len(times) < 3
                                               or time.perf_counter() < budget_end):
        times.append(step())
    median = statistics.median(times)
    cell = {
        "algo": algo, "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "batch": batch.count,
        "sgd": (f"1 SGD pass, minibatch {kwargs['sgd_minibatch_size']}" if algo == "PPO"
                else "one SGD step; double-Q, dueling, 3-step, PER weights"),
        "warmup_s": warmup, "steps_s": times,
        "median_s": median, "min_s": min(times), "rows_per_s": batch.count / median,
    }
    if device == "cuda":
        cell["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return cell


def learner_phase(report: Report, args: argparse.Namespace, cuda: bool,
                  deadline: float) -> None:
    import torch
    saved_threads = torch.get_num_threads()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    if not cuda:
        report.skip("learner_timing_gpu", "no CUDA device")
    try:
        for algo in ("PPO", "DQN"):
            batch = synthetic_batch(algo, args.learner_batch)
            for device in devices:
                phase = f"learner_timing_{algo}_{device}"
                if time.perf_counter() > deadline:
                    report.skip(phase, "wall-clock budget spent")
                    continue
                if device == "cpu":
                    torch.set_num_threads(args.cpu_threads)
                log(f"learner {algo} on {device}: timing batch {batch.count} ...")
                try:
                    cell = time_learner(algo, device, batch, args)
                except Exception as e:  # noqa: BLE001 - record, go on with the others
                    report.error(phase, e)
                    continue
                finally:
                    torch.set_num_threads(saved_threads)
                report.data["learner_timing"].append(cell)
                report.save()
                log(f"learner {algo} on {device} ({cell['torch_threads']} threads), batch "
                    f"{cell['batch']}: median {cell['median_s'] * 1e3:,.1f} ms over "
                    f"{len(cell['steps_s'])} steps = {cell['rows_per_s']:,.0f} rows/s")
            del batch
    finally:
        torch.set_num_threads(saved_threads)


# -------------------------------------------------------------------------- (2) APEX
def apex_config(args: argparse.Namespace, num_gpus: float, gpus_per_worker: float) -> dict:
    config = _tuned_config("breakout-apex")
    config.update({
        "num_gpus": num_gpus,
        "num_workers": args.num_workers,
        "num_cpus_per_worker": args.num_cpus_per_worker,
        "num_envs_per_worker": args.num_envs_per_worker,
        "num_gpus_per_worker": gpus_per_worker,
        "num_replay_buffer_shards": args.replay_shards or "auto",
        "timesteps_per_iteration": 0,
        "min_iter_time_s": args.iter_seconds,
        "seed": 0,
    })
    if args.smoke:
        config.update({"buffer_size": 5_000, "learning_starts": 300, "train_batch_size": 32,
                       "target_network_update_freq": 2_000, "rollout_fragment_length": 25,
                       "hiddens": [64]})
    if args.learning_starts is not None:
        config["learning_starts"] = args.learning_starts
    if args.buffer_size is not None:
        config["buffer_size"] = args.buffer_size
    return config


def _iteration_record(result: dict, start: float) -> dict:
    info = result.get("info", {})
    timers = result.get("timers", {})
    learner = next(iter(info.get("learner", {}).values()), {}) if info.get("learner") else {}
    record = {
        "iteration": result.get("training_iteration"),
        "time_s": round(time.perf_counter() - start, 2),
        "sampled_steps_per_s": timers.get("sampled_steps_per_s"),
        "trained_rows_per_s": timers.get("trained_steps_per_s"),
        "num_steps_sampled": info.get("num_steps_sampled", 0),
        "num_steps_trained": info.get("num_steps_trained", 0),
        "episode_reward_mean": result.get("episode_reward_mean"),
        "episode_reward_max": result.get("episode_reward_max"),
        "episode_len_mean": result.get("episode_len_mean"),
        "episodes_this_iter": result.get("episodes_this_iter"),
        "learner_queue_size": info.get("learner_queue_size"),
        "learn_time_ms": timers.get("learn_time_ms"),
        "learn_throughput": timers.get("learn_throughput"),
        "num_healthy_workers": result.get("num_healthy_workers"),
    }
    for key in ("mean_q", "loss", "cur_lr"):
        if key in learner:
            record[key] = learner[key]
    return record


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def summarize_apex(run: dict) -> dict:
    """Rates over the measured window: from the first iteration that trained to the last."""
    iters = run["iterations"]
    learning = [i for i in iters if i["num_steps_trained"] > 0]
    window = learning if len(learning) >= 2 else iters
    summary: dict[str, Any] = {"iterations": len(iters)}
    if len(window) >= 2:
        first, last = window[0], window[-1]
        seconds = last["time_s"] - first["time_s"]
        sampled = (last["num_steps_sampled"] - first["num_steps_sampled"]) / seconds
        trained = (last["num_steps_trained"] - first["num_steps_trained"]) / seconds
        summary.update({"window_s": round(seconds, 1),
                        "sampled_steps_per_s": sampled,
                        "frames_per_s": sampled * FRAMES_PER_STEP,
                        "trained_rows_per_s": trained})
    elif window:
        only = window[0]
        summary.update({"window_s": None,
                        "sampled_steps_per_s": only["sampled_steps_per_s"],
                        "frames_per_s": (only["sampled_steps_per_s"] or 0) * FRAMES_PER_STEP,
                        "trained_rows_per_s": only["trained_rows_per_s"]})
    returns = [(i["time_s"], i["episode_reward_mean"]) for i in iters
               if i["episode_reward_mean"] is not None
               and not math.isnan(i["episode_reward_mean"])]
    if returns:
        summary.update({"return_first": returns[0][1], "return_last": returns[-1][1],
                        "return_best_mean": max(r for _, r in returns),
                        "return_max": max(_finite([i["episode_reward_max"] for i in iters]),
                                          default=None),
                        "return_rising": returns[-1][1] > returns[0][1]})
    if iters:
        summary["total_sampled"] = iters[-1]["num_steps_sampled"]
        summary["total_trained"] = iters[-1]["num_steps_trained"]
    return summary


def apex_phase(report: Report, label: str, args: argparse.Namespace, num_gpus: float,
               gpus_per_worker: float, seconds: float) -> None:
    import torch

    from flowrl.plans.apex import ApexAgent
    config = apex_config(args, num_gpus, gpus_per_worker)
    run: dict[str, Any] = {"label": label, "num_gpus": num_gpus,
                           "num_gpus_per_worker": gpus_per_worker,
                           "learner_device": "cuda" if num_gpus and torch.cuda.is_available()
                           else "cpu",
                           "seconds_asked": round(seconds, 1), "config": config,
                           "iterations": []}
    report.data["apex"].append(run)
    report.save()
    log(f"APEX {label}: {config['num_workers']} workers x {config['num_envs_per_worker']} "
        f"envs, num_gpus={num_gpus}, num_gpus_per_worker={gpus_per_worker}, "
        f"{seconds:.0f} s")
    t0 = time.perf_counter()
    agent = ApexAgent(config=config, env=args.game, log_to_disk=False)
    try:
        run["resolved"] = {k: agent.config[k] for k in
                           ("num_workers", "num_cpus_per_worker", "num_replay_buffer_shards",
                            "num_gpus", "num_cpus_for_driver", "buffer_size",
                            "learning_starts", "train_batch_size")}
        policy = agent.workers.local_worker().policy_map
        policy = next(iter(policy.values())) if isinstance(policy, dict) else None
        if policy is not None:
            run["learner_device"] = str(policy.device)
        run["build_s"] = round(time.perf_counter() - t0, 2)
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            result = agent.train()
            record = _iteration_record(result, start)
            run["iterations"].append(record)
            run["summary"] = summarize_apex(run)
            report.save()
            ret = record["episode_reward_mean"]
            log(f"  {label} iter {record['iteration']:>3} t={record['time_s']:6.1f}s "
                f"sampled {record['sampled_steps_per_s'] or 0:>9,.0f} steps/s "
                f"({(record['sampled_steps_per_s'] or 0) * FRAMES_PER_STEP:>9,.0f} frames/s)"
                f"  trained {record['trained_rows_per_s'] or 0:>9,.0f} rows/s"
                f"  return {ret if ret is None else round(ret, 2)}"
                f" (max {record['episode_reward_max']})"
                f"  queue {record['learner_queue_size']}")
    finally:
        stop_start = time.perf_counter()
        agent.stop()
        run["stop_s"] = round(time.perf_counter() - stop_start, 2)
        run["summary"] = summarize_apex(run)
        report.save()
    s = run["summary"]
    if "sampled_steps_per_s" in s:
        log(f"APEX {label}: sampled {s['sampled_steps_per_s']:,.0f} steps/s "
            f"({s['frames_per_s']:,.0f} frames/s), trained {s['trained_rows_per_s']:,.0f} "
            f"rows/s, return {s.get('return_first')} -> {s.get('return_last')}")


# ------------------------------------------------------------------------- markdown
def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def _fmt_n(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(data: dict) -> str:
    meta = data["meta"]
    gpu = meta["gpu"] or "no CUDA device"
    lines = [f"## GPU check: {gpu}, {meta['cpu_count']} CPU cores",
             "",
             f"`python benchmarks/gpu_check.py {' '.join(meta['argv'])}`".replace(" `", "`"),
             f"({meta['started']}; CPU {meta['cpu_model']}; {meta['memory_gib']} GiB; "
             f"Python {meta['python']}, torch {meta['torch']} (CUDA {meta['cuda_version']}), "
             f"ray {meta['ray']}, gymnasium {meta['gymnasium']}, ale-py {meta['ale_py']}"
             f"{', flowrl ' + meta['flowrl_commit'] if meta.get('flowrl_commit') else ''}"
             f"{'; SMOKE RUN, not a measurement' if meta['smoke'] else ''}).",
             ""]
    cells = {(c["algo"], c["device"]): c for c in data["learner_timing"]}
    if cells:
        batch = next(iter(cells.values()))["batch"]
        cpu_threads = next((c["torch_threads"] for c in cells.values()
                            if c["device"] == "cpu"), "?")
        lines += [f"Learner step (`learn_on_batch`, batch {batch} of 84x84x4 uint8 frames, "
                  "Nature CNN, 4 actions; median after warm-up; host-to-device copy "
                  "included):",
                  "",
                  f"| algorithm | CPU ({cpu_threads} torch threads) | GPU ({gpu}) | "
                  "GPU speed-up |",
                  "| --- | --- | --- | --- |"]
        for algo in ("PPO", "DQN"):
            cpu, cuda = cells.get((algo, "cpu")), cells.get((algo, "cuda"))
            if cpu is None and cuda is None:
                continue
            what = (cpu or cuda)["sgd"]

            def fmt(c):
                return "-" if c is None else \
                    f"{_fmt_s(c['median_s'])} ({_fmt_n(c['rows_per_s'])} rows/s)"
            speedup = (f"{cpu['median_s'] / cuda['median_s']:.1f}x"
                       if cpu is not None and cuda is not None else "-")
            lines.append(f"| {algo} ({what}) | {fmt(cpu)} | {fmt(cuda)} | {speedup} |")
        lines.append("")
    runs = data["apex"]
    if runs:
        first = runs[0]["config"]
        lines += [f"APEX on Breakout, {first['num_workers']} workers x "
                  f"{first['num_envs_per_worker']} env(s), other settings from "
                  "`flowrl/tuned_examples/breakout-apex.yaml` (rates over the iterations "
                  "after learning started; return = mean unclipped game score of the "
                  "least-exploring third of the workers):",
                  "",
                  "| learner | workers act on | seconds | sampled agent steps/s (frames/s) | "
                  "trained rows/s | return first -> last (best mean, max game) | "
                  "sampled / trained total |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for run in runs:
            s = run.get("summary", {})
            learner = ("GPU" if run["learner_device"].startswith("cuda")
                       else "CPU only") + f" (`num_gpus: {run['num_gpus']}`)"
            ret = (f"{_fmt_n(s.get('return_first'), 1)} -> {_fmt_n(s.get('return_last'), 1)}"
                   f" ({_fmt_n(s.get('return_best_mean'), 1)}, "
                   f"{_fmt_n(s.get('return_max'), 0)})" if "return_first" in s else "-")
            share = run.get("num_gpus_per_worker") or 0
            acting = f"GPU ({share} each)" if share else "CPU"
            lines.append(
                f"| {learner} | {acting} | {_fmt_n(s.get('window_s'))} | "
                f"{_fmt_n(s.get('sampled_steps_per_s'))} ({_fmt_n(s.get('frames_per_s'))}) | "
                f"{_fmt_n(s.get('trained_rows_per_s'))} | {ret} | "
                f"{_fmt_n(s.get('total_sampled'))} / {_fmt_n(s.get('total_trained'))} |")
        lines.append("")
        for run in runs:
            if not run["iterations"]:
                continue
            lines += [f"Per iteration, {run['label']}:", "",
                      "| iter | t (s) | sampled steps/s | trained rows/s | return mean | "
                      "return max |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for i in run["iterations"]:
                lines.append(f"| {i['iteration']} | {i['time_s']:.0f} | "
                             f"{_fmt_n(i['sampled_steps_per_s'])} | "
                             f"{_fmt_n(i['trained_rows_per_s'])} | "
                             f"{_fmt_n(i['episode_reward_mean'], 2)} | "
                             f"{_fmt_n(i['episode_reward_max'], 0)} |")
            lines.append("")
    for skipped in data["skipped"]:
        lines.append(f"- skipped {skipped['phase']}: {skipped['why']}")
    for error in data["errors"]:
        lines.append(f"- FAILED {error['phase']}: {error['error']}")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="output folder (default: $OUT if set, else ./gpu_check_out)")
    parser.add_argument("--smoke", action="store_true",
                        help="about a minute on CPU: tiny APEX and learner batch")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default 450; smoke 150)")
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--apex-seconds", type=float, default=None,
                        help="APEX with the GPU learner (default 110; smoke 12)")
    parser.add_argument("--gpu-workers-seconds", type=float, default=None,
                        help="APEX with the GPU learner and the workers acting on the GPU; "
                             "0 skips (default 110; needs CUDA)")
    parser.add_argument("--worker-gpu-share", type=float, default=0.04,
                        help="num_gpus_per_worker of that phase (default 0.04)")
    parser.add_argument("--cpu-learner-seconds", type=float, default=None,
                        help="APEX with the CPU-only learner; 0 skips (default 40; smoke 6)")
    parser.add_argument("--iter-seconds", type=float, default=None,
                        help="min_iter_time_s of APEX (default 15; smoke 3)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="APEX rollout workers (default: CPUs - 2, at most 14; smoke 2)")
    parser.add_argument("--num-envs-per-worker", type=int, default=None,
                        help="default 16 (one batched CNN forward per 16 env steps); "
                             "smoke 1")
    parser.add_argument("--num-cpus-per-worker", type=float, default=None,
                        help="default 1; smoke 0.5")
    parser.add_argument("--replay-shards", type=int, default=0, help="0: auto")
    parser.add_argument("--learning-starts", type=int, default=None)
    parser.add_argument("--buffer-size", type=int, default=None)
    parser.add_argument("--learner-batch", type=int, default=None,
                        help="rows per learner step (default 4096; smoke 64)")
    parser.add_argument("--ppo-minibatch", type=int, default=0,
                        help="PPO SGD minibatch (0: the whole batch, one step)")
    parser.add_argument("--learner-warmup", type=int, default=None,
                        help="warm-up steps per cell (default 2 on CPU, >= 3 on GPU; smoke 1)")
    parser.add_argument("--learner-steps", type=int, default=None,
                        help="most timed steps per cell (default 20; smoke 3)")
    parser.add_argument("--learner-cell-s", type=float, default=None,
                        help="timed seconds per cell after 3 steps (default 10; smoke 1)")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads of the CPU learner timing (default: all cores)")
    parser.add_argument("--object-store-gb", type=float, default=None,
                        help="Ray object store (default 8; smoke 0.5)")
    parser.add_argument("--skip-learner", action="store_true")
    parser.add_argument("--skip-apex", action="store_true")
    parser.add_argument("--ray-logs", action="store_true", help="workers' logs to stdout")
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 2
    smoke = args.smoke
    defaults = {
        "budget_s": 150.0 if smoke else 450.0,
        "apex_seconds": 12.0 if smoke else 110.0,
        "gpu_workers_seconds": 0.0 if smoke else 110.0,
        "cpu_learner_seconds": 6.0 if smoke else 40.0,
        "iter_seconds": 3.0 if smoke else 15.0,
        "num_workers": 2 if smoke else max(2, min(14, cpus - 2)),
        "num_envs_per_worker": 1 if smoke else 16,
        "num_cpus_per_worker": 0.5 if smoke else 1.0,
        "learner_batch": 64 if smoke else 4096,
        "learner_warmup": 1 if smoke else 2,
        "learner_steps": 3 if smoke else 20,
        "learner_cell_s": 1.0 if smoke else 10.0,
        "cpu_threads": min(2, cpus) if smoke else cpus,
        "object_store_gb": 0.5 if smoke else 8.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def object_store_bytes(gib: float) -> int:
    """``gib`` GiB, capped at 80% of a /dev/shm of 2 GiB or more (Ray falls back to a
    slower /tmp store when /dev/shm is too small for what it is asked)."""
    want = int(gib * 2**30)
    try:
        import shutil
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return want
    return min(want, int(0.8 * free)) if free >= 2 * 2**30 else want


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    meta = machine_info(args)
    cuda = meta["cuda"]
    report = Report(args.out, meta)
    log(f"GPU: {meta['gpu'] or 'no CUDA device'}; {meta['cpu_count']} CPUs "
        f"({meta['cpu_model']}); torch {meta['torch']}, ray {meta['ray']}, "
        f"Python {meta['python']}; budget {args.budget_s:.0f} s; out {args.out}")

    if args.skip_learner:
        report.skip("learner_timing", "--skip-learner")
    else:
        learner_deadline = deadline - (0 if args.skip_apex else
                                       args.apex_seconds + args.gpu_workers_seconds
                                       + args.cpu_learner_seconds)
        try:
            learner_phase(report, args, cuda, max(learner_deadline, t_start + 30))
        except Exception as e:  # noqa: BLE001
            report.error("learner_timing", e)

    if args.skip_apex:
        report.skip("apex", "--skip-apex")
    else:
        import ray
        cpus = os.cpu_count() or 2
        try:
            import torch
            # address="local": a fresh Ray of this machine, never a cluster that a
            # `ray start` elsewhere on it left running.
            ray.init(address="local", num_cpus=max(cpus, 2),
                     num_gpus=torch.cuda.device_count(),
                     include_dashboard=False, log_to_driver=args.ray_logs,
                     object_store_memory=object_store_bytes(args.object_store_gb))
            report.data["meta"]["ray_resources"] = ray.cluster_resources()
            phases = [("gpu_learner" if cuda else "cpu_learner_no_cuda", 1 if cuda else 0,
                       0.0, args.apex_seconds)]
            if cuda and args.gpu_workers_seconds > 0:
                workers_share = round(args.worker_gpu_share * args.num_workers, 4)
                if workers_share >= 1:
                    raise ValueError(f"--worker-gpu-share {args.worker_gpu_share} x "
                                     f"{args.num_workers} workers leaves no GPU for the "
                                     "learner; give each worker less than 1/workers")
                phases.append(("gpu_learner_gpu_workers", round(1 - workers_share, 4),
                               args.worker_gpu_share, args.gpu_workers_seconds))
            if cuda and args.cpu_learner_seconds > 0:
                phases.append(("cpu_learner", 0, 0.0, args.cpu_learner_seconds))
            elif not cuda:
                report.skip("apex_gpu_learner", "no CUDA device: APEX ran with the CPU "
                            "learner only")
            overhead = 25.0 if args.smoke else 45.0  # workers' start and stop
            for label, num_gpus, gpus_per_worker, seconds in phases:
                left = deadline - time.perf_counter() - overhead
                if left < min(seconds, 3 * args.iter_seconds):
                    report.skip(f"apex_{label}", f"wall-clock budget spent ({left:.0f} s "
                                "left after start-up allowance)")
                    continue
                try:
                    apex_phase(report, label, args, num_gpus, gpus_per_worker,
                               min(seconds, left))
                except Exception as e:  # noqa: BLE001
                    report.error(f"apex_{label}", e)
        except Exception as e:  # noqa: BLE001
            report.error("apex", e)
        finally:
            ray.shutdown()

    report.data["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.save()
    table = markdown(report.data)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table)
    print("\n" + table, flush=True)
    log(f"done in {report.data['wall_s']:.0f} s; wrote {report.path} and gpu_check.md")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
