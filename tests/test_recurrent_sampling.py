"""Recurrent policies sampled outside VectorSampler: the multi-agent sampler and serving.

Memory envs: an agent sees a cue (+1 / -1) only at its first step and is rewarded at
its last step for an action that matches the cue, so the state has something to
carry. The checks are deterministic: every row's ``state_in`` is the ``state_out`` of
the agent's (episode's) previous row, the initial state at its start, and the
recorded ``state_out`` is what the policy computes from the row's inputs. Real envs,
real policies, real HTTP on loopback.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import defaultdict

import gymnasium as gym
import numpy as np
import ray

from flowrl import register_env
from flowrl.data.sample_batch import SampleBatch
from flowrl.data.sequences import PREV_ACTIONS, PREV_REWARDS, state_in_key, state_out_key
from flowrl.envs.multi_agent import ALL, MultiAgentEnv
from flowrl.envs.serving import ExternalEnv, PolicyClient, PolicyServer
from flowrl.plans.ppo import PPOAgent
from flowrl.policies.ppo import PPOTorchPolicy
from flowrl.workers import RolloutWorker
from flowrl.workers.multi_agent_sampler import MultiAgentSampler

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LSTM = {"use_lstm": True, "lstm_cell_size": 8, "fcnet_hiddens": [16], "max_seq_len": 4,
        "lstm_use_prev_action": True, "lstm_use_prev_reward": True}
CUE_SPACE = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)   # [cue, first step?]
EPISODE_LEN = 7


def cue_obs(cue: float, first: bool) -> np.ndarray:
    return np.array([cue if first else 0.0, float(first)], np.float32)


class RecordingPPO(PPOTorchPolicy):
    """PPO that keeps a copy of every trajectory it postprocesses (with its
    ``state_out_*`` columns, which postprocessing drops)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[SampleBatch] = []

    def postprocess_trajectory(self, batch: SampleBatch) -> SampleBatch:
        self.seen.append(batch.copy())
        return super().postprocess_trajectory(batch)


def rows_by_trajectory(pieces: list[SampleBatch]) -> dict[tuple, list[dict]]:
    """``{(eps_id, agent_index): rows sorted by t}``; each row remembers its piece."""
    rows = defaultdict(list)
    for p, piece in enumerate(pieces):
        for i in range(piece.count):
            row = {k: np.asarray(v[i]) for k, v in piece.items()}
            row["piece"] = p
            rows[(int(row[SampleBatch.EPS_ID]), int(row[SampleBatch.AGENT_INDEX]))].append(row)
    return {key: sorted(r, key=lambda row: int(row[SampleBatch.T])) for key, r in rows.items()}


def check_chains(policy: PPOTorchPolicy, pieces: list[SampleBatch]) -> dict[tuple, list[dict]]:
    """Asserts the state flow of every trajectory in ``pieces``; returns the rows."""
    initial = policy.get_initial_state()
    parts = range(len(initial))
    trajectories = rows_by_trajectory(pieces)
    for key, rows in trajectories.items():
        ts = [int(r[SampleBatch.T]) for r in rows]
        assert ts == list(range(ts[0], ts[0] + len(rows))), (key, ts)
        first = rows[0]
        for p in parts:
            np.testing.assert_array_equal(first[state_in_key(p)], initial[p], err_msg=str(key))
        assert first[PREV_ACTIONS] == 0 and first[PREV_REWARDS] == 0.0
        for before, after in zip(rows, rows[1:]):
            for p in parts:
                np.testing.assert_array_equal(after[state_in_key(p)], before[state_out_key(p)],
                                              err_msg=f"{key} t={int(after[SampleBatch.T])}")
            assert after[PREV_ACTIONS] == before[SampleBatch.ACTIONS]
            assert after[PREV_REWARDS] == np.float32(before[SampleBatch.REWARDS])
    # The recorded state_out is the policy's own step from the row's inputs.
    batch = SampleBatch.concat_samples(pieces)
    _, extras = policy.compute_actions(
        batch[SampleBatch.OBS], explore=False,
        state=[batch[state_in_key(p)] for p in parts],
        prev_actions=batch[PREV_ACTIONS], prev_rewards=batch[PREV_REWARDS])
    for p in parts:
        np.testing.assert_allclose(extras[state_out_key(p)], batch[state_out_key(p)],
                                   rtol=1e-5, atol=1e-6)
        assert np.abs(batch[state_out_key(p)]).max() > 1e-3  # a state worth carrying
    return trajectories


