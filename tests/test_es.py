"""ES: centered ranks, antithetic sampling, the gradient estimate, observation-filter
merging, the shared noise table, actors' lifecycle, checkpoints, and learning CartPole."""

import time

import numpy as np
import pytest
import ray
import torch

from flowrl import Agent
from flowrl.envs.registry import make_env_creator
from flowrl.plans.es import (DEFAULT_CONFIG, ESAgent, ESWorker, batched_weighted_sum,
                             compute_centered_ranks, create_noise_table, es_gradient,
                             perturb)
from flowrl.policies.es import ESPolicy, MeanStdFilter, RunningStat
from flowrl.workers.es_actors import ESActorSet

# Small and quick: a 1M-float noise table, a few pairs per iteration.
SMALL = {"noise_size": 1_000_000, "episodes_per_batch": 8, "train_batch_size": 200,
         "num_evaluation_episodes": 2, "num_cpus_per_worker": 0.5, "seed": 3}


# ----------------------------------------------------------------- centered ranks
def slow_centered_ranks(x):
    """Rank i = #smaller values + #equal values earlier in row-major order."""
    flat = np.asarray(x).reshape(-1)
    n = flat.size
    ranks = np.array([sum(1 for j in range(n) if flat[j] < flat[i] or
                          (flat[j] == flat[i] and j < i)) for i in range(n)], dtype=float)
    return (ranks / (n - 1) - 0.5).reshape(np.shape(x))


@pytest.mark.parametrize("seed", range(5))
def test_centered_ranks_match_slow_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(17, 2))
    x[3, 1] = x[5, 0] = x[0, 0]  # ties
    x = np.round(x, 1)  # more ties
    y = compute_centered_ranks(x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, slow_centered_ranks(x), atol=1e-6)
    assert y.min() == pytest.approx(-0.5) and y.max() == pytest.approx(0.5)
    assert y.sum() == pytest.approx(0.0, abs=1e-5)  # centered


def test_centered_ranks_are_scale_invariant_and_handle_one_value():
    x = np.array([[1.0, 5.0], [2.0, -3.0]])
    np.testing.assert_allclose(compute_centered_ranks(x), compute_centered_ranks(1e6 * x + 7))
    assert compute_centered_ranks(np.array([[4.2]])).tolist() == [[0.0]]


# ------------------------------------------------ antithetic sampling and gradient
def test_antithetic_pairs_are_symmetric_around_theta():
    rng = np.random.default_rng(0)
    theta = rng.normal(size=50).astype(np.float32)
    eps = rng.normal(size=50).astype(np.float32)
    pos, neg = perturb(theta, eps, 0.02)
    np.testing.assert_allclose((pos + neg) / 2, theta, atol=1e-6)
    np.testing.assert_allclose((pos - neg) / 2, 0.02 * eps, atol=1e-6)


def test_gradient_matches_slow_reference_and_is_antisymmetric():
    rng = np.random.default_rng(1)
    noise = create_noise_table(10_000, seed=5)
    num_params, pairs = 37, 1203  # more pairs than one 500-row batch
    indices = rng.integers(0, len(noise) - num_params + 1, size=pairs)
    returns = rng.normal(size=(pairs, 2))
    ranks = slow_centered_ranks(returns)
    expected = sum((ranks[i, 0] - ranks[i, 1]) * noise[indices[i]:indices[i] + num_params]
                   for i in range(pairs)) / returns.size
    grad = es_gradient(returns, noise, indices, num_params)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    # Swapping the members of every pair flips the direction ...
    np.testing.assert_allclose(es_gradient(returns[:, ::-1], noise, indices, num_params),
                               -grad, rtol=1e-4, atol=1e-6)
    # ... and pairs whose members did equally well contribute nothing.
    same = np.repeat(rng.normal(size=(pairs, 1)), 2, axis=1)
    assert np.abs(es_gradient(same, noise, indices, num_params, mode="raw")).max() == 0.0
    raw = batched_weighted_sum(np.ones(3), noise, np.array([0, 10, 20]), 5)
    np.testing.assert_allclose(raw, noise[0:5] + noise[10:15] + noise[20:25], rtol=1e-6)


