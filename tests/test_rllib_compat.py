"""Coming from RLlib: what RLlib 0.x-2.x code and configs get in flowrl.

``framework``, renamed keys (an error naming flowrl's key), the deprecated
``agent.optimizer`` evaluator API, full ``DEFAULT_CONFIG`` dicts, custom models
registered in the driver and used by remote workers and Tune trials, and RLlib's docs
snippet.
"""

import importlib
import re
import sys
import warnings

import numpy as np
import pytest
import ray
import torch
from ray import tune

import flowrl  # noqa: F401  (registers the trainables)
from flowrl import get_agent_class, register_custom_model
from flowrl.algorithms.config import COMMON_CONFIG, RENAMED_KEYS
from flowrl.algorithms.registry import ALGORITHMS

# Workers and trial processes cannot import this test module: classes go by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAST_PPO = {"train_batch_size": 256, "rollout_fragment_length": 64,
            "sgd_minibatch_size": 64, "num_sgd_iter": 1}


def merge_error(algo: str, config: dict) -> str:
    with pytest.raises(ValueError) as info:
        get_agent_class(algo).merge_config({"env": "CartPole-v1", **config})
    return str(info.value)


# -- framework ---------------------------------------------------------------------------
def test_framework_torch_is_accepted():
    config = get_agent_class("PPO").merge_config({"env": "CartPole-v1",
                                                   "framework": "torch"})
    assert config["framework"] == "torch"


@pytest.mark.parametrize("framework", ["tf", "tf2", "tfe", "jax", "pytorch"])
def test_other_frameworks_are_rejected_naming_torch(framework):
    message = merge_error("PPO", {"framework": framework})
    assert f"framework={framework!r}" in message and '"framework": "torch"' in message


# -- renamed keys ------------------------------------------------------------------------
@pytest.mark.parametrize("algo, config, new", [
    ("PPO", {"sgd_stepsize": 0.01}, "'lr'"),
    ("ES", {"sgd_stepsize": 0.01}, "'stepsize'"),        # ES's step size has its own key
    ("PPO", {"sgd_batchsize": 64}, "'sgd_minibatch_size'"),
    ("PPO", {"timesteps_per_batch": 4000}, "'train_batch_size'"),
    ("DQN", {"sample_batch_size": 4}, "'rollout_fragment_length'"),
    ("PPO", {"gpu": 1}, "'num_gpus'"),
    ("PPO", {"use_gpu_for_workers": True}, "'num_gpus_per_worker'"),
    ("PPO", {"multiagent": {"policy_graphs": {}}}, "'multiagent.policies'"),
    ("PPO", {"model": {"custom_options": {"size": 3}}}, "'model.custom_model_config'"),
    ("PPO", {"model": {"lstm_use_prev_action_reward": True}}, "model.lstm_use_prev_reward"),
    ("APEX", {"optimizer": {"num_replay_buffer_shards": 2}}, "num_replay_buffer_shards"),
    ("PPO", {"use_pytorch": True}, "'framework'"),
    ("PPO", {"eager": True}, "'framework'"),
    ("PPO", {"record_env": True}, "'monitor'"),
    ("PPO", {"min_sample_timesteps_per_iteration": 1000}, "'timesteps_per_iteration'"),
    ("PPO", {"min_time_s_per_iteration": 5}, "'min_iter_time_s'"),
    ("PPO", {"metrics_num_episodes_for_smoothing": 5}, "'metrics_smoothing_episodes'"),
    ("PPO", {"evaluation_duration": 5}, "'evaluation_num_episodes'"),
    ("PPO", {"num_rollout_workers": 2}, "'num_workers'"),
    ("PPO", {"num_env_runners": 2}, "'num_workers'"),
    ("PPO", {"evaluation_num_env_runners": 2}, "'evaluation_num_workers'"),
    ("PPO", {"num_epochs": 5}, "'num_sgd_iter'"),
    ("DQN", {"num_steps_sampled_before_learning_starts": 100}, "'learning_starts'"),
    ("PPO", {"evaluation_config": {"sgd_stepsize": 0.1}}, "'lr'"),
])
def test_renamed_key_error_names_the_new_key(algo, config, new):
    message = merge_error(algo, config)
    assert new in message, message
    assert "Did you mean" not in message  # the closest-spelling guess is not offered


def test_sgd_stepsize_is_lr_not_the_closest_spelling():
    message = merge_error("PPO", {"sgd_stepsize": 0.01})
    assert message.startswith("Config key 'sgd_stepsize'")
    assert 'write {"lr": 0.01}' in message and "sgd_minibatch_size" not in message