# -- (a) multi-agent -----------------------------------------------------------------------------
class CuePairEnv(MultiAgentEnv):
    """Agent "a" acts at env steps 0..6, agent "b" joins at step 2; each sees its own
    cue at its first step and is rewarded at step 6 for an action matching it."""

    possible_agents = ["a", "b"]
    observation_spaces = {"a": CUE_SPACE, "b": CUE_SPACE}
    action_spaces = {"a": gym.spaces.Discrete(2), "b": gym.spaces.Discrete(2)}

    def __init__(self, config=None):
        self.rng = np.random.default_rng(0)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t = 0
        self.cues = {a: float(self.rng.choice([-1.0, 1.0])) for a in self.possible_agents}
        return {"a": cue_obs(self.cues["a"], True)}, {}

    def step(self, actions):
        self.t += 1
        last = self.t == EPISODE_LEN
        rewards = {a: float(last and int(act) == int(self.cues[a] > 0))
                   for a, act in actions.items()}
        obs = {a: cue_obs(self.cues[a], False) for a in actions}
        if self.t == 2:
            obs["b"] = cue_obs(self.cues["b"], True)
        terms = {a: last for a in actions}
        terms[ALL] = last
        truncs = {a: False for a in actions}
        truncs[ALL] = False
        return obs, rewards, terms, truncs, {}


register_env("cue_pair", lambda ctx: CuePairEnv(ctx))


def ppo_config(**overrides) -> dict:
    return PPOAgent.merge_config({"model": LSTM, "seed": 0, **overrides})


def test_multi_agent_state_per_agent_resets_at_starts_and_carries_across_fragments():
    envs = [CuePairEnv(), CuePairEnv()]
    policy = RecordingPPO(CUE_SPACE, gym.spaces.Discrete(2), ppo_config())
    sampler = MultiAgentSampler(envs, {"shared": policy}, lambda agent: "shared",
                                fragment_length=3, seeds=[0, 1])
    batches = [sampler.sample() for _ in range(8)]   # 24 steps per env: 3+ episodes each
    trajectories = check_chains(policy, policy.seen)
    # Two agents on one policy in two envs, several episodes each.
    by_agent = defaultdict(list)
    for (eps_id, agent_index), rows in trajectories.items():
        by_agent[agent_index].append(rows)
    assert set(by_agent) == {0, 1} and min(len(v) for v in by_agent.values()) >= 4
    # "b" appears at step 2 and starts from the initial state there (checked above).
    assert all(int(rows[0][SampleBatch.T]) == 2 for rows in by_agent[1])
    # Whole agent-episodes of 7 and 5 rows, cut into pieces of at most 3 steps: the
    # state crossed fragment boundaries.
    whole = [rows for rows in trajectories.values() if rows[-1][SampleBatch.TERMINATEDS]
             and int(rows[0][SampleBatch.T]) in (0, 2)]
    assert whole and all(len(r) == EPISODE_LEN - int(r[0][SampleBatch.T]) for r in whole)
    assert any(a["piece"] != b["piece"] for rows in whole for a, b in zip(rows, rows[1:]))
    # Postprocessing bootstrapped from state_out and dropped it; state_in stays.
    shared = SampleBatch.concat_samples([b.policy_batches["shared"] for b in batches])
    assert not [k for k in shared if k.startswith("state_out_")]
    assert {state_in_key(0), state_in_key(1), PREV_ACTIONS, PREV_REWARDS} <= set(shared)
    stats = policy.learn_on_batch(shared)
    assert np.isfinite(stats["total_loss"])


def test_ppo_trains_a_recurrent_policy_shared_by_two_agents(results_dir):
    agent = PPOAgent(env="cue_pair", config={
        "model": LSTM, "seed": 0, "num_envs_per_worker": 2, "rollout_fragment_length": 16,
        "train_batch_size": 128, "sgd_minibatch_size": 32, "num_sgd_iter": 2,
        "multiagent": {"policies": ["shared"]}})
    try:
        for _ in range(2):
            result = agent.train()
        assert "shared" in result["info"]["learner"]
        assert np.isfinite(result["info"]["learner"]["shared"]["total_loss"])
        assert result["episodes_total"] > 0
    finally:
        agent.stop()


# -- (b) serving ---------------------------------------------------------------------------------
class ServedCueEnv(ExternalEnv):
    """An ExternalEnv of cue observations behind a PolicyServer on a free port."""

    def __init__(self, ctx=None):
        super().__init__(CUE_SPACE, gym.spaces.Discrete(2))
        self.server = PolicyServer(self, port=0).start()


register_env("served_cue", lambda ctx: ServedCueEnv(ctx))


def play_interleaved(client: PolicyClient, errors: list, pairs: int | None = None,
                     stop: threading.Event | None = None, check=None) -> list:
    """Plays ``pairs`` pairs of episodes (or pairs until ``stop``), the two of a pair
    step by step in turn, with opposite cues; the first episode logs its own action at
    step 3. Then an episode that is not trained on mixes in a logged action.
    ``check(eid, history)`` runs after every step. Returns the pairs' episode ids."""
    played = []
    try:
        for p in itertools.count():
            if p == pairs or (stop is not None and stop.is_set()):
                break
            cues = {client.start_episode(f"pair{p}-A"): 1.0,
                    client.start_episode(f"pair{p}-B"): -1.0}
            history = {eid: [] for eid in cues}
            for t in range(EPISODE_LEN):
                for k, (eid, cue) in enumerate(cues.items()):
                    obs = cue_obs(cue, t == 0)
                    if k == 0 and t == 3:
                        action = 1
                        client.log_action(eid, obs, action)
                    else:
                        action = client.get_action(eid, obs)
                    reward = float(t == EPISODE_LEN - 1 and action == int(cue > 0)) + 0.25 * k
                    client.log_returns(eid, reward)
                    history[eid].append((obs, int(action), reward))
                    if check is not None:
                        check(eid, history[eid])
            for eid, cue in cues.items():
                client.end_episode(eid, cue_obs(cue, False))
            played.append(list(cues))
        untrained = client.start_episode(training_enabled=False)
        client.log_action(untrained, cue_obs(1.0, True), 0)
        client.get_action(untrained, cue_obs(1.0, False))
        client.end_episode(untrained, cue_obs(1.0, False))
    except Exception as error:  # reported by the main thread
        errors.append(error)
    return played


