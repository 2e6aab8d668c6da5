"""get_action round trips per second through PolicyServer, with 1 and 8 clients.

    python benchmarks/serving.py [--seconds 10] [--clients 1 8]

One run measures, side by side:
* in-process: ExternalEnv.get_action called directly from 1 thread (no HTTP), the
  ceiling the sampler itself allows;
* HTTP: N PolicyClients (threads of one client process, each with its own keep-alive
  connection) against a PolicyServer in this process, for each N in ``--clients``.

The server side is what a training server runs while it samples: an ExternalEnv whose
ExternalEnvSampler (PPO policy, CartPole spaces) serves the requests in a loop, one
batched forward pass per round, and postprocesses the finished steps (the batches are
dropped). Clients play 100-step episodes: start_episode, 100 x get_action with
random CartPole-shaped observations, end_episode; only get_action calls are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

EPISODE_STEPS = 100


def client_main(port: int, threads: int, seconds: float) -> None:
    """Runs in the client process: prints ``{"calls", "seconds", "latency_ms"}``."""
    from flowrl.envs.serving import PolicyClient

    url = f"http://127.0.0.1:{port}"
    start_evt = threading.Barrier(threads + 1)
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    stop_at = [0.0]

    def play(i: int) -> None:
        client = PolicyClient(url)
        rng = np.random.default_rng(i)
        obs = rng.normal(size=(EPISODE_STEPS + 1, 4)).astype(np.float32)
        client.get_policy_spec()  # connect and fetch the spaces before timing
        start_evt.wait()
        while time.perf_counter() < stop_at[0]:
            eid = client.start_episode()
            for t in range(EPISODE_STEPS):
                t0 = time.perf_counter()
                client.get_action(eid, obs[t])
                latencies[i].append(time.perf_counter() - t0)
                counts[i] += 1
            client.end_episode(eid, obs[EPISODE_STEPS])
        client.close()

    workers = [threading.Thread(target=play, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    stop_at[0] = time.perf_counter() + seconds + 1.0  # set before releasing the barrier
    start_evt.wait()
    begin = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - begin
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    print(json.dumps({"calls": sum(counts), "seconds": elapsed,
                      "latency_ms_p50": float(np.percentile(lat, 50)),
                      "latency_ms_p99": float(np.percentile(lat, 99))}))


class ServingSide:
    """ExternalEnv + PolicyServer + an ExternalEnvSampler looping in a thread."""

    def __init__(self) -> None:
        import gymnasium as gym

        from flowrl.envs.serving import ExternalEnv, PolicyServer
        from flowrl.plans.ppo import PPOAgent
        from flowrl.policies.ppo import PPOTorchPolicy
        from flowrl.workers.external_sampler import ExternalEnvSampler

        spec = gym.make("CartPole-v1")
        config = PPOAgent.merge_config({"env": "CartPole-v1", "seed": 0})
        self.env = ExternalEnv(spec.observation_space, spec.action_space)
        self.server = PolicyServer(self.env, port=0).start()
        policy = PPOTorchPolicy(spec.observation_space, spec.action_space, config)
        self.sampler = ExternalEnvSampler([self.env], policy, fragment_length=200)
        self._stop = threading.Event()
        self.sampled = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sampled += self.sampler.sample(timeout_s=0.5).count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.env.close()


def in_process_rate(seconds: float) -> float:
    """get_action calls/s made directly on the ExternalEnv (no HTTP), one thread."""
    side = ServingSide()
    obs = np.random.default_rng(0).normal(size=(EPISODE_STEPS + 1, 4)).astype(np.float32)
    calls, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        eid = side.env.start_episode()
        for t in range(EPISODE_STEPS):
            side.env.get_action(eid, obs[t])
        side.env.end_episode(eid, obs[EPISODE_STEPS])
        calls += EPISODE_STEPS
    rate = calls / (time.perf_counter() - begin)
    side.stop()
    return rate


def http_rate(threads: int, seconds: float) -> dict:
    side = ServingSide()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--client", "--port", str(side.server.port),
         "--threads", str(threads), "--seconds", str(seconds)],
        env=env, capture_output=True, text=True, check=True, timeout=seconds + 120)
    side.stop()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["rate"] = result["calls"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.port, args.threads, args.seconds)
        return
    import torch
    torch.set_num_threads(1)
    print(f"in-process ExternalEnv.get_action, 1 thread: {in_process_rate(args.seconds):,.0f} "
          "calls/s")
    print("| clients | get_action round trips/s | per client | p50 latency | p99 latency |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.clients:
        r = http_rate(n, args.seconds)
        print(f"| {n} | {r['rate']:,.0f} | {r['rate'] / n:,.0f} | "
              f"{r['latency_ms_p50']:.2f} ms | {r['latency_ms_p99']:.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
