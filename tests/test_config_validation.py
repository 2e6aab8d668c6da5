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
