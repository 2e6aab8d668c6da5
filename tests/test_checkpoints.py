"""Checkpoints that survive a killed driver, errors for damaged ones, and a resume that
continues counters, optimizer state and random streams."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from flowrl import Agent, get_agent_class
from flowrl.algorithms.checkpoint import MANIFEST_FILE, read_manifest

DQN_SMALL = {"learning_starts": 100, "timesteps_per_iteration": 200, "seed": 3,
             "checkpoint_replay_buffer": True, "buffer_size": 50000}

PROBES = [[0.0, 0.0, 0.0, 0.0], [0.1, -0.3, 0.05, 0.4], [-0.1, 0.2, -0.05, -0.4]]

# Saves a checkpoint, trains on, then overwrites it and stops itself (SIGSTOP) at a
# named point inside that second write, found with a profile hook on the real calls:
#   "replay":   replay.pt of the new checkpoint is open and still empty;
#   "manifest": everything but the manifest is written to the temporary sibling;
#   "renames":  the old checkpoint is moved aside, the new one not yet moved in.
KILL_MID_SAVE = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    import torch
    from flowrl import get_agent_class
    from flowrl.algorithms import checkpoint
    path, where = sys.argv[1], sys.argv[2]
    agent = get_agent_class("DQN")(config={config}, env="CartPole-v1", log_to_disk=False)
    for _ in range(2):
        agent.train()
    agent.save(path)
    weights = agent.get_policy().get_weights()
    print(json.dumps({{
        "iteration": agent.iteration,
        "steps": agent.metrics.get("num_steps_sampled"),
        "replay_size": agent.plan.state["replay"].buffers[0].stats()["size"],
        "weights_sum": float(sum(np.abs(v).sum() for v in weights.values())),
        "actions": [int(agent.compute_action(np.array(o, np.float32), explore=False))
                    for o in {probes}]}}), flush=True)
    agent.train()
    renames = []

    def stop(event, frame, arg):
        if where == "replay" and event == "call" and frame.f_code is torch.save.__code__:
            hit = getattr(frame.f_locals.get("f"), "name", "").endswith("replay.pt")
        elif where == "manifest" and event == "call" and \\
                frame.f_code is checkpoint._write_json.__code__:
            hit = frame.f_locals["path"].endswith(checkpoint.MANIFEST_FILE)
        elif where == "renames" and event == "c_call" and arg is os.rename:
            renames.append(1)
            hit = len(renames) == 2  # the first one moved the old checkpoint aside
        else:
            return
        if hit:
            sys.setprofile(None)
            print("stopped", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # the test kills it here

    sys.setprofile(lambda frame, event, arg: stop(event, frame, arg))
    agent.save(path)
    sys.setprofile(None)
    print("the save finished: the stop point was never reached", flush=True)
""")


def hidden_siblings(parent, kind):
    return [os.path.join(parent, e) for e in os.listdir(parent)
            if e.startswith(f".checkpoint.{kind}-")]


@pytest.mark.parametrize("where", ["replay", "manifest", "renames"])
def test_sigkill_mid_overwrite_keeps_the_previous_checkpoint_loadable(tmp_path, where):
    script = tmp_path / "kill_mid_save.py"
    script.write_text(KILL_MID_SAVE.format(config=repr(DQN_SMALL), probes=repr(PROBES)))
    parent = tmp_path / "ckpts"
    path = str(parent / "checkpoint")
    child = subprocess.Popen([sys.executable, str(script), path, where],
                             stdout=subprocess.PIPE, text=True)
    try:
        saved = json.loads(child.stdout.readline())
        assert child.stdout.readline().strip() == "stopped"
        # Wait until the child really is stopped at that point, then look at the disk.
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        (tmp,) = hidden_siblings(parent, "tmp")
        assert os.path.getsize(os.path.join(tmp, "policies", "default_policy.pt")) > 0
        if where == "replay":
            assert os.path.getsize(os.path.join(tmp, "replay.pt")) == 0  # mid-write
        if where in ("replay", "manifest"):
            assert not os.path.exists(os.path.join(tmp, MANIFEST_FILE))
            assert read_manifest(path)["iteration"] == 2  # the old one, still in place
        else:  # between the renames: no checkpoint at the path at all
            assert not os.path.exists(path)
            assert read_manifest(tmp)["iteration"] == 3  # the new one is whole, not in
            (old,) = hidden_siblings(parent, "old")
            assert read_manifest(old)["iteration"] == 2
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    agent = Agent.from_checkpoint(path, config_overrides={"seed": 1})
    try:
        # Exactly the checkpoint written before the killed overwrite.
        assert agent.iteration == saved["iteration"] == 2
        assert agent.metrics.get("num_steps_sampled") == saved["steps"]
        assert agent.plan.state["replay"].buffers[0].stats()["size"] == saved["replay_size"]
        weights = agent.get_policy().get_weights()
        assert float(sum(np.abs(v).sum() for v in weights.values())) == saved["weights_sum"]
        assert [int(agent.compute_action(np.array(o, np.float32), explore=False))
                for o in PROBES] == saved["actions"]
        # The next save clears the killed write's hidden leftovers.
        agent.save(path)
    finally:
        agent.stop()
    assert os.listdir(parent) == ["checkpoint"]