def test_noise_table_is_deterministic_standard_normal():
    a, b = create_noise_table(200_000, 123), create_noise_table(200_000, 123)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01


def test_worker_pairs_evaluate_theta_plus_and_minus_sigma_eps():
    """Replays each pair the worker ran: theta +/- sigma * eps(idx) from the same env
    seed give exactly the returns it reported (CartPole and argmax are deterministic)."""
    config = {**ESAgent.merge_config({"env": "CartPole-v1", **SMALL})}
    noise = create_noise_table(config["noise_size"], config["noise_seed"])
    worker = ESWorker(make_env_creator("CartPole-v1"), config, noise, 1, 0)
    policy = worker.policy
    theta = policy.get_flat_weights()
    stats = RunningStat((4,))
    stats.push(np.random.default_rng(0).normal(size=(100, 4)))
    result = worker.do_rollouts({"weights": theta, "filter": stats.to_dict()},
                                min_episodes=6, min_timesteps=0, num_eval=2)
    assert len(result.eval_returns) == 2
    assert result.returns.shape == (3, 2) and result.lengths.shape == (3, 2)
    n, sigma = policy.num_params, config["noise_stdev"]
    for k, idx in enumerate(result.noise_indices):
        eps = noise[idx:idx + n]
        for member, sign in enumerate((1, -1)):
            policy.set_flat_weights(theta + sign * sigma * eps)
            ret, length = worker.rollout(add_noise=True, env_seed=int(result.env_seeds[k]))
            assert ret == result.returns[k, member]
            assert length == result.lengths[k, member]
    # The filter stayed frozen during the call; its buffer saw every perturbed step.
    assert policy.filter.stats.count == 100
    (buffer,) = result.filter_buffers
    assert buffer["count"] == result.lengths.sum()
    worker.stop()


