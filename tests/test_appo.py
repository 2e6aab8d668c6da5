"""APPO: the loss against a slow per-sample reference, the target network's update
cadence in the plan's operators, state and checkpoint round trips, learning CartPole."""

from __future__ import annotations

import io
import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.data.items import TrainedBatch
from flowrl.data.sample_batch import SampleBatch
from flowrl.envs import make_env_creator
from flowrl.flow import Metrics
from flowrl.ops import CountTrainedSteps, UpdateTargetNetwork
from flowrl.plans.appo import APPOAgent
from flowrl.policies.appo import APPOTorchPolicy
from flowrl.policies.impala import split_pieces, vtrace
from flowrl.workers import RolloutWorker, WorkerSet


def make_config(**overrides: Any) -> dict:
    return APPOAgent.merge_config({"env": "CartPole-v1", "num_envs_per_worker": 2,
                                   "rollout_fragment_length": 40, "seed": 0, **overrides})


def make_worker(worker_index: int = 0, **overrides: Any) -> RolloutWorker:
    return RolloutWorker(make_env_creator("CartPole-v1"), APPOTorchPolicy,
                         make_config(**overrides), worker_index=worker_index, num_workers=2)


def target_weights(policy: APPOTorchPolicy) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in policy.target_model.state_dict().items()}


def model_weights(policy: APPOTorchPolicy) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in policy.model.state_dict().items()}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def three_policy_batch(**overrides: Any) -> tuple[SampleBatch, APPOTorchPolicy]:
    """A batch from a behaviour worker ``mu`` and a learner whose target ``pi_target``
    (one update past ``mu``) and current ``pi`` (two more updates) all differ."""
    actor = make_worker(1, **overrides)
    learner = make_worker(0, **overrides)
    learner.set_weights(actor.get_weights())
    policy = learner.get_policy()
    batches = [actor.sample() for _ in range(4)]
    policy.learn_on_batch(batches[0])
    policy.update_target()
    for b in batches[1:3]:
        policy.learn_on_batch(b)
    return SampleBatch.concat_samples(batches), policy


# ------------------------------------------------------------------ the loss
def reference_loss(policy: APPOTorchPolicy, batch: SampleBatch) -> dict[str, float]:
    """The APPO loss one row at a time: each row's own forward passes through the
    current and the target network, V-trace per piece with IMPALA's tested
    :func:`vtrace`, the clipped surrogate and the categorical KL in Python floats."""
    cfg = policy.config
    clip = cfg["clip_param"]
    logp, tlogp, values, entropy, kl = [], [], [], [], []
    with torch.no_grad():
        for i in range(batch.count):
            obs = torch.as_tensor(batch[SampleBatch.OBS][i : i + 1])
            action = int(batch[SampleBatch.ACTIONS][i])
            logits, value = policy.model(obs)
            target_logits, _ = policy.target_model(obs)
            log_p = torch.log_softmax(logits[0].double(), 0)
            log_q = torch.log_softmax(target_logits[0].double(), 0)
            logp.append(float(log_p[action]))
            tlogp.append(float(log_q[action]))
            values.append(float(value[0]))
            entropy.append(-float((log_p.exp() * log_p).sum()))
            kl.append(float((log_q.exp() * (log_q - log_p)).sum()))  # KL(pi_target || pi)
    logp, tlogp, values = np.array(logp), np.array(tlogp), np.array(values)
    vs, adv = np.zeros(batch.count), np.zeros(batch.count)
    for start, length in zip(*split_pieces(batch)):
        rows = slice(start, start + length)
        terminated = batch[SampleBatch.TERMINATEDS][rows].astype(np.float64)
        last_new_obs = batch[SampleBatch.NEW_OBS][start + length - 1 : start + length]
        boot = 0.0 if terminated[-1] else float(policy.value(last_new_obs)[0])
        piece_vs, piece_adv = vtrace(
            torch.tensor(batch[SampleBatch.ACTION_LOGP][rows], dtype=torch.float64)[None],
            torch.tensor(tlogp[rows])[None],  # V-trace's target policy is pi_target
            torch.tensor(batch[SampleBatch.REWARDS][rows], dtype=torch.float64)[None],
            torch.tensor(values[rows])[None],
            torch.tensor([boot], dtype=torch.float64),
            torch.tensor(cfg["gamma"] * (1.0 - terminated))[None],
            clip_rho=cfg["vtrace_clip_rho_threshold"],
            clip_pg_rho=cfg["vtrace_clip_pg_rho_threshold"],
            clip_c=cfg["vtrace_clip_c_threshold"],
            lambda_=cfg["vtrace_lambda"],
        )
        vs[rows], adv[rows] = piece_vs[0].numpy(), piece_adv[0].numpy()
    surrogate, clipped = [], 0
    for i in range(batch.count):
        ratio = math.exp(logp[i] - tlogp[i])
        surrogate.append(min(ratio * adv[i], min(max(ratio, 1 - clip), 1 + clip) * adv[i]))
        clipped += abs(ratio - 1.0) > clip
    policy_loss = -float(np.mean(surrogate))
    vf_loss = 0.5 * float(np.mean((vs - values) ** 2))
    total = (policy_loss + cfg["vf_loss_coeff"] * vf_loss
             - cfg["entropy_coeff"] * float(np.mean(entropy)))
    if cfg["use_kl_loss"]:
        total += policy.kl_coeff * float(np.mean(kl))
    return {"policy_loss": policy_loss, "vf_loss": vf_loss, "entropy": float(np.mean(entropy)),
            "kl": float(np.mean(kl)), "clip_frac": clipped / batch.count, "total_loss": total}