def test_an_overwrite_killed_between_its_renames_is_recovered(tmp_path):
    agent = get_agent_class("PG")(config={"seed": 0}, env="CartPole-v1", log_to_disk=False)
    try:
        agent.train()
        path = agent.save(str(tmp_path / "checkpoint_1"))
    finally:
        agent.stop()
    # The state a kill leaves after "old moved aside", before "new moved in".
    os.rename(path, str(tmp_path / ".checkpoint_1.old-0000abcd"))
    manifest = read_manifest(path)
    assert manifest["iteration"] == 1 and os.path.isdir(path)


def test_damaged_foreign_and_newer_checkpoints_give_one_line_errors(tmp_path):
    agent = get_agent_class("PG")(config={"seed": 0}, env="CartPole-v1", log_to_disk=False)
    try:
        agent.train()
        path = agent.save(str(tmp_path / "checkpoint_1"))
        policy_file = os.path.join(path, "policies", "default_policy.pt")
        with open(policy_file, "r+b") as f:
            f.truncate(os.path.getsize(policy_file) // 2)
        with pytest.raises(ValueError) as info:
            agent.restore(path)
        message = str(info.value)
        assert policy_file in message and "truncated or corrupt" in message
        assert "\n" not in message

        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / MANIFEST_FILE).write_text(json.dumps({"name": "something else"}))
        with pytest.raises(ValueError, match="is not a flowrl checkpoint manifest"):
            agent.restore(str(foreign))
        with pytest.raises(FileNotFoundError, match="has no flowrl_checkpoint.json"):
            agent.restore(str(tmp_path))

        newer = agent.save(str(tmp_path / "checkpoint_2"))
        manifest_file = os.path.join(newer, MANIFEST_FILE)
        manifest = json.load(open(manifest_file))
        manifest.update(format_version=99, flowrl_version="9.0.0")
        json.dump(manifest, open(manifest_file, "w"))
        with pytest.raises(ValueError, match=r"format version 99 \(written by flowrl "
                                             r"9\.0\.0\), but this flowrl .* reads format "
                                             r"version 1"):
            agent.restore(newer)
    finally:
        agent.stop()


def test_restore_continues_counters_optimizer_and_random_streams(tmp_path):
    agent = get_agent_class("DQN")(config=DQN_SMALL, env="CartPole-v1", log_to_disk=False)
    try:
        for _ in range(3):
            agent.train()
        path = agent.save(str(tmp_path / "checkpoint_3"))
        optimizer = agent.get_policy().get_state()
        expected = (random.random(), float(np.random.rand()), float(torch.rand(1)),
                    float(agent.get_policy()._rng.random()))
        counters = dict(agent.metrics.save())
    finally:
        agent.stop()
    restored = get_agent_class("DQN")(config={**DQN_SMALL, "seed": 11}, env="CartPole-v1",
                                      log_to_disk=False)
    try:
        restored.restore(path)
        got = (random.random(), float(np.random.rand()), float(torch.rand(1)),
               float(restored.get_policy()._rng.random()))
        assert got == expected  # the streams continue where they were saved
        assert restored.metrics.save() == counters
        restored_optimizer = restored.get_policy().get_state()["optimizer"]
        assert restored_optimizer["state"], "Adam moments were restored"
        for slot, values in optimizer["optimizer"]["state"].items():
            for name, value in values.items():
                assert np.array_equal(np.asarray(restored_optimizer["state"][slot][name]),
                                      np.asarray(value)), (slot, name)
        result = restored.train()
        assert result["training_iteration"] == 4
        assert result["timesteps_total"] == counters["counters"]["num_steps_sampled"] + 200
    finally:
        restored.stop()


def test_seeded_runs_without_workers_are_identical():
    def run():
        agent = get_agent_class("PPO")(config={
            "seed": 5, "train_batch_size": 512, "rollout_fragment_length": 64,
            "num_sgd_iter": 2}, env="CartPole-v1", log_to_disk=False)
        try:
            out = []
            for _ in range(3):
                r = agent.train()
                out.append((r["timesteps_total"], r["episode_reward_mean"],
                            r["info"]["learner"]["default_policy"]["total_loss"]))
            return out
        finally:
            agent.stop()

    assert run() == run()


def test_worker_seeds_are_distinct_and_recorded(ray_session):
    agent = get_agent_class("PPO")(config={
        "seed": 5, "num_workers": 2, "num_envs_per_worker": 2, "train_batch_size": 256,
        "rollout_fragment_length": 32, "num_sgd_iter": 1}, env="CartPole-v1",
        log_to_disk=False)
    try:
        first, second = agent.train(), agent.train()
        seeds = first["info"]["worker_seeds"]
        assert seeds == {"0": [5, 6], "1": [1005, 1006], "2": [2005, 2006]}
        assert "worker_seeds" not in second["info"]  # recorded once per run
        # The workers really use them: each one's first env reset is seeded so.
        firsts = agent.workers.foreach_worker_with_index(
            lambda w, i: w.env.np_random_seed)
        assert firsts == [5, 1005, 2005]
    finally:
        agent.stop()
