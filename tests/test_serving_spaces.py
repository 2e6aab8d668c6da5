"""Serving and rollouts with nested spaces: Dict / Tuple observations, masked
observations, and MultiDiscrete / Tuple / Dict actions.

Real HTTP on loopback, real policies, real gymnasium envs written here; no mocks.
"""

from __future__ import annotations

import http.client
import json
import re
import threading

import gymnasium as gym
import numpy as np
import pytest

from flowrl.cli.rollout import rollout_main
from flowrl.data.sample_batch import SampleBatch
from flowrl.envs import register_env
from flowrl.envs.serving import ExternalEnv, PolicyClient, PolicyClientError, PolicyServer
from flowrl.envs.serving.wire import (check_space_supported, decode_reply_value, decode_value,
                                      encode_array, encode_batch, encode_value,
                                      space_from_json, space_to_json, unbatch_value)
from flowrl.plans.ppo import PPOAgent
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.workers import RolloutWorker
from flowrl.workers.external_sampler import ExternalEnvSampler

Box, Discrete, Dict, Tuple = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.Dict,
                              gym.spaces.Tuple)
SMALL = {"fcnet_hiddens": [16]}

DICT_OBS = Dict({"pos": Box(-1, 1, (2,), np.float32), "mode": Discrete(3)})
#: The first part of every action (its Discrete part) names a mode of DICT_OBS.
ACTION_SPACES = {
    "discrete": Discrete(3),
    "multidiscrete": gym.spaces.MultiDiscrete([3, 2]),
    "tuple": Tuple([Discrete(3), Box(-1, 1, (2,), np.float32)]),
    "dict": Dict({"move": Discrete(3), "force": Box(-1, 1, (2,), np.float32)}),
}
NUM_MASKED_ACTIONS = 6
MASKED_OBS = Dict({"action_mask": Box(0, 1, (NUM_MASKED_ACTIONS,), np.int8),
                   "observations": Box(-1, 1, (3,), np.float32)})


def chosen_mode(kind: str, action) -> int:
    """The mode an action of ``ACTION_SPACES[kind]`` picks."""
    if kind == "discrete":
        return int(action)
    if kind == "dict":
        return int(action["move"])
    return int(action[0])


class DictGame(gym.Env):
    """Dict observations; reward 1 when the action picks the observation's mode.

    ``env_config["actions"]`` names the action space (a key of ACTION_SPACES). Actions
    outside the space fail the step, so a rollout proves every action fits.
    """

    def __init__(self, config=None):
        config = config or {}
        self.kind = config.get("actions", "discrete")
        self.observation_space = DICT_OBS
        self.action_space = ACTION_SPACES[self.kind]
        self.max_steps = int(config.get("max_steps", 15))

    def _observe(self):
        self.mode = int(self.np_random.integers(3))
        return {"pos": self.np_random.uniform(-1, 1, 2).astype(np.float32), "mode": self.mode}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        reward = float(chosen_mode(self.kind, action) == self.mode)
        self.t += 1
        return self._observe(), reward, False, self.t >= self.max_steps, {}


