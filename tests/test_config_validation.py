"""Every class of bad config is one clear error, raised before any actor (or Ray) starts.

All cases run in one fresh subprocess that asks for remote workers: if any check came
after the workers, Ray would have started there.
"""

import json
import subprocess
import sys
import textwrap

import pytest

CASES = [
    # unknown keys, top level and nested, with a did-you-mean
    ("PPO", {"num_worker": 2}, "Unknown config key 'num_worker'. Did you mean 'num_workers'?"),
    ("PPO", {"model": {"fcnet_hidden": [32]}},
     "Unknown config key 'model.fcnet_hidden' in 'model'. Did you mean 'fcnet_hiddens'?"),
    ("DQN", {"evaluation_config": {"explor": False}}, "Did you mean 'explore'?"),
    ("APEX", {"prioritized_replay_alpah": 0.5}, "Did you mean 'prioritized_replay_alpha'?"),
    # wrong types
    ("PPO", {"lr": "fast"}, "'lr' has value 'fast' of type str; expected float"),
    ("A2C", {"num_envs_per_worker": 2.5}, "'num_envs_per_worker' has value 2.5 of type float"),
    ("PPO", {"model": {"fcnet_hiddens": 64}}, "'model.fcnet_hiddens' has value 64 of type int"),
    ("DQN", {"double_q": "yes"}, "'double_q' has value 'yes' of type str; expected bool"),
    ("PPO", {"num_workers": "two"}, "'num_workers' has value 'two' of type str; expected int"),
    ("APEX", {"num_workers": "two"}, "'num_workers' has value 'two'; expected a number or "
                                     "'auto'"),
    # out-of-range values
    ("PPO", {"gamma": 1.5}, "gamma=1.5 must be in [0, 1]."),
    ("PG", {"lr": -0.1}, "lr=-0.1 must be >= 0."),
    ("A2C", {"rollout_fragment_length": 0}, "rollout_fragment_length=0 must be >= 1."),
    ("PPO", {"num_workers": -1}, "num_workers=-1 must be >= 0."),
    ("PPO", {"evaluation_interval": 0}, "evaluation_interval=0 must be None or an int >= 1."),
    ("PPO", {"grad_clip": 0.0}, "grad_clip=0.0 must be None (off) or > 0."),
    ("PPO", {"num_cpus_per_worker": 0, "num_workers": 2}, "num_cpus_per_worker=0 must be > 0"),
    ("DQN", {"n_step": 0}, "n_step=0 must be >= 1."),
    ("PPO", {"clip_param": 0}, "clip_param=0 must be > 0."),
    ("PPO", {"batch_mode": "whole"}, "batch_mode='whole'; expected 'truncate_episodes' or "
                                     "'complete_episodes'"),
    # incompatible combinations
    ("PPO", {"sgd_minibatch_size": 512, "train_batch_size": 256},
     "sgd_minibatch_size=512 must be <= train_batch_size=256"),
    ("DQN", {"buffer_size": 10, "train_batch_size": 32}, "buffer_size"),
    # unknown names: algorithm, env, callbacks
    ("PPO", {"env": "CartPol-v1"}, "Unknown env 'CartPol-v1'"),
    ("PPO", {"callbacks": "no.such.module.Callbacks"}, "no.such.module.Callbacks"),
]

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from flowrl import get_agent_class
    out = []
    for algo, config, _ in json.loads(sys.argv[1]):
        config = {"env": "CartPole-v1", "num_workers": 2, **config}
        try:
            agent = get_agent_class(algo)(config=config, log_to_disk=False)
            agent.stop()
            out.append(None)
        except (ValueError, TypeError, ImportError) as e:
            out.append(f"{type(e).__name__}: {e}")
    print(json.dumps({"errors": out, "ray_started": ray.is_initialized()}))
""")


@pytest.fixture(scope="module")
def outcome():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_bad_config_starts_ray_or_an_actor(outcome):
    assert outcome["ray_started"] is False


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{a}-{next(iter(c))}" for a, c, _ in CASES])
def test_bad_config_message(outcome, index):
    algo, config, expected = CASES[index]
    error = outcome["errors"][index]
    assert error is not None, f"{algo} accepted {config}"
    assert expected in error, error
    assert "\n" not in error.split(". Valid keys:")[0]  # the message leads with one line


ONE_CPU_SCRIPT = textwrap.dedent("""
    import json, ray
    from flowrl import get_agent_class
    from flowrl.algorithms.trainable import get_trainable_class
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    small = {"env": "CartPole-v1", "learning_starts": 100, "timesteps_per_iteration": 200,
             "buffer_size": 5000, "train_batch_size": 32, "min_iter_time_s": 0, "seed": 0}
    out = {"ppo_per_worker": get_agent_class("PPO").merge_config(
        {"env": "CartPole-v1", "num_workers": 2})["num_cpus_per_worker"]}
    agent = get_agent_class("APEX")(config=small, log_to_disk=False)  # all four "auto"
    try:
        out["resolved"] = {k: agent.config[k] for k in (
            "num_workers", "num_cpus_per_worker", "num_replay_buffer_shards", "num_gpus")}
        result = agent.train()
        out["healthy"] = result["num_healthy_workers"]
        out["steps"] = result["timesteps_total"]
    finally:
        agent.stop()
    trainable = get_trainable_class("APEX")
    try:
        trainable.default_resource_request(small)
        out["tune_error"] = None
    except ValueError as e:
        out["tune_error"] = str(e)
    bundles = trainable.default_resource_request(
        {**small, "num_cpus_for_driver": 0.5}).bundles
    out["tune_cpus_with_half_driver"] = sum(b.get("CPU", 0) for b in bundles)
    print(json.dumps(out))
""")


def test_auto_resources_on_a_one_cpu_cluster_run_or_name_the_shortfall():
    """1 CPU, all of it the driver's: "auto" used to give num_cpus_per_worker=0, which
    validation rejects. Now the workers share the CPU and the Agent trains; a Tune trial,
    which reserves the driver's CPU too, gets one error naming the CPUs asked and had."""
    proc = subprocess.run([sys.executable, "-c", ONE_CPU_SCRIPT], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ppo_per_worker"] == 0.5  # an explicit num_workers: 2 fits too
    assert out["resolved"] == {"num_workers": 2, "num_cpus_per_worker": 0.5,
                               "num_replay_buffer_shards": 1, "num_gpus": 0}
    assert out["healthy"] == 2 and out["steps"] >= 200  # both workers ran
    assert out["tune_error"].startswith("The APEX trial")
    assert "asks for 2 CPUs, but the Ray cluster has 1" in out["tune_error"]
    # Lowering num_cpus_for_driver (named in the error) fits: 0.5 + 2 workers x 0.25.
    assert out["tune_cpus_with_half_driver"] == 1
