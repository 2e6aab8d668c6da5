"""Serving: ExternalEnv, ExternalEnvSampler, PolicyServer and PolicyClient.

Real HTTP on loopback, real threads and processes, real policies; no mocks. The only
patching is a tripwire on the stdlib's pickle entry points in the server's process.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import pickle
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

import gymnasium as gym
import numpy as np
import pytest

from flowrl.envs import register_env
from flowrl.envs.serving import (ExternalEnv, PolicyClient, PolicyClientError, PolicyServer,
                                 PolicyServiceLoop)
from flowrl.envs.serving.wire import encode_array
from flowrl.plans.dqn import DQNAgent
from flowrl.serving import serve_checkpoint
from flowrl.plans.ppo import PPOAgent
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.data.sample_batch import SampleBatch
from flowrl.workers import RolloutWorker
from flowrl.workers.external_sampler import ExternalEnvSampler
from learning_bars import SeedRun, two_of_three

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token-123"
OBS_SPACE = gym.spaces.Box(-1e6, 1e6, (3,), np.float32)
ACT_SPACE = gym.spaces.Discrete(2)


class ServedEnv(ExternalEnv):
    """An ExternalEnv with a PolicyServer on a free loopback port (closed with the env)."""

    def __init__(self, ctx=None, observation_space=OBS_SPACE, action_space=ACT_SPACE):
        super().__init__(observation_space, action_space)
        ctx = ctx or {}
        self.server = PolicyServer(self, port=0, token=ctx.get("token"),
                                   max_body_bytes=ctx.get("max_body_bytes", 1 << 20)).start()


class CartPoleServed(ServedEnv):
    def __init__(self, ctx=None):
        env = gym.make("CartPole-v1")
        super().__init__(ctx, env.observation_space, env.action_space)


register_env("serving_test_env", ServedEnv)
register_env("serving_test_cartpole", CartPoleServed)


def play_cartpole(client: PolicyClient, stop: threading.Event, seed: int,
                  errors: list) -> None:
    """Plays CartPole episodes through ``client`` until ``stop`` is set.

    Any error goes to ``errors`` (the test asserts it is empty), except the
    PolicyClientError of a server that went away after ``stop`` was set.
    """
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    try:
        while not stop.is_set():
            eid = client.start_episode()
            while True:
                action = client.get_action(eid, obs)
                obs, reward, terminated, truncated, _ = env.step(action)
                client.log_returns(eid, reward)
                if terminated or truncated:
                    client.end_episode(eid, obs, truncated=truncated and not terminated)
                    obs, _ = env.reset()
                    break
    except PolicyClientError as error:
        if not stop.is_set():  # before the test stopped the server: a real failure
            errors.append(error)
    except Exception as error:  # noqa: BLE001 - a thread's error would otherwise be lost
        errors.append(error)


def join_players(players: list[threading.Thread], errors: list) -> None:
    """Waits for the players (they end once the server is gone) and fails on any error."""
    for player in players:
        player.join(timeout=60)
        assert not player.is_alive(), "a client thread did not end after the server stopped"
    assert not errors, errors


def worker_config(**overrides):
    return PPOAgent.merge_config({"env": "serving_test_env", "num_workers": 0,
                                  "rollout_fragment_length": 50, "seed": 0, **overrides})


# -- (1) learning: the example server + a client process -----------------------------------
# Typical: the median env steps of seeds 0-2 to the bar, measured with FLOWRL_LEARNING_LOG
# (18k, 18k, 19k; earlier trial runs up to 28k; ~75 s per seed on 2 busy cores).
# Budget: 2x typical.
TYPICAL_STEPS_OVER_HTTP = 18_000
BUDGET_STEPS_OVER_HTTP = 36_000
# The server prints one line per iteration and one at the end (cartpole_server.py).
ITERATION_LINE = re.compile(r"reward_mean\s+(-?[\d.]+|nan)\s+timesteps\s+(\d+)")
OUTCOME_LINE = re.compile(r"(did not reach|reached) reward 150: mean \S+ after (\d+) steps")


def _train_over_http(seed: int, budget: int, trial_dir) -> tuple[int, str, int, str]:
    """Runs cartpole_server.py (DQN, stopping at a mean return of 150 or ``budget`` env
    steps) and one cartpole_client.py process against it; returns both exit statuses
    and outputs. No timeout of its own: a loaded machine is slower, and pytest's timeout
    catches a hang."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(
        [sys.executable, "examples/serving/cartpole_server.py", "--run", "DQN", "--port", "0",
         "--token", TOKEN, "--checkpoint-dir", str(trial_dir), "--stop-reward", "150",
         "--stop-timesteps", str(budget), "--checkpoint-freq", "10", "--seed", str(seed)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = None
    try:
        head = []
        while True:  # the first line naming the address (warnings may come before it)
            line = server.stdout.readline()
            head.append(line)
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match or not line:
                break
        assert match, "".join(head)
        client = subprocess.Popen(
            [sys.executable, "examples/serving/cartpole_client.py", "--port", match.group(1),
             "--token", TOKEN, "--seed", str(seed)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = server.communicate()
        client_out, _ = client.communicate()  # it ends when the server goes away
    finally:
        for proc in (server, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return server.returncode, "".join(head) + out, client.returncode, client_out


def run_dqn_over_http(trial_root) -> Callable[[int, int], SeedRun]:
    """A ``run_seed`` for two_of_three: one server + client run per seed; a run that
    neither reached the bar nor ran out of steps cleanly fails the test at once."""

    def run(seed: int, budget: int) -> SeedRun:
        status, out, client_status, client_out = _train_over_http(
            seed, budget, trial_root / f"seed{seed}")
        outcome = OUTCOME_LINE.search(out)
        assert outcome is not None, out  # a crash, not a slow seed
        assert client_status == 0, client_out
        assert "server went away" in client_out, client_out
        # The server checkpoints every 10 iterations and at the end, however it stops.
        assert re.search(r"checkpoint .*checkpoint_0000\d\d", out), out
        history = [(int(steps), float(reward)) for reward, steps in ITERATION_LINE.findall(out)]
        reached = outcome.group(1) == "reached"
        assert (status == 0) == reached, out
        return SeedRun(seed, int(outcome.group(2)) if reached else None, history)

    return run


@pytest.mark.learning
def test_server_example_trains_dqn_with_a_client_process(tmp_path):
    """DQN reaches a mean return of 150 on CartPole-v1 played by a client process over
    HTTP, on 2 of 3 seeds within the step budget (typical steps stated above)."""
    two_of_three(run_dqn_over_http(tmp_path), budget=BUDGET_STEPS_OVER_HTTP,
                 typical=TYPICAL_STEPS_OVER_HTTP,
                 what="DQN over HTTP (cartpole_server.py + client) to 150")


# -- (2) concurrent clients: every step in its own trajectory --------------------------------
@pytest.mark.parametrize("batch_mode", ["truncate_episodes", "complete_episodes"])
def test_concurrent_clients_steps_land_in_their_own_trajectories(batch_mode):
    worker = RolloutWorker(lambda ctx: ServedEnv(ctx), PPOTorchPolicy,
                           worker_config(batch_mode=batch_mode, num_envs_per_worker=4))
    env = worker.env
    assert isinstance(worker.sampler, ExternalEnvSampler) and len(worker.envs) == 1
    url, n_clients, n_episodes = env.server.url, 8, 12
    sent: dict[str, dict] = {}
    failures: list = []

    def client_thread(c: int) -> None:
        rng = random.Random(c)
        client = PolicyClient(url)
        try:
            for e in range(n_episodes):
                training = e % 5 != 4
                eid = client.start_episode(f"c{c}-e{e}", training_enabled=training)
                length, actions = rng.randint(1, 30), []
                for t in range(length):
                    obs = np.array([c, e, t], np.float32)
                    if t % 7 == 3:  # the simulator's own choice
                        actions.append(t % 2)
                        client.log_action(eid, obs, t % 2)
                    else:
                        actions.append(client.get_action(eid, obs))
                    client.log_returns(eid, c * 10000 + e * 100 + t)
                    if rng.random() < 0.3:
                        time.sleep(0.001)  # interleave the clients differently
                truncated = e % 3 == 0
                client.end_episode(eid, np.array([c, e, length], np.float32), truncated=truncated)
                sent[eid] = {"c": c, "e": e, "length": length, "actions": actions,
                             "training": training, "truncated": truncated}
        except Exception as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    batches = [worker.sample()]  # the RolloutWorker path (fragment_length steps at least)
    while any(t.is_alive() for t in threads):
        batches.append(worker.sampler.sample(timeout_s=0.2))
    batches.append(worker.sampler.sample(timeout_s=0.5))
    assert not failures, failures
    assert len(sent) == n_clients * n_episodes
    batch = SampleBatch.concat_samples([b for b in batches if b.count])
    assert "advantages" in batch and "action_logp" in batch  # postprocessed by the policy

    by_eps = {}
    for i, eps in enumerate(batch[SampleBatch.EPS_ID]):
        by_eps.setdefault(int(eps), []).append(i)
    trained = {eid: s for eid, s in sent.items() if s["training"]}
    assert set(by_eps) == {env.eps_id_of(eid) for eid in trained}
    for eid, s in trained.items():
        rows = by_eps[env.eps_id_of(eid)]
        c, e, n = s["c"], s["e"], s["length"]
        t = batch[SampleBatch.T][rows]
        assert sorted(t.tolist()) == list(range(n)), eid
        order = np.argsort(t, kind="stable")
        rows = np.asarray(rows)[order]
        expected_obs = np.array([[c, e, k] for k in range(n)], np.float32)
        np.testing.assert_array_equal(batch[SampleBatch.OBS][rows], expected_obs)
        np.testing.assert_array_equal(batch[SampleBatch.NEW_OBS][rows],
                                      np.array([[c, e, k + 1] for k in range(n)], np.float32))
        np.testing.assert_array_equal(batch[SampleBatch.REWARDS][rows],
                                      [c * 10000 + e * 100 + k for k in range(n)])
        np.testing.assert_array_equal(batch[SampleBatch.ACTIONS][rows], s["actions"])
        ends = np.zeros(n, bool)
        ends[-1] = True
        np.testing.assert_array_equal(batch[SampleBatch.TRUNCATEDS][rows], ends & s["truncated"])
        np.testing.assert_array_equal(batch[SampleBatch.TERMINATEDS][rows],
                                      ends & (not s["truncated"]))
        if batch_mode == "complete_episodes":  # whole episodes, never cut
            assert len(set(batch[SampleBatch.UNROLL_ID][rows].tolist())) == 1
    # action_logp belongs to the action taken, also where the simulator chose it
    logits = batch[SampleBatch.ACTION_DIST_INPUTS].astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(
        batch[SampleBatch.ACTION_LOGP],
        log_probs[np.arange(batch.count), batch[SampleBatch.ACTIONS]], atol=1e-5)
    # episode metrics: every episode with a step, trained on or not
    metrics = worker.get_metrics()
    assert len(metrics) == len(sent)
    assert sorted(length for _, length in metrics) == sorted(s["length"] for s in sent.values())
    worker.stop()
    with pytest.raises(PolicyClientError):
        PolicyClient(url, timeout_s=5).start_episode()


# -- (3) hostile requests ---------------------------------------------------------------------
def _raw(port: int, data: bytes, read_timeout: float = 10.0) -> int:
    """Sends raw bytes; returns the status of the first reply line (0 if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        reply = b""
        try:
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    return int(match.group(1)) if match else 0


def _post(port: int, body: bytes, headers: dict | None = None, method: str = "POST",
          path: str = "/") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        hdrs = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        hdrs.update(headers or {})
        hdrs = {k: v for k, v in hdrs.items() if v is not None}
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else {})
    finally:
        conn.close()


def _cmd(port: int, obj, **kwargs) -> tuple[int, dict]:
    return _post(port, json.dumps(obj).encode(), **kwargs)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _hostile_requests(port: int, live: str, finished: str) -> list:
    """(description, sender) pairs; each sender returns the HTTP status it got."""
    cases = []

    def body(desc, data, **kw):
        cases.append((desc, lambda: _post(port, data, **kw)[0]))

    def cmd(desc, obj, **kw):
        cases.append((desc, lambda: _cmd(port, obj, **kw)[0]))

    def raw(desc, data):
        cases.append((desc, lambda: _raw(port, data)))

    good_obs = encode_array(np.zeros(3, np.float32))
    # malformed JSON
    for i, text in enumerate([b"", b"{", b"}", b"{'command': 'x'}", b"{\"command\": }", b"nul",
                              b"{\"command\": \"start_episode\"} trailing", b"\xff\xfe\x00",
                              b"[" * 100_000, b"{\"a\":" * 50_000, b"NaN", b"Infinity",
                              b"{\"command\": \"log_returns\", \"episode_id\": \"x\", "
                              b"\"reward\": NaN}", b"1" * 5000, b"\"\\ud800\"", b"\x00" * 64,
                              "{\"command\": \"ünïcode\"}".encode("latin-1")]):
        body(f"bad json {i}", text)
    # wrong top-level types and commands
    for i, obj in enumerate([[], "start_episode", 42, None, True, {}, {"command": 1},
                             {"command": None}, {"command": ["get_action"]},
                             {"command": {"name": "get_action"}}]):
        cmd(f"wrong top-level {i}", obj)
    for name in ["", "GET_ACTION", "get_action ", "__init__", "__class__", "eval", "exec",
                 "shutdown", "close", "_start", "run", "pickle", "commands", "x" * 1000]:
        cmd(f"unknown command {name[:20]}", {"command": name})
    # wrong field types, per command
    bad_values = [None, 1, 1.5, True, [], {}, "", "x" * 300, ["a"], {"a": 1}]
    for v in bad_values:
        if v is not None:  # null asks the server for an id
            cmd("start_episode id", {"command": "start_episode", "episode_id": v})
        cmd("get_action id", {"command": "get_action", "episode_id": v, "observation": good_obs})
        cmd("log_returns reward", {"command": "log_returns", "episode_id": live, "reward": v})
        cmd("get_action obs", {"command": "get_action", "episode_id": live, "observation": v})
    for v in [1, "yes", None, [], 0.0]:
        cmd("training_enabled type", {"command": "start_episode", "training_enabled": v})
        cmd("truncated type", {"command": "end_episode", "episode_id": live,
                               "observation": good_obs, "truncated": v})
    for v in [[1], "info", 3]:
        cmd("info type", {"command": "log_returns", "episode_id": live, "reward": 1.0, "info": v})
    cmd("unknown field", {"command": "get_action", "episode_id": live, "observation": good_obs,
                          "extra": 1})
    cmd("missing field", {"command": "get_action", "episode_id": live})
    cmd("missing everything", {"command": "log_returns"})
    # unknown and finished episodes
    for i in range(10):
        cmd("unknown episode", {"command": "get_action", "episode_id": f"nope-{i}",
                                "observation": good_obs})
    cmd("unknown episode end", {"command": "end_episode", "episode_id": "nope",
                                "observation": good_obs})
    for c in ["get_action", "end_episode"]:
        cmd(f"finished {c}", {"command": c, "episode_id": finished, "observation": good_obs})
    cmd("finished log_returns", {"command": "log_returns", "episode_id": finished, "reward": 1})
    cmd("restart finished", {"command": "start_episode", "episode_id": finished})
    cmd("restart live", {"command": "start_episode", "episode_id": live})
    cmd("returns before action", {"command": "log_returns", "episode_id": live, "reward": 1.0})
    # observations: shape, dtype, encodings
    for arr in [np.zeros(4, np.float32), np.zeros((3, 1), np.float32), np.zeros((), np.float32),
                np.zeros(0, np.float32), np.zeros((1, 3), np.float32), np.zeros(3, np.float64),
                np.zeros(3, np.int32), np.zeros(3, np.bool_), np.zeros(3, np.uint8),
                np.zeros(3, np.float16), np.array([np.nan, 0, 0], np.float32),
                np.array([np.inf, 0, 0], np.float32)]:
        cmd(f"obs {arr.dtype} {arr.shape}", {"command": "get_action", "episode_id": live,
                                             "observation": encode_array(arr)})
    for enc in [{"dtype": "float32", "shape": [3]},
                {"dtype": "float32", "shape": [3], "data": "!!!notbase64"},
                {"dtype": "float32", "shape": [3], "data": base64.b64encode(b"\0" * 11).decode()},
                {"dtype": "float32", "shape": [-3], "data": ""},
                {"dtype": "float32", "shape": [1 << 40], "data": ""},
                {"dtype": "float32", "shape": [2] * 40, "data": ""},
                {"dtype": "float32", "shape": "3", "data": ""},
                {"dtype": "float32", "shape": [3.0], "data": ""},
                {"dtype": "object", "shape": [3], "data": [1, 2, 3]},
                {"dtype": "<U8", "shape": [3], "data": ["a", "b", "c"]},
                {"dtype": "complex64", "shape": [3], "data": [1, 2, 3]},
                {"dtype": "O", "shape": [3], "data": [1, 2, 3]},
                {"dtype": "float32", "shape": [3], "data": ["1", "2", "3"]},
                {"dtype": "float32", "shape": [3], "data": [[1], [2, 3], []]},
                {"dtype": "float32", "shape": [3], "data": [1, 2]},
                {"dtype": "float32", "shape": [3], "data": {"0": 1}},
                {"dtype": "float32", "shape": [3], "data": None},
                {"dtype": "float32", "shape": [3], "data": [True, False, True]},
                {"dtype": "float32", "shape": [3], "data": [0, 0, 0], "x": 1},
                {"dtype": None, "shape": [3], "data": [0, 0, 0]},
                {"dtype": "float32", "shape": [3],
                 "data": base64.b64encode(pickle.dumps(np.zeros(3, np.float32))).decode()},
                {"dtype": "float32", "shape": [3],
                 "data": base64.b64encode(pickle.dumps(_Evil())).decode()}]:
        cmd("obs encoding", {"command": "get_action", "episode_id": live, "observation": enc})
    # actions of log_action
    for action in [2, -1, 1.0, "1", None, True, [1], encode_array(np.array(1.0, np.float32)),
                   encode_array(np.array([1], np.int64)), encode_array(np.array(5, np.int64))]:
        cmd("bad action", {"command": "log_action", "episode_id": live, "observation": good_obs,
                           "action": action})
    # log_experience
    pieces = [None, "x", [], {}, {"episode_id": "p1"},
              {"episode_id": "p2", "observations": encode_array(np.zeros((2, 3), np.float32)),
               "actions": encode_array(np.zeros(3, np.int64)), "rewards": [0, 0]},
              {"episode_id": "p3", "observations": encode_array(np.zeros((2, 3), np.float32)),
               "actions": encode_array(np.zeros(2, np.int64)), "rewards": [0, "x"]},
              {"episode_id": finished, "observations": encode_array(np.zeros((1, 3), np.float32)),
               "actions": encode_array(np.zeros(1, np.int64)), "rewards": [0]},
              {"episode_id": "p4", "observations": encode_array(np.zeros((1, 4), np.float32)),
               "actions": encode_array(np.zeros(1, np.int64)), "rewards": [0]},
              {"episode_id": "p5", "observations": encode_array(np.zeros((1, 3), np.float32)),
               "actions": encode_array(np.full(1, 7, np.int64)), "rewards": [0]}]
    for piece in pieces:
        cmd("bad experience", {"command": "log_experience", "episodes": [piece]})
    cmd("experience not a list", {"command": "log_experience", "episodes": {"a": 1}})
    # tokens
    for header in [None, "", "Bearer", "Bearer ", f"Bearer {TOKEN}x", f"bearer {TOKEN}",
                   f"Basic {TOKEN}", f"Bearer  {TOKEN}", TOKEN, f"Bearer {TOKEN[:-1]}",
                   "Bearer " + "a" * 10_000]:
        cmd("token", {"command": "start_episode"}, headers={"Authorization": header})
    # content type, methods, paths
    for ctype in [None, "text/plain", "application/octet-stream", "application/x-pickle",
                  "multipart/form-data", "application/jsonx"]:
        cmd(f"content type {ctype}", {"command": "start_episode"},
            headers={"Content-Type": ctype})
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW", "TRACE"]:
        cmd(f"method {method}", {"command": "start_episode"}, method=method)
    for path in ["/admin", "/get_action", "/../etc/passwd", "/%00", "/x?command=1"]:
        cmd(f"path {path}", {"command": "start_episode"}, path=path)
    # pickle payloads
    evil = pickle.dumps(_Evil())
    body("pickle as json", evil)
    body("pickle as octet-stream", evil, headers={"Content-Type": "application/octet-stream"})
    body("pickle of a dict", pickle.dumps({"command": "start_episode"}))
    body("pickle protocol 0", pickle.dumps({"command": "start_episode"}, protocol=0))
    # sizes and framing
    body("huge body", b"{\"command\": \"start_episode\", \"pad\": \"" + b"a" * (2 << 20) + b"\"}")
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    raw("huge content-length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + auth + b"Content-Length: 10000000000\r\n\r\n{")
    raw("no content-length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + auth + b"\r\n")
    raw("chunked", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    raw("negative content-length", b"POST / HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: -5\r\n\r\n")
    raw("two content-lengths", b"POST / HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
    raw("garbage request line", b"HELLO\r\n\r\n")
    raw("bad version", b"POST / HTTP/9.9\r\n\r\n")
    raw("long header", b"POST / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
    raw("too many headers", b"POST / HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n")
    return cases


def test_hostile_requests_get_4xx_and_the_server_keeps_serving(monkeypatch):
    loaded = []

    def tripwire(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("the policy server must never unpickle anything")

    class TripwireUnpickler:
        def __init__(self, *args, **kwargs):
            tripwire(*args)

    env = ServedEnv({"token": TOKEN})
    loop = PolicyServiceLoop(env, PPOTorchPolicy(OBS_SPACE, ACT_SPACE, worker_config()),
                             explore=False).start()
    port = env.server.port
    try:
        live = _cmd(port, {"command": "start_episode", "episode_id": "live"})[1]["episode_id"]
        _cmd(port, {"command": "start_episode", "episode_id": "done"})
        _cmd(port, {"command": "end_episode", "episode_id": "done",
                    "observation": encode_array(np.zeros(3, np.float32))})
        cases = _hostile_requests(port, live, "done")
        assert len(cases) >= 200, len(cases)
        monkeypatch.setattr(pickle, "loads", tripwire)
        monkeypatch.setattr(pickle, "load", tripwire)
        monkeypatch.setattr(pickle, "Unpickler", TripwireUnpickler)
        monkeypatch.setattr(np, "load", tripwire)
        for i, (desc, send) in enumerate(cases):
            status = send()
            assert 400 <= status < 500, (desc, status)
            if i % 25 == 0:  # valid requests keep working in between
                assert _cmd(port, {"command": "start_episode"})[0] == 200
        assert not loaded
        # the live episode was not disturbed by any of it
        obs = encode_array(np.array([1, 2, 3], np.float32))
        status, reply = _cmd(port, {"command": "get_action", "episode_id": live,
                                    "observation": obs})
        assert status == 200 and reply["action"] in (0, 1)
        assert _cmd(port, {"command": "log_returns", "episode_id": live, "reward": 1.0})[0] == 200
        assert _cmd(port, {"command": "end_episode", "episode_id": live, "observation": obs,
                           "truncated": True})[0] == 200
        # keep-alive connections survive error replies that read the body
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        for payload in [b"{bad", json.dumps({"command": "start_episode"}).encode()]:
            conn.request("POST", "/", body=payload, headers=headers)
            response = conn.getresponse()
            reply = json.loads(response.read())
        assert response.status == 200 and "episode_id" in reply
        conn.close()
    finally:
        env.close()
        loop.stop()


def test_error_replies_are_json_with_a_message():
    env = ServedEnv({"token": TOKEN, "max_body_bytes": 1000})
    try:
        port = env.server.port
        status, reply = _cmd(port, {"command": "fly"})
        assert status == 400 and "unknown command 'fly'" in reply["error"]
        status, reply = _cmd(port, {"command": "start_episode"}, headers={"Authorization": None})
        assert status == 401 and "missing token" in reply["error"]
        status, reply = _post(port, b"{\"command\": \"start_episode\", \"p\": \"" + b"a" * 2000
                              + b"\"}")
        assert status == 413 and "exceeds" in reply["error"]
        status, reply = _cmd(port, {"command": "get_action", "episode_id": "zz",
                                    "observation": encode_array(np.zeros(3, np.float32))})
        assert status == 404 and "unknown episode" in reply["error"]
        status, reply = _cmd(port, {"command": "get_action", "episode_id": "zz",
                                    "observation": encode_array(np.zeros(3, np.float64))})
        assert status == 400 and "dtype float64" in reply["error"]
    finally:
        env.close()


def test_oversized_body_gets_a_readable_413_and_the_server_keeps_serving():
    """A 20 MB POST through plain urllib reads the 413 rather than a connection reset
    (the server drains the refused body); the next requests are served as usual."""
    env = ServedEnv({"token": TOKEN})
    loop = PolicyServiceLoop(env, PPOTorchPolicy(OBS_SPACE, ACT_SPACE, worker_config()),
                             explore=False).start()
    try:
        url = env.server.url
        body = b"{\"command\": \"start_episode\", \"p\": \"" + b"a" * 20_000_000 + b"\"}"
        request = urllib.request.Request(url + "/", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        with info.value:
            assert info.value.code == 413
            message = json.loads(info.value.read())["error"]
        assert f"{len(body)} bytes" in message and f"limit of {1 << 20} bytes" in message
        assert time.monotonic() - started < 10
        # PolicyClient raises its error with the status and the server's message
        client = PolicyClient(url, token=TOKEN, timeout_s=10)
        eid = client.start_episode()
        with pytest.raises(PolicyClientError, match="exceeds the server's limit") as error:
            client.log_returns(eid, 1.0, info={"blob": "a" * 20_000_000})
        assert error.value.status == 413 and error.value.command == "log_returns"
        # valid requests are served, on the same client and on a fresh connection
        assert client.get_action(eid, np.zeros(3, np.float32)) in (0, 1)
        client.end_episode(eid, np.zeros(3, np.float32))
        assert _cmd(env.server.port, {"command": "start_episode"})[0] == 200
    finally:
        env.close()
        loop.stop()


# -- (4) local inference mode ------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["PPO", "DQN"])
def test_local_inference_mode_end_to_end(algo, results_dir):
    if algo == "PPO":
        agent = PPOAgent(config={"train_batch_size": 400, "rollout_fragment_length": 100,
                                 "sgd_minibatch_size": 100, "num_sgd_iter": 2, "seed": 0},
                         env="serving_test_cartpole")
    else:
        agent = DQNAgent(config={"timesteps_per_iteration": 300, "learning_starts": 100,
                                 "seed": 0}, env="serving_test_cartpole")
    url = agent.workers.local_worker().env.server.url
    client = PolicyClient(url, inference_mode="local", update_interval_s=0.05)
    spec = client.get_policy_spec()
    policy_cls = type(agent.get_policy())
    assert spec["policy_class"] == f"{policy_cls.__module__}:{policy_cls.__qualname__}"
    assert spec["config"]["gamma"] == agent.config["gamma"]
    assert "env_config" not in spec["config"]  # the env's settings may hold secrets
    initial = {k: v.copy() for k, v in client.policy.get_weights().items()}
    assert client.num_weight_updates == 1
    stop, errors = threading.Event(), []
    player = threading.Thread(target=play_cartpole, args=(client, stop, 0, errors))
    player.start()
    try:
        results = [agent.train() for _ in range(3)]
    finally:
        stop.set()
    join_players([player], errors)
    assert results[-1]["timesteps_total"] >= 3 * (400 if algo == "PPO" else 300)
    assert results[-1]["episodes_total"] > 0
    assert results[-1]["info"]["num_steps_trained"] > 0
    assert client.num_weight_updates >= 2  # refreshed (every 0.05 s) while the agent trained
    # get_weights answers with the weights the sampler acts with: after training
    # stopped, one sampler round takes the latest ones
    client.update_policy_weights()
    agent.workers.local_worker().sampler.sample(timeout_s=0.05)
    client.update_policy_weights()
    server_weights = agent.get_policy().get_weights()
    local_weights = client.policy.get_weights()
    assert any(not np.array_equal(initial[k], server_weights[k]) for k in initial)
    for k, v in server_weights.items():
        np.testing.assert_array_equal(local_weights[k], v)
    agent.stop()


@pytest.mark.parametrize("algo", ["PPO", "DQN"])
def test_remote_mode_trains_any_algorithm(algo, results_dir):
    config = {"seed": 0, "num_envs_per_worker": 8}
    if algo == "PPO":
        agent = PPOAgent(config={**config, "train_batch_size": 400, "rollout_fragment_length": 100,
                                 "sgd_minibatch_size": 100, "num_sgd_iter": 2},
                         env="serving_test_cartpole")
    else:
        agent = DQNAgent(config={**config, "timesteps_per_iteration": 300,
                                 "learning_starts": 100}, env="serving_test_cartpole")
    worker = agent.workers.local_worker()
    assert len(worker.envs) == 1  # num_envs_per_worker is forced to 1
    stop, errors = threading.Event(), []
    players = [threading.Thread(target=play_cartpole, args=(PolicyClient(worker.env.server.url),
                                                            stop, seed, errors))
               for seed in range(2)]
    for p in players:
        p.start()
    try:
        result = [agent.train() for _ in range(2)][-1]
    finally:
        stop.set()
        agent.stop()  # the players' waiting get_action calls fail with 503 and they end
    join_players(players, errors)
    assert result["timesteps_total"] >= 2 * (400 if algo == "PPO" else 300)
    assert result["info"]["num_steps_trained"] > 0
    assert np.isfinite(result["episode_reward_mean"])


# -- (5) client errors ----------------------------------------------------------------------------
def test_policy_client_raises_the_servers_message():
    env = ServedEnv({"token": TOKEN})
    loop = PolicyServiceLoop(env, PPOTorchPolicy(OBS_SPACE, ACT_SPACE, worker_config())).start()
    try:
        client = PolicyClient(env.server.url, token=TOKEN)
        with pytest.raises(PolicyClientError, match="unknown episode 'nope'") as info:
            client.get_action("nope", [0, 0, 0])
        assert info.value.status == 404 and info.value.command == "get_action"
        eid = client.start_episode()
        with pytest.raises(PolicyClientError, match="log_returns before its first action") as info:
            client.log_returns(eid, 1.0)
        assert info.value.status == 409
        with pytest.raises(PolicyClientError, match=r"shape \[4\] does not match") as info:
            client.get_action(eid, [0.0, 0.0, 0.0, 0.0])
        assert info.value.status == 400
        assert client.get_action(eid, [0.0, 0.0, 0.0]) in (0, 1)  # float64 list is cast
        with pytest.raises(PolicyClientError, match="episode .* already started|already running"):
            client.start_episode(eid)
        client.end_episode(eid, [0.0, 0.0, 0.0])
        with pytest.raises(PolicyClientError, match="already finished") as info:
            client.end_episode(eid, [0.0, 0.0, 0.0])
        assert info.value.status == 409
        with pytest.raises(PolicyClientError, match="wrong token") as info:
            PolicyClient(env.server.url, token="other").start_episode()
        assert info.value.status == 401
        with pytest.raises(PolicyClientError, match="missing token"):
            PolicyClient(env.server.url).start_episode()
    finally:
        env.close()
        loop.stop()
    with pytest.raises(PolicyClientError, match="cannot reach|connection") as info:
        PolicyClient(env.server.url, token=TOKEN, timeout_s=5).start_episode()
    assert info.value.status is None


# -- ExternalEnv without HTTP, inference-only serving ----------------------------------------------
def test_external_env_api_contract():
    from flowrl.envs.serving import (BadRequestError, EpisodeStateError, UnavailableError,
                                     UnknownEpisodeError)
    env = ExternalEnv(OBS_SPACE, ACT_SPACE, max_concurrent_episodes=2, max_buffered_steps=3)
    eid = env.start_episode()
    assert re.fullmatch(r"[0-9a-f]{32}", eid)
    with pytest.raises(EpisodeStateError, match="already running"):
        env.start_episode(eid)
    with pytest.raises(BadRequestError, match="episode_id must be"):
        env.start_episode("has space")
    with pytest.raises(EpisodeStateError, match="log_returns before its first action"):
        env.log_returns(eid, 1.0)
    with pytest.raises(BadRequestError, match="shape"):
        env.log_action(eid, [0.0, 1.0], 0)
    with pytest.raises(BadRequestError, match="outside"):
        env.log_action(eid, [0.0, 1.0, 2.0], 2)
    env.log_action(eid, [0.0, 1.0, 2.0], 1)  # a float64 list is cast to the space's dtype
    env.log_returns(eid, 0.5)
    env.log_returns(eid, 0.25, info={"note": 1})
    env.log_action(eid, np.ones(3, np.float32), 0)
    env.log_returns(eid, 1.0)
    env.start_episode("second")
    with pytest.raises(EpisodeStateError, match="2 episodes are running"):
        env.start_episode("third")
    env.end_episode(eid, np.full(3, 2.0, np.float32), truncated=True)
    steps = env.drain_steps()
    assert [s.reward for s in steps] == [0.75, 1.0] and [s.t for s in steps] == [0, 1]
    assert [(s.terminated, s.truncated, s.episode_end) for s in steps] == \
        [(False, False, False), (False, True, True)]
    np.testing.assert_array_equal(steps[0].new_obs, np.ones(3, np.float32))
    assert env.pop_episode_stats() == [(1.75, 2)]
    for call in (lambda: env.log_returns(eid, 1.0), lambda: env.end_episode(eid, [0, 0, 0])):
        with pytest.raises(EpisodeStateError, match="already finished"):
            call()
    with pytest.raises(UnknownEpisodeError):
        env.log_returns("never", 1.0)
    for t in range(4):  # the sampler never drains: the 4th completed step is refused
        env.log_action("second", [t, 0, 0], 0)
    with pytest.raises(UnavailableError, match="wait for the sampler"):
        env.log_action("second", [9, 0, 0], 0)
    with pytest.raises(TypeError, match="ExternalEnv"):
        env.reset()
    env.close()
    with pytest.raises(UnavailableError, match="closed"):
        env.start_episode()


class CartPoleLoop(ExternalEnv):
    """A simulator running its own loop in the env's thread."""

    def __init__(self, ctx=None):
        self.sim = gym.make("CartPole-v1")
        super().__init__(self.sim.observation_space, self.sim.action_space)
        self.fail = (ctx or {}).get("fail", False)

    def run(self):
        if self.fail:
            raise ValueError("simulator crashed")
        obs, _ = self.sim.reset(seed=0)
        while not self.closed:
            eid = self.start_episode()
            while True:
                action = self.get_action(eid, obs)
                obs, reward, terminated, truncated, _ = self.sim.step(action)
                self.log_returns(eid, reward)
                if terminated or truncated:
                    self.end_episode(eid, obs, truncated=truncated and not terminated)
                    obs, _ = self.sim.reset()
                    break


def test_external_env_with_its_own_loop_trains_ppo(results_dir):
    agent = PPOAgent(config={"train_batch_size": 400, "rollout_fragment_length": 100,
                             "sgd_minibatch_size": 100, "num_sgd_iter": 2, "seed": 0},
                     env=CartPoleLoop)
    try:
        result = agent.train()
        assert result["timesteps_total"] >= 400 and result["episodes_this_iter"] > 0
    finally:
        agent.stop()


def test_a_failing_run_loop_surfaces_in_sample():
    worker = RolloutWorker(lambda ctx: CartPoleLoop({"fail": True}), PPOTorchPolicy,
                           worker_config())
    with pytest.raises(RuntimeError, match="run\\(\\) failed") as info:
        worker.sample()
    assert "simulator crashed" in repr(info.value.__cause__)
    worker.stop()


def test_serve_checkpoint_for_inference_only(tmp_path, results_dir):
    agent = PPOAgent(config={"train_batch_size": 400, "rollout_fragment_length": 50,
                             "sgd_minibatch_size": 100, "num_sgd_iter": 1, "seed": 0},
                     env="CartPole-v1")
    agent.train()
    path = agent.save(str(tmp_path / "ckpt"))
    server = serve_checkpoint(path, port=0, token=TOKEN)
    try:
        remote = PolicyClient(server.url, token=TOKEN)
        local = PolicyClient(server.url, token=TOKEN, inference_mode="local")
        obs_batch = [gym.make("CartPole-v1").reset(seed=s)[0] for s in range(5)]
        for obs in obs_batch:
            expected = agent.compute_action(obs, explore=False)
            eid = remote.start_episode(training_enabled=False)
            assert remote.get_action(eid, obs) == expected
            remote.end_episode(eid, obs)
            assert local.policy.compute_single_action(obs, explore=False) == expected
    finally:
        server.shutdown()
        agent.stop()


def test_local_mode_builds_only_flowrl_policy_classes():
    from flowrl.envs.serving.client import flowrl_policy_class
    from flowrl.policies.ppo import PPOTorchPolicy
    assert flowrl_policy_class("flowrl.policies.ppo:PPOTorchPolicy") is PPOTorchPolicy
    for named in ("os:system", "flowrl.policiesx.evil:Policy", "flowrl.policies.ppo:",
                  None, "flowrl.policies.ppo:NoSuchPolicy"):
        with pytest.raises(PolicyClientError, match="inference_mode='remote'|does not exist"):
            flowrl_policy_class(named)