class MaskedGame(gym.Env):
    """A masked observation whose mask changes every step (one to three legal actions);
    an illegal action fails the step."""

    observation_space = MASKED_OBS
    action_space = Discrete(NUM_MASKED_ACTIONS)

    def __init__(self, config=None):
        self.max_steps = int((config or {}).get("max_steps", 25))

    def _observe(self):
        self.mask = np.zeros(NUM_MASKED_ACTIONS, np.int8)
        legal = self.np_random.choice(NUM_MASKED_ACTIONS, int(self.np_random.integers(1, 4)),
                                      replace=False)
        self.mask[legal] = 1
        return {"action_mask": self.mask.copy(),
                "observations": self.np_random.uniform(-1, 1, 3).astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def step(self, action):
        if self.mask[int(action)] != 1:
            raise ValueError(f"illegal action {action} under mask {self.mask.tolist()}")
        self.t += 1
        return self._observe(), 1.0, False, self.t >= self.max_steps, {}


register_env("serving_spaces_dict_game", lambda ctx: DictGame(ctx))
register_env("serving_spaces_masked_game", lambda ctx: MaskedGame(ctx))


class ServedEnv(ExternalEnv):
    """An ExternalEnv behind a PolicyServer on a free loopback port."""

    def __init__(self, observation_space, action_space):
        super().__init__(observation_space, action_space)
        self.server = PolicyServer(self, port=0).start()


def served_worker(observation_space, action_space) -> RolloutWorker:
    """A RolloutWorker with a PPO policy sampling a served ExternalEnv."""
    config = PPOAgent.merge_config({"num_workers": 0, "rollout_fragment_length": 50,
                                    "seed": 0, "model": SMALL})
    worker = RolloutWorker(lambda ctx: ServedEnv(observation_space, action_space),
                           PPOTorchPolicy, config)
    assert isinstance(worker.sampler, ExternalEnvSampler)
    return worker


def serve_while(worker: RolloutWorker, threads: list[threading.Thread]) -> SampleBatch:
    """Runs ``threads`` (clients) while the worker's sampler answers them; returns all
    steps sampled."""
    for t in threads:
        t.start()
    batches = []
    while any(t.is_alive() for t in threads):
        batches.append(worker.sampler.sample(timeout_s=0.2))
    batches.append(worker.sampler.sample(timeout_s=0.3))
    for t in threads:
        t.join()
    return SampleBatch.concat_samples([b for b in batches if b.count])


def assert_same_value(a, b, where: str = "value") -> None:
    """Nested dicts / tuples with equal leaves (ints and arrays alike)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, a, b)
        for key in a:
            assert_same_value(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_value(x, y, f"{where}[{i}]")
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def rows_of(batch: SampleBatch, worker: RolloutWorker, episode_id: str) -> np.ndarray:
    """Row indexes of one episode's steps in ``batch``, in step order."""
    rows = np.flatnonzero(batch[SampleBatch.EPS_ID] == worker.env.eps_id_of(episode_id))
    return rows[np.argsort(batch[SampleBatch.T][rows], kind="stable")]


def post(port: int, body: dict) -> tuple[int, dict]:
    """One raw JSON request; ``(status, reply)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# -- the wire format --------------------------------------------------------------------------
NESTED_SPACE = Dict({
    "z_image": Box(0, 255, (4, 4, 3), np.uint8),
    "a_pos": Box(-np.inf, np.inf, (2,), np.float64),
    "inner": Tuple([Discrete(4, start=-1), gym.spaces.MultiDiscrete([2, 5]),
                    Dict({"flags": gym.spaces.MultiBinary(3)})]),
})


def test_nested_spaces_and_values_round_trip_json():
    described = json.loads(json.dumps(space_to_json(NESTED_SPACE)))
    assert described["type"] == "Dict" and described["spaces"]["inner"]["type"] == "Tuple"
    rebuilt = space_from_json(described)
    assert rebuilt == NESTED_SPACE
    assert list(rebuilt.spaces) == list(NESTED_SPACE.spaces)  # the key order travels
    ordered = Dict([("z", Discrete(2)), ("a", Discrete(2))])  # not sorted
    assert list(space_from_json(json.loads(json.dumps(space_to_json(ordered)))).spaces) == \
        ["z", "a"]

    NESTED_SPACE.seed(0)
    values = [NESTED_SPACE.sample() for _ in range(4)]
    for value in values:
        wire = json.loads(json.dumps(encode_value(NESTED_SPACE, value)))
        assert isinstance(wire, dict) and isinstance(wire["inner"], list)
        assert isinstance(wire["inner"][0], int)  # a Discrete part is a plain integer
        decoded = decode_value(NESTED_SPACE, wire, "observation")
        assert isinstance(decoded["inner"], tuple)
        assert_same_value(decoded, decode_reply_value(NESTED_SPACE, wire))
        assert NESTED_SPACE.contains(decoded)
        assert_same_value({k: value[k] for k in decoded}, decoded)
    # batched (log_experience): one array per leaf with a leading row dimension
    batch = json.loads(json.dumps(encode_batch(NESTED_SPACE, values)))
    assert batch["z_image"]["shape"] == [4, 4, 4, 3] and batch["inner"][0]["shape"] == [4]
    rows = unbatch_value(NESTED_SPACE, decode_value(NESTED_SPACE, batch, "obs", batched=True))
    assert len(rows) == 4
    for value, row in zip(values, rows):
        assert_same_value({k: value[k] for k in row}, row)

    with pytest.raises(TypeError, match=r"observation space\['inner'\]\[1\] Text"):
        check_space_supported(Dict({"inner": Tuple([Discrete(2), gym.spaces.Text(5)])}),
                              "observation space")


# -- Dict observations over HTTP, each kind of action ---------------------------------------------
@pytest.mark.parametrize("kind", sorted(ACTION_SPACES))
def test_dict_observations_and_nested_actions_over_http(kind):
    action_space = ACTION_SPACES[kind]
    worker = served_worker(DICT_OBS, action_space)
    layout = worker.get_policy().action_layout
    url = worker.env.server.url
    sent: dict[str, dict] = {}
    failures: list = []

    def play(c: int) -> None:
        try:
            client = PolicyClient(url)
            env = DictGame({"actions": kind, "max_steps": 12})
            env.action_space.seed(c)
            for e in range(2):
                eid = client.start_episode(f"c{c}-e{e}")
                obs, _ = env.reset(seed=10 * c + e)
                record = sent[eid] = {"obs": [], "actions": [], "logged": []}
                for t in range(env.max_steps):
                    record["obs"].append(obs)
                    if t % 4 == 3:  # the simulator's own choice, logged
                        action = env.action_space.sample()
                        client.log_action(eid, obs, action)
                    else:
                        action = client.get_action(eid, obs)
                        assert env.action_space.contains(action), action
                    record["actions"].append(action)
                    record["logged"].append(t % 4 == 3)
                    obs, reward, _, truncated, _ = env.step(action)
                    client.log_returns(eid, reward)
                    if truncated:
                        client.end_episode(eid, obs, truncated=True)
                        record["end"] = obs
                        break
        except Exception as error:  # reported by the main thread
            failures.append(error)

    batch = serve_while(worker, [threading.Thread(target=play, args=(c,)) for c in range(2)])
    try:
        assert not failures, failures
        assert batch.count == 2 * 2 * 12
        obs = batch[SampleBatch.OBS]
        assert obs.dtype.names == ("mode", "pos")  # records, one field per key
        assert obs["pos"].dtype == np.float32 and obs["pos"].shape == (batch.count, 2)
        assert batch[SampleBatch.ACTIONS].dtype == layout.dtype
        assert np.all(np.isfinite(batch[SampleBatch.ACTION_LOGP]))
        for eid, record in sent.items():
            rows = rows_of(batch, worker, eid)
            assert len(rows) == len(record["obs"])
            for i, row in enumerate(rows):  # what the client sent is what was stored
                assert int(obs["mode"][row]) == record["obs"][i]["mode"]
                np.testing.assert_array_equal(obs["pos"][row], record["obs"][i]["pos"])
                new_obs = record["obs"][i + 1] if i + 1 < len(rows) else record["end"]
                np.testing.assert_array_equal(batch[SampleBatch.NEW_OBS]["pos"][row],
                                              new_obs["pos"])
                stored = batch[SampleBatch.ACTIONS][row]
                action = record["actions"][i]
                if record["logged"][i]:  # logged actions become the policy's batch rows
                    np.testing.assert_array_equal(stored, layout.from_env(action))
                else:  # the client got the stored row as the env takes it (clipped)
                    assert_same_value(layout.to_env(stored, clip=True), action)
    finally:
        worker.stop()


def test_local_inference_client_ships_nested_steps():
    kind = "tuple"
    worker = served_worker(DICT_OBS, ACTION_SPACES[kind])
    layout = worker.get_policy().action_layout
    sent: dict = {}
    failures: list = []

    def play() -> None:
        try:
            client = PolicyClient(worker.env.server.url, inference_mode="local",
                                  max_piece_steps=5)
            assert client.policy.obs_packer.nested
            env = DictGame({"actions": kind, "max_steps": 13})
            eid = client.start_episode("local-0")
            obs, _ = env.reset(seed=3)
            sent["obs"], sent["actions"] = [], []
            while True:
                action = client.get_action(eid, obs)
                assert env.action_space.contains(action), action
                sent["obs"].append(obs)
                sent["actions"].append(action)
                obs, reward, _, truncated, _ = env.step(action)
                client.log_returns(eid, reward)
                if truncated:
                    client.end_episode(eid, obs, truncated=True)
                    break
        except Exception as error:  # reported by the main thread
            failures.append(error)

    batch = serve_while(worker, [threading.Thread(target=play)])
    try:
        assert not failures, failures
        rows = rows_of(batch, worker, "local-0")
        assert len(rows) == 13  # shipped in pieces of 5, then the rest at the end
        for i, row in enumerate(rows):
            assert int(batch[SampleBatch.OBS]["mode"][row]) == sent["obs"][i]["mode"]
            # the Box part was clipped for the env only; the row keeps what was sampled
            assert_same_value(layout.to_env(batch[SampleBatch.ACTIONS][row], clip=True),
                              sent["actions"][i])
        assert batch[SampleBatch.TRUNCATEDS][rows[-1]]
        assert np.all(np.isfinite(batch[SampleBatch.ACTION_LOGP]))
    finally:
        worker.stop()


# -- masked observations --------------------------------------------------------------------------
def test_masked_actions_are_never_returned():
    worker = served_worker(MASKED_OBS, Discrete(NUM_MASKED_ACTIONS))
    failures: list = []
    played = []

    def play(c: int) -> None:
        try:
            client = PolicyClient(worker.env.server.url)
            env = MaskedGame({"max_steps": 50})
            for e in range(2):
                eid = client.start_episode()
                obs, _ = env.reset(seed=100 * c + e)
                while True:
                    action = client.get_action(eid, obs)  # explores: samples the policy
                    played.append((obs["action_mask"], action))
                    obs, reward, _, truncated, _ = env.step(action)  # fails if illegal
                    client.log_returns(eid, reward)
                    if truncated:
                        client.end_episode(eid, obs, truncated=True)
                        break
        except Exception as error:  # reported by the main thread
            failures.append(error)

    batch = serve_while(worker, [threading.Thread(target=play, args=(c,)) for c in range(2)])
    try:
        assert not failures, failures
        assert len(played) == 200
        assert all(mask[action] == 1 for mask, action in played)
        assert len({action for _, action in played}) == NUM_MASKED_ACTIONS  # not one fixed
        masks = batch[SampleBatch.OBS]["action_mask"]
        actions = batch[SampleBatch.ACTIONS]
        assert batch.count == 200 and np.all(masks[np.arange(batch.count), actions] == 1)
        assert np.all(np.isfinite(batch[SampleBatch.ACTION_LOGP]))
    finally:
        worker.stop()


# -- bad nested input ------------------------------------------------------------------------------
def test_bad_nested_inputs_get_400_naming_the_field():
    action_space = ACTION_SPACES["tuple"]
    worker = served_worker(DICT_OBS, action_space)
    port = worker.env.server.port
    pos = encode_array(np.zeros(2, np.float32))
    good = {"pos": pos, "mode": 1}
    good_action = [2, encode_array(np.zeros(2, np.float32))]
    try:
        status, reply = post(port, {"command": "start_episode", "episode_id": "bad-inputs"})
        assert status == 200
        cases = [
            ({"pos": pos}, r"observation: missing key\(s\) \['mode'\]"),
            ({**good, "speed": 1}, r"observation: unknown key\(s\) \['speed'\]"),
            ({**good, "pos": encode_array(np.zeros(3, np.float32))},
             r"observation\['pos'\]: shape \[3\] does not match"),
            ({**good, "pos": encode_array(np.zeros(2, np.float64))},
             r"observation\['pos'\]: dtype float64"),
            ({**good, "pos": encode_array(np.array([np.nan, 0], np.float32))},
             r"observation\['pos'\]: NaN"),
            ({**good, "mode": 7}, r"observation\['mode'\]: 7 is outside Discrete\(3\)"),
            ({**good, "mode": 1.5}, r"observation\['mode'\]: expected an array object"),
            ({**good, "mode": 10 ** 40}, r"observation\['mode'\]: .* is outside"),
            (pos, r"observation: missing key\(s\)"),
            ([pos, 1], r"observation: expected an object with the keys \['mode', 'pos'\]"),
        ]
        for observation, message in cases:
            status, reply = post(port, {"command": "get_action", "episode_id": "bad-inputs",
                                        "observation": observation})
            assert status == 400, (observation, reply)
            assert re.search(message, reply["error"]), (message, reply["error"])
        action_cases = [
            ([2], r"action: expected 2 values \(one per part of the Tuple space\), got 1"),
            ({"0": 2}, r"action: expected a list of 2 values"),
            ([3, good_action[1]], r"action\[0\]: 3 is outside Discrete\(3\)"),
            ([2, encode_array(np.zeros(2, np.int64))], r"action\[1\]: dtype int64"),
        ]
        for action, message in action_cases:
            status, reply = post(port, {"command": "log_action", "episode_id": "bad-inputs",
                                        "observation": good, "action": action})
            assert status == 400 and re.search(message, reply["error"]), (action, reply)
        # batched: every part needs the same number of rows
        episode = {"episode_id": "piece", "rewards": [0.0, 0.0],
                   "observations": {"pos": encode_array(np.zeros((2, 2), np.float32)),
                                    "mode": encode_array(np.zeros(3, np.int64))},
                   "actions": encode_batch(action_space, [action_space.sample()] * 2)}
        status, reply = post(port, {"command": "log_experience", "episodes": [episode]})
        assert status == 400
        assert re.search(r"episodes\[0\]\.observations: every part .* \['mode'\] has 3, "
                         r".*\['pos'\] has 2", reply["error"]), reply
        # the same messages reach PolicyClient users, and the episode is still usable
        client = PolicyClient(worker.env.server.url)
        with pytest.raises(PolicyClientError, match=r"observation\['pos'\]") as info:
            client.log_action("bad-inputs", {"pos": np.zeros(4), "mode": 0}, (0, np.zeros(2)))
        assert info.value.status == 400
        client.log_action("bad-inputs", {"pos": [0.5, 0.5], "mode": 2}, (1, [0.0, 0.0]))
        client.end_episode("bad-inputs", {"pos": [0.5, 0.5], "mode": 0})
        steps = worker.sampler.sample(timeout_s=0.3)
        assert steps.count == 1 and int(steps[SampleBatch.OBS]["mode"][0]) == 2
    finally:
        worker.stop()


# -- rollout.py on nested spaces -----------------------------------------------------------------
ROLLOUT_CASES = {
    **{f"dict-{kind}": ("serving_spaces_dict_game", {"actions": kind}) for kind in ACTION_SPACES},
    "masked": ("serving_spaces_masked_game", {}),
}


@pytest.mark.parametrize("case", sorted(ROLLOUT_CASES))
def test_rollout_of_a_ppo_checkpoint_on_nested_spaces(case, tmp_path, results_dir, capsys):
    env_name, env_config = ROLLOUT_CASES[case]
    agent = PPOAgent(config={"train_batch_size": 200, "rollout_fragment_length": 100,
                             "sgd_minibatch_size": 100, "num_sgd_iter": 1, "seed": 0,
                             "model": SMALL, "env_config": env_config}, env=env_name)
    try:
        agent.train()
        checkpoint = agent.save(str(tmp_path / "checkpoint_000001"))
    finally:
        agent.stop()
    out = tmp_path / "episodes.npz"
    # --explore samples the policy: with a mask, illegal actions would fail the env's step
    assert rollout_main([checkpoint, "--episodes", "2", "--no-render", "--explore",
                         "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Episode 2:" in text, text
    saved = np.load(out)  # records, no pickled objects
    n = int(saved["episode_lengths"].sum())
    env = (MaskedGame if env_name.endswith("masked_game") else DictGame)(env_config)
    obs, actions = saved["obs"], saved["actions"]
    assert obs.shape == (n,) and obs.dtype.names == tuple(env.observation_space.spaces)
    if case == "masked":
        assert obs["action_mask"].shape == (n, NUM_MASKED_ACTIONS)
        assert np.all(obs["action_mask"][np.arange(n), actions] == 1)
        return
    assert obs["pos"].shape == (n, 2) and obs["mode"].dtype == np.int64
    kind = env_config["actions"]
    if kind in ("tuple", "dict"):  # nested actions are records too, Box parts clipped
        force = actions["1"] if kind == "tuple" else actions["force"]
        assert actions.shape == (n,) and force.shape == (n, 2)
        assert np.all(np.abs(force) <= 1)
    else:
        assert actions.shape == (n, *env.action_space.shape) and actions.dtype == np.int64