def test_server_keeps_the_state_per_episode_and_the_batches_train():
    worker = RolloutWorker(lambda ctx: ServedCueEnv(ctx), RecordingPPO,
                           ppo_config(env="served_cue", num_workers=0,
                                      rollout_fragment_length=5))
    env, policy = worker.env, worker.policy_map["default_policy"]
    errors: list = []
    played: list = []
    client = PolicyClient(env.server.url)
    thread = threading.Thread(target=lambda: played.extend(play_interleaved(client, errors, 3)))
    thread.start()
    batches = []
    while thread.is_alive():
        batches.append(worker.sampler.sample(timeout_s=0.1))
    batches.append(worker.sampler.sample(timeout_s=0.3))
    assert not errors, errors
    trajectories = check_chains(policy, policy.seen)
    # Every trained episode is whole, its steps chained across several fragments.
    assert len(trajectories) == 6
    by_eps = {env.eps_id_of(eid): eid for pair in played for eid in pair}
    for (eps_id, _), rows in trajectories.items():
        assert len(rows) == EPISODE_LEN and rows[-1][SampleBatch.TERMINATEDS], by_eps[eps_id]
        assert len({r["piece"] for r in rows}) > 1
    # The two episodes of a pair ran interleaved with opposite cues: separate states.
    for a_id, b_id in played:
        rows_a = trajectories[(env.eps_id_of(a_id), 0)]
        rows_b = trajectories[(env.eps_id_of(b_id), 0)]
        assert not np.allclose(rows_a[1][state_in_key(0)], rows_b[1][state_in_key(0)])
        # The logged action (step 3 of A) is a row like the others, in the chain.
        assert int(rows_a[3][SampleBatch.ACTIONS]) == 1
    # Ended episodes, trained on or not, freed their state.
    assert worker.sampler.service.num_episode_states == 0
    batch = SampleBatch.concat_samples([b for b in batches if b.count])
    assert batch.count == 6 * EPISODE_LEN and "state_in_0" in batch
    assert not [k for k in batch if k.startswith("state_out_")]
    stats = worker.learn_on_batch(batch)
    assert np.isfinite(stats["default_policy"]["total_loss"])
    worker.stop()


def test_local_inference_client_keeps_the_state_per_episode(results_dir):
    agent = PPOAgent(env="served_cue", config={
        "model": LSTM, "seed": 0, "rollout_fragment_length": 20, "train_batch_size": 80,
        "sgd_minibatch_size": 20, "num_sgd_iter": 2})
    server_env = agent.workers.local_worker().env
    client = PolicyClient(server_env.server.url, inference_mode="local",
                          update_interval_s=1e9)   # fixed weights: the states can be redone
    local = client.policy
    num_parts = len(local.get_initial_state())
    mismatches: list = []

    def check(eid: str, history: list) -> None:
        # The state the client will continue from, redone step by step on this
        # episode's own observations alone (its interleaved twin must not leak in).
        state, prev_action, prev_reward = None, np.zeros(1, np.int64), np.zeros(1, np.float32)
        for obs, action, reward in history:
            _, extras = local.compute_actions(obs[None], explore=False, state=state,
                                              prev_actions=prev_action, prev_rewards=prev_reward)
            state = [extras[state_out_key(p)] for p in range(num_parts)]
            prev_action, prev_reward = np.array([action]), np.array([reward], np.float32)
        kept = client.episode_state(eid)
        if not all(np.allclose(k, s[0], atol=1e-6) for k, s in zip(kept, state)):
            mismatches.append((eid, len(history)))

    errors: list = []
    stop = threading.Event()
    thread = threading.Thread(target=play_interleaved,
                              kwargs={"client": client, "errors": errors, "stop": stop,
                                      "check": check})
    thread.start()
    try:
        results = [agent.train() for _ in range(2)]
    finally:
        stop.set()
        thread.join(timeout=60)
    try:
        assert not errors, errors
        assert not mismatches, mismatches
        assert results[-1]["info"]["num_steps_trained"] > 0
        assert np.isfinite(results[-1]["info"]["learner"]["default_policy"]["total_loss"])
        assert len(client.episode_state(client.start_episode())) == 2   # [h, c] of the LSTM
    finally:
        agent.stop()