@pytest.mark.parametrize("overrides", [
    {"lr": 3e-3},                                                   # defaults: clip 0.4, no KL
    {"lr": 3e-3, "clip_param": 0.01, "use_kl_loss": True, "kl_coeff": 0.7,
     "vtrace_clip_rho_threshold": 0.9, "vtrace_clip_pg_rho_threshold": 0.95,
     "vtrace_lambda": 0.8},
])
def test_loss_matches_per_sample_reference(overrides):
    batch, policy = three_policy_batch(**overrides)
    stats = policy.evaluate_loss(batch)
    assert stats["kl"] > 1e-6 and stats["mean_is_ratio"] != pytest.approx(1.0, abs=1e-5)
    if overrides.get("clip_param", 0.4) < 0.1:
        assert 0.0 < stats["clip_frac"] < 1.0  # both branches of the min are used
    for key, value in reference_loss(policy, batch).items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_only_the_current_network_learns():
    batch, policy = three_policy_batch(lr=3e-3)
    before = target_weights(policy)
    stats = policy.learn_on_batch(batch)
    assert same(target_weights(policy), before) and not same(model_weights(policy), before)
    assert {"policy_loss", "vf_loss", "entropy", "kl", "clip_frac", "mean_ratio",
            "mean_rho", "cur_kl_coeff", "num_target_syncs"} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    policy.update_target()
    assert same(target_weights(policy), model_weights(policy))
    assert policy.evaluate_loss(batch)["kl"] == pytest.approx(0.0, abs=1e-7)


def test_kl_coeff_adapts_only_with_use_kl_loss():
    space, actions = gym.spaces.Box(-1.0, 1.0, (3,), np.float32), gym.spaces.Discrete(2)
    fixed = APPOTorchPolicy(space, actions, {"kl_coeff": 1.0, "kl_target": 0.01})
    assert fixed.update_kl(1.0) == 1.0
    adaptive = APPOTorchPolicy(space, actions, {"use_kl_loss": True, "kl_coeff": 1.0,
                                                "kl_target": 0.01})
    assert adaptive.update_kl(0.05) == 1.5 and adaptive.update_kl(0.001) == 0.75
    assert adaptive.update_kl(0.01) == 0.75


def test_config_errors():
    with pytest.raises(ValueError, match="clip_param"):
        APPOAgent.merge_config({"env": "CartPole-v1", "clip_param": 0.0})
    with pytest.raises(ValueError, match="num_workers"):
        APPOAgent.merge_config({"env": "CartPole-v1", "num_workers": 0})
    space, actions = gym.spaces.Box(-1.0, 1.0, (3,), np.float32), gym.spaces.Discrete(2)
    with pytest.raises(ValueError, match="IMPALA"):
        APPOTorchPolicy(space, actions, {"model": {"use_lstm": True}})