def test_unknown_keys_without_a_rename_still_get_the_closest_match():
    assert "Did you mean 'num_sgd_iter'?" in merge_error("PPO", {"num_sgd_iters": 3})
    assert "Did you mean 'lr'?" in merge_error("PPO", {"lrr": 0.1})


def test_every_rename_names_flowrl_key_or_says_what_to_do():
    for old, renamed in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        config: dict = {leaf: 1}
        for parent in reversed(parents):
            config = {parent: config}
        for algo in ("PPO", "APEX", "ES", "DQN"):
            base = get_agent_class(algo).merge_config({"env": "CartPole-v1"})
            message = merge_error(algo, config)
            assert f"{old!r}" in message, (algo, old, message)
            has = [new for new in renamed.new
                   if new.rpartition(".")[2] in (base.get(new.partition(".")[0], {})
                                                 if "." in new else base)]
            expected = repr(has[0]) if has else (repr(renamed.new[0]) if renamed.new
                                                 else renamed.note)
            assert expected in message, (algo, old, message)


def test_renamed_keys_are_no_flowrl_keys():
    # A key flowrl knows is never looked up in the table: such an entry would be dead.
    for name in ALGORITHMS:
        known = get_agent_class(name).merge_config({"env": "CartPole-v1"})
        for old in RENAMED_KEYS:
            section, _, leaf = old.rpartition(".")
            keys = known[section] if section else known
            assert leaf not in keys, (name, old)


# -- DEFAULT_CONFIG ----------------------------------------------------------------------
def test_ppo_default_config_is_the_full_config():
    from flowrl.plans import ppo
    assert ppo.DEFAULT_CONFIG["model"]["fcnet_hiddens"] == COMMON_CONFIG["model"]["fcnet_hiddens"]
    assert ppo.DEFAULT_CONFIG["num_sgd_iter"] == 10 and ppo.DEFAULT_CONFIG["lr"] == 3e-4
    config = ppo.DEFAULT_CONFIG.copy()
    config["model"] = {**config["model"], "fcnet_hiddens": [32]}
    assert get_agent_class("PPO").merge_config(config)["model"]["fcnet_hiddens"] == [32]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_plan_module_exposes_the_merged_config(name):
    module_name, _, class_name = ALGORITHMS[name].partition(":")
    module = importlib.import_module(module_name)
    agent_cls = getattr(module, class_name)
    assert set(COMMON_CONFIG) <= set(module.DEFAULT_CONFIG), \
        sorted(set(COMMON_CONFIG) - set(module.DEFAULT_CONFIG))
    assert set(module.DEFAULT_CONFIG["model"]) >= set(COMMON_CONFIG["model"])
    # The algorithm's own defaults are unchanged by exposing the full dict.
    merged = agent_cls.merge_config({})
    for key, value in module.DEFAULT_CONFIG.items():
        if key != "callbacks" and value != "auto":  # "auto" resolves for this machine
            assert merged[key] == value, key


# -- agent.optimizer ---------------------------------------------------------------------
def test_optimizer_evaluator_aliases_warn_once_and_work(ray_session):
    from flowrl.workers.worker_set import DeprecatedOptimizerAliases
    DeprecatedOptimizerAliases._warned.clear()  # "once per process": start afresh
    agent = get_agent_class("PPO")(env="CartPole-v1", config={**FAST_PPO, "num_workers": 1},
                                   log_to_disk=False)
    try:
        calls = {
            "foreach_worker(fn)": lambda: agent.optimizer.foreach_evaluator(
                lambda w: w.worker_index),
            "foreach_worker_with_index(fn)": lambda: agent.optimizer.foreach_evaluator_with_index(
                lambda w, i: (w.worker_index, i)),
            "local_worker()": lambda: agent.optimizer.local_evaluator,
            "remote_workers()": lambda: agent.optimizer.remote_evaluators,
        }
        results = {}
        for new, call in calls.items():
            with pytest.warns(DeprecationWarning, match=re.escape(f"agent.workers.{new}")):
                results[new] = call()
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                call()  # the second use stays quiet
        assert results["foreach_worker(fn)"] == agent.workers.foreach_worker(
            lambda w: w.worker_index) == [0, 1]
        assert results["foreach_worker_with_index(fn)"] == [(0, 0), (1, 1)]
        assert results["local_worker()"] is agent.workers.local_worker()
        assert results["remote_workers()"] == agent.workers.remote_workers()
    finally:
        agent.stop()


# -- custom models registered in the driver ---------------------------------------------
class CompatTinyModel(torch.nn.Module):
    """A linear policy and value head; registered by name below."""

    def __init__(self, obs_space, action_space, num_outputs, model_config):
        super().__init__()
        self.net = torch.nn.Linear(int(np.prod(obs_space.shape)), num_outputs + 1)

    def forward(self, obs):
        out = self.net(obs.float())
        return out[:, :-1], out[:, -1]