# ------------------------------------------------------------------------- filter
def test_filter_merge_matches_numpy_on_concatenated_data():
    rng = np.random.default_rng(2)
    chunks = [rng.normal(loc=3.0, scale=s, size=(k, 4)) for s, k in ((1, 50), (5, 7), (0.1, 300))]
    driver = MeanStdFilter((4,))
    driver.record(chunks[0])  # recording alone must not change the statistics in use
    assert driver.stats.count == 0
    driver.merge_buffer(driver.pop_buffer())
    for chunk in chunks[1:]:  # two "workers"
        worker = MeanStdFilter((4,))
        worker.set_state(driver.get_state())
        worker.record(chunk[: len(chunk) // 2])
        worker.record(chunk[len(chunk) // 2:])
        driver.merge_buffer(worker.pop_buffer())
    data = np.concatenate(chunks)
    assert driver.stats.count == len(data)
    np.testing.assert_allclose(driver.stats.mean, data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(driver.stats.var, data.var(axis=0), rtol=1e-10)
    obs = rng.normal(size=(5, 4)).astype(np.float32)
    expected = np.clip((obs - data.mean(0)) / np.sqrt(np.maximum(data.var(0), 1e-2)), -5, 5)
    np.testing.assert_allclose(driver(obs), expected, rtol=1e-5, atol=1e-5)


def test_filter_and_policy_state_load_with_weights_only(tmp_path):
    import gymnasium as gym
    env = gym.make("CartPole-v1")
    policy = ESPolicy(env.observation_space, env.action_space, {"seed": 0})
    policy.filter.merge_buffer({"count": 3, "mean": np.ones(4), "m2": np.full(4, 2.0)})
    policy.apply_es_gradient(np.ones(policy.num_params, dtype=np.float32), 0.005)
    torch.save(policy.get_state(), tmp_path / "p.pt")
    other = ESPolicy(env.observation_space, env.action_space, {"seed": 1})
    other.set_state(torch.load(tmp_path / "p.pt", weights_only=True))
    np.testing.assert_array_equal(other.get_flat_weights(), policy.get_flat_weights())
    np.testing.assert_array_equal(other.filter.stats.mean, policy.filter.stats.mean)
    assert other.optimizer.t == 1
    obs = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    np.testing.assert_array_equal(other.compute_actions(obs, explore=False)[0],
                                  policy.compute_actions(obs, explore=False)[0])


# ------------------------------------------------------------------- the agent
def test_noise_table_is_put_once_and_shared_by_all_actors(ray_session, results_dir):
    agent = ESAgent(config=SMALL, env="CartPole-v1", log_to_disk=False)
    try:
        assert agent.workers.remote_workers() == []  # no RolloutWorker actors for ES
        actors = agent.es_actors()
        assert agent.es_workers() == []  # nothing starts before the first iteration
        first = agent.train()
        ref = actors.noise_ref
        second = agent.train()
        assert actors.noise_ref is ref  # no new table per iteration
        infos = ray.get([w.noise_table_info.remote() for w in agent.es_workers()])
        assert len(infos) == 2
        for info in infos:
            assert info == {"ref": ref.hex(), "size": SMALL["noise_size"], "writeable": False}
        assert not actors.noise_table().flags.writeable  # the driver reads the store copy
        for result in (first, second):
            assert result["info"]["num_pairs"] >= SMALL["episodes_per_batch"] // 2
            assert result["timesteps_this_iter"] >= SMALL["train_batch_size"]
            assert result["info"]["eval_episodes_this_iter"] == 2
            for key in ("weights_norm", "grad_norm", "update_ratio", "episodes_so_far"):
                assert np.isfinite(result["info"][key])
        assert second["timesteps_total"] == first["timesteps_this_iter"] + \
            second["timesteps_this_iter"] == agent.metrics.get("num_steps_sampled")
        assert np.isfinite(second["episode_reward_mean"])
    finally:
        agent.stop()


def test_stop_kills_actors_and_dead_workers_are_replaced(ray_session, results_dir):
    agent = ESAgent(config=SMALL, env="CartPole-v1", log_to_disk=False)
    agent.train()
    victim = agent.es_workers()[0]
    ray.kill(victim)
    result = agent.train()  # the dead actor's share is rerun by its replacement
    assert result["info"]["num_es_actor_restarts"] == 1
    assert result["info"]["num_worker_restarts"] == 1  # ES's workers are its actors
    assert result["num_healthy_workers"] == 2
    assert result["info"]["num_pairs"] >= SMALL["episodes_per_batch"] // 2
    actors = agent.es_workers()
    agent.stop()
    # ray.kill is asynchronous: a ping sent right away may still be answered.
    for actor in actors:
        deadline = time.time() + 30
        with pytest.raises(ray.exceptions.RayActorError):
            while time.time() < deadline:
                ray.get(actor.ping.remote(), timeout=30)
                time.sleep(0.2)


def test_es_actor_deaths_beyond_the_budget_name_the_actor(ray_session, results_dir):
    from flowrl.flow.restart import ActorRestartError

    agent = ESAgent(config={**SMALL, "max_worker_restarts": 0}, env="CartPole-v1",
                    log_to_disk=False)
    try:
        agent.train()
        ray.kill(agent.es_workers()[0])
        with pytest.raises(ActorRestartError,
                           match=r"ES actor 1 \(pid \d+\) died after max_worker_restarts=0"
                           ) as info:
            agent.train()
        assert isinstance(info.value.__cause__, ray.exceptions.RayActorError)
    finally:
        agent.stop()


def test_plan_is_short_and_owns_the_actor_set():
    import inspect

    from flowrl.plans import es
    assert len(inspect.getsource(es.execution_plan).splitlines()) <= 60
    agent = ESAgent(config={**SMALL, "num_workers": 0}, env="CartPole-v1", log_to_disk=False)
    try:
        (actor_set,) = [r for r in agent.plan.owns if isinstance(r, ESActorSet)]
        assert "reporting" in agent.plan.state
        assert "ESRollouts" in repr(agent.plan) and "ESGradientStep" in repr(agent.plan)
        agent.train()
        assert len(actor_set.actors()) == 1
    finally:
        agent.stop()
    assert actor_set.actors() == []  # Agent.stop() stopped what the plan owns


def test_save_restore_gives_identical_actions(ray_session, results_dir, monkeypatch):
    agent = ESAgent(config=SMALL, env="CartPole-v1")
    for _ in range(2):
        agent.train()
    path = agent.save()
    obs = [np.random.default_rng(i).normal(scale=0.5, size=4).astype(np.float32)
           for i in range(30)]
    expected = [agent.compute_action(o, explore=False) for o in obs]
    steps = agent.metrics.get("num_steps_sampled")
    assert agent.get_policy().filter.stats.count > 0  # the filter matters for actions
    agent.stop()

    fresh = ESAgent(config=SMALL, env="CartPole-v1", log_to_disk=False)
    fresh.restore(path)
    assert [fresh.compute_action(o, explore=False) for o in obs] == expected
    assert fresh.get_policy().optimizer.t == 2
    result = fresh.train()  # training continues from the checkpoint
    assert result["training_iteration"] == 3
    assert result["timesteps_total"] == steps + result["timesteps_this_iter"]
    fresh.stop()

    from flowrl.algorithms.registry import ALGORITHMS
    monkeypatch.setitem(ALGORITHMS, "ES", "flowrl.plans.es:ESAgent")
    rebuilt = Agent.from_checkpoint(path, config_overrides={"num_workers": 0},
                                    log_to_disk=False)
    assert isinstance(rebuilt, ESAgent)
    assert [rebuilt.compute_action(o, explore=False) for o in obs] == expected
    assert rebuilt.es_workers() == []  # acting needs no noise table and no actors
    rebuilt.stop()


def test_local_mode_runs_in_process_and_box_actions():
    agent = ESAgent(config={**SMALL, "num_workers": 0}, env="Pendulum-v1", log_to_disk=False)
    try:
        result = agent.train()
        (worker,) = agent.es_workers()
        assert isinstance(worker, ESWorker)
        assert result["info"]["num_pairs"] >= 4
        action = agent.compute_action(np.zeros(3, dtype=np.float32))
        assert action.shape == (1,) and -2.0 <= float(action[0]) <= 2.0
    finally:
        agent.stop()


def test_bad_configs_fail_before_any_actor_starts():
    with pytest.raises(ValueError, match="return_proc_mode"):
        ESAgent(config={"return_proc_mode": "rank", "num_workers": 0}, env="CartPole-v1")
    with pytest.raises(ValueError, match="noise_size"):
        ESAgent(config={"noise_size": 10, "num_workers": 0}, env="CartPole-v1")
    with pytest.raises(ValueError, match="noise_stdev"):
        ESAgent(config={"noise_stdev": 0.0, "num_workers": 0}, env="CartPole-v1")
    with pytest.raises(ValueError, match="num_evaluation_episodes"):
        ESAgent(config={"num_evaluation_episodes": 0, "num_workers": 0}, env="CartPole-v1")


# ------------------------------------------------------------------------ learning
@pytest.mark.learning
def test_es_cartpole_reaches_150(ray_session):
    """Default config, 2 ES actors: mean evaluation return >= 150, all env steps counted
    (evaluation included). Seeds 0-2: 13.3k, 18.1k, 13.3k steps, 3-5 s a seed."""
    from learning_bars import assert_learns
    assert_learns("ES", {}, 150, 26_000, typical=13_300)


def test_default_config_is_complete():
    assert set(DEFAULT_CONFIG) >= {"num_workers", "episodes_per_batch", "train_batch_size",
                                   "noise_stdev", "stepsize", "l2_coeff", "noise_size",
                                   "eval_prob", "report_length", "observation_filter",
                                   "action_noise_std", "return_proc_mode",
                                   "num_evaluation_episodes"}