# ------------------------------------------------------------------ target cadence
def test_target_updates_every_target_update_frequency_trained_steps():
    """The plan's learner branch, driven by hand: CountTrainedSteps then
    UpdateTargetNetwork(by_steps_trained) on each learner result."""
    # Only the local worker (the learner): APPO's validation wants remote ones.
    config = {**make_config(num_envs_per_worker=1, rollout_fragment_length=70), "num_workers": 0}
    workers = WorkerSet(make_env_creator("CartPole-v1"), APPOTorchPolicy, config)
    local, metrics = workers.local_worker(), Metrics()
    policy = local.get_policy()
    ops = [CountTrainedSteps(metrics), UpdateTargetNetwork(workers, metrics, 200,
                                                           by_steps_trained=True)]
    trained, last_sync, expected_syncs = 0, 0, 0
    synced = target_weights(policy)
    for _ in range(12):
        batch = local.sample()
        item = TrainedBatch(batch, local.learn_on_batch(batch), None)
        for op in ops:
            item = op(item)
        trained += batch.count
        if trained - last_sync >= 200:
            last_sync, expected_syncs = trained, expected_syncs + 1
            assert same(target_weights(policy), model_weights(policy))  # just copied
            synced = target_weights(policy)
        else:
            assert same(target_weights(policy), synced)  # frozen in between
            assert not same(target_weights(policy), model_weights(policy))
    assert expected_syncs >= 3
    assert metrics.get("num_target_updates") == expected_syncs == policy.num_target_syncs
    assert metrics.get("last_target_update_ts") == last_sync
    assert metrics.get("num_steps_trained") == trained


# ------------------------------------------------------------------ state
def test_state_round_trip_includes_target_network():
    batch, a = three_policy_batch(lr=3e-3, use_kl_loss=True)
    a.update_kl(1.0)  # kl_coeff moves off its initial value
    assert not same(target_weights(a), model_weights(a))
    buffer = io.BytesIO()
    torch.save(a.get_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    env = gym.make("CartPole-v1")
    b = APPOTorchPolicy(env.observation_space, env.action_space,
                        make_config(lr=3e-3, use_kl_loss=True, seed=123))
    b.set_state(state)
    assert same(target_weights(b), target_weights(a)) and same(model_weights(b), model_weights(a))
    assert b.kl_coeff == a.kl_coeff == 1.5 and b.num_target_syncs == a.num_target_syncs == 1
    # Same networks, optimizer state and kl_coeff: the next update is identical.
    assert a.learn_on_batch(batch) == b.learn_on_batch(batch)
    assert same(model_weights(b), model_weights(a))
    # A state without a target (e.g. from IMPALA) starts the target at the network.
    del state["target_weights"]
    b.set_state(state)
    assert same(target_weights(b), model_weights(b))


def test_agent_counts_target_updates_and_checkpoints_the_target(ray_session, tmp_path):
    config = {"num_workers": 1, "num_cpus_per_worker": 0.5, "min_iter_time_s": 0,
              "train_batch_size": 100, "timesteps_per_iteration": 600,
              "target_update_frequency": 200, "seed": 0}
    agent = APPOAgent(config=config, env="CartPole-v1", log_to_disk=False)
    try:
        for _ in range(2):
            result = agent.train()
        info = result["info"]
        assert info["num_target_updates"] >= 1
        assert 0 < info["last_target_update_ts"] <= info["num_steps_trained"]
        policy = agent.get_policy()
        path = agent.save(str(tmp_path / "ckpt"))
        # No target update runs between train() calls: the checkpoint holds this target.
        saved_target = target_weights(policy)
        assert policy.num_target_syncs == info["num_target_updates"]
    finally:
        agent.stop()
    restored = APPOAgent.from_checkpoint(str(path))
    try:
        assert same(target_weights(restored.get_policy()), saved_target)
        assert restored.train()["info"]["num_target_updates"] >= info["num_target_updates"]
    finally:
        restored.stop()

# APPO's learning bar is cartpole-appo.yaml's, checked in test_learning.py.