def _registered_model() -> str:
    register_custom_model("compat_tiny_model", CompatTinyModel)
    return "compat_tiny_model"


def test_registered_model_is_found_in_remote_workers(ray_session):
    name = _registered_model()
    agent = get_agent_class("PPO")(
        env="CartPole-v1", log_to_disk=False,
        config={**FAST_PPO, "num_workers": 1, "model": {"custom_model": name}})
    try:
        models = agent.workers.foreach_worker(
            lambda w: (type(w.get_policy().model).__name__, __import__("os").getpid()))
        assert [m for m, _ in models] == ["CompatTinyModel"] * 2
        assert models[0][1] != models[1][1]  # the second one is another process
        assert agent.train()["timesteps_total"] >= 256
    finally:
        agent.stop()


def test_registered_model_is_found_in_tune_trials(ray_session, tmp_path):
    name = _registered_model()
    trials = tune.run_experiments(
        {"compat_model": {"run": "PPO", "env": "CartPole-v1",
                          "stop": {"training_iteration": 1}, "storage_path": str(tmp_path),
                          "config": {**FAST_PPO, "num_workers": 1,
                                     "model": {"custom_model": name}}}},
        verbose=0, raise_on_failed_trial=False)
    (trial,) = trials
    assert trial.status == "TERMINATED", open(trial.error_file).read() \
        if trial.error_file else trial.status
    assert trial.last_result["timesteps_total"] >= 256


# -- RLlib's docs snippet ------------------------------------------------------------------
def test_rllib_docs_snippet_stops_with_a_message_naming_lr(ray_session, tmp_path,
                                                           monkeypatch):
    import gymnasium as gym
    assert "CartPole-v0" in gym.registry  # gymnasium 1.x still has it: only the key fails
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/ray_results of the snippet
    with pytest.raises(ValueError, match=r"'sgd_stepsize'.*flowrl calls it 'lr'"):
        tune.run_experiments({
            "my_experiment": {
                "run": "PPO",
                "env": "CartPole-v0",
                "stop": {"episode_reward_mean": 200},
                "config": {
                    "num_workers": 1,
                    "sgd_stepsize": tune.grid_search([0.01, 0.001, 0.0001]),
                },
            },
        })


# -- --callbacks: Tune logger callbacks from the command line ---------------------------
CALLBACK_FILE = '''
import json

from ray import tune


class ResultRecorder(tune.Callback):
    """Appends one JSON line per trial result to ``path``."""

    def __init__(self, path, tag=""):
        self.path, self.tag = path, tag

    def on_trial_result(self, iteration, trials, trial, result, **info):
        with open(self.path, "a") as f:
            f.write(json.dumps({"tag": self.tag,
                                "iteration": result["training_iteration"],
                                "timesteps": result["timesteps_total"]}) + "\\n")
'''


def run_train(*args, timeout=300):
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "scripts", "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=root)


def test_cli_callbacks_by_file_path_with_json_kwargs_see_every_result(tmp_path):
    import json
    (tmp_path / "my_callbacks.py").write_text(CALLBACK_FILE)
    seen = tmp_path / "seen.jsonl"
    kwargs = json.dumps({"path": str(seen), "tag": "from-cli"})
    out = run_train("--run", "PPO", "--env", "CartPole-v1", "--stop", '{"training_iteration": 2}',
                    "--config", json.dumps({**FAST_PPO, "num_envs_per_worker": 1}),
                    "--local-dir", str(tmp_path / "results"), "--ray-num-cpus", "2",
                    "--callbacks", f"{tmp_path / 'my_callbacks.py'}:ResultRecorder={kwargs}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2]
    assert {line["tag"] for line in lines} == {"from-cli"}
    assert lines[-1]["timesteps"] == 512
    # flowrl's own result files are still written next to it.
    (trial_dir,) = [d for d in (tmp_path / "results" / "PPO").iterdir() if d.is_dir()]
    assert (trial_dir / "result.json").is_file()


@pytest.mark.parametrize("value, message", [
    ("flowrl.algorithms.config:COMMON_CONFIG", "not a ray.tune.Callback subclass"),
    ("no_module_here:Logger", "cannot import 'no_module_here'"),
    ("ray.tune.logger:JsonLoggerCallback={not json}", "must be a JSON object"),
])
def test_cli_bad_callbacks_fail_before_tune_starts(value, message):
    out = run_train("--run", "PPO", "--env", "CartPole-v1", "--callbacks", value, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
