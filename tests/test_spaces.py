"""Any gymnasium space: records for nested observations, product actions, action
masking, image layouts, and the error for each space an algorithm cannot take."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import spaces_envs

from flowrl import get_agent_class
from flowrl.data.sample_batch import SampleBatch
from flowrl.data.spaces import ObservationPacker, action_mask_keys, leaf_paths, unpack

from spaces_envs import CueEnv, ImageGoalEnv, MaskedGreedEnv, TwoDialsEnv

NESTED = gym.spaces.Dict({
    "pose": gym.spaces.Tuple([gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,), np.float32)]),
    "grid": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8),
    "keys": gym.spaces.MultiBinary(4),
    "dials": gym.spaces.MultiDiscrete([2, 5]),
    "mission": gym.spaces.Text(20),
})


def make(algorithm: str, env, **config):
    return get_agent_class(algorithm)(config={"seed": 0, **config}, env=env, log_to_disk=False)


# ----------------------------------------------------------------------------- records
def test_packer_keeps_each_leaf_with_its_dtype_and_drops_text():
    observations = [NESTED.sample() for _ in range(5)]
    packer = ObservationPacker(NESTED)
    records = packer.pack(observations)
    # gymnasium's Dict sorts its keys; records follow the space's order.
    assert records.shape == (5,) and records.dtype.names == ("dials", "grid", "keys", "pose")
    assert records["grid"].dtype == np.uint8 and records["keys"].dtype == np.int8
    assert leaf_paths(NESTED) == [("dials",), ("grid",), ("keys",), ("pose", 0), ("pose", 1)]
    nested = unpack(records, NESTED)
    assert set(nested) == {"pose", "grid", "keys", "dials"} and isinstance(nested["pose"], tuple)
    for i, obs in enumerate(observations):
        assert nested["pose"][0][i] == obs["pose"][0]
        np.testing.assert_array_equal(nested["pose"][1][i], obs["pose"][1])
        np.testing.assert_array_equal(nested["grid"][i], obs["grid"])
        np.testing.assert_array_equal(nested["keys"][i], obs["keys"])
        np.testing.assert_array_equal(nested["dials"][i], obs["dials"])
    # Plain numpy from here on: batches concatenate, slice and fill replay storage.
    joined = SampleBatch.concat_samples([SampleBatch(obs=records), SampleBatch(obs=records[:2])])
    assert joined["obs"].dtype == records.dtype and joined.count == 7
    storage = np.zeros(10, records.dtype)
    storage[3:8] = records
    np.testing.assert_array_equal(storage[3:8]["grid"], records["grid"])


def test_packer_names_the_leaf_that_does_not_fit():
    bad = NESTED.sample()
    bad["grid"] = np.zeros((7, 7), np.uint8)
    with pytest.raises(ValueError, match="grid"):
        ObservationPacker(NESTED).pack([bad])


def test_masked_observation_convention():
    mask = gym.spaces.Box(0, 1, (4,), np.int8)
    obs = gym.spaces.Box(-1, 1, (3,))
    assert action_mask_keys(gym.spaces.Dict({"action_mask": mask, "observations": obs})) == \
        ("action_mask", "observations")
    assert action_mask_keys(gym.spaces.Dict({"action_mask": mask, "observation": obs})) == \
        ("action_mask", "observation")
    assert action_mask_keys(gym.spaces.Dict({"action_mask": mask, "other": obs})) is None


def test_sampler_stores_dict_observations_as_records():
    agent = make("PPO", CueEnv, train_batch_size=200, rollout_fragment_length=100,
                 num_envs_per_worker=2, sgd_minibatch_size=50)
    try:
        batch = agent.workers.local_worker().sample()
        assert batch["obs"].dtype.names == ("cue", "shift")
        assert batch["new_obs"].dtype == batch["obs"].dtype
        assert set(np.unique(batch["obs"]["cue"])) <= {0, 1, 2}
        result = agent.train()
        assert result["timesteps_total"] >= 200
        action = agent.compute_action({"cue": 1, "shift": np.array([0.5, 0.0], np.float32)})
        assert action in (0, 1, 2)
    finally:
        agent.stop()


# ----------------------------------------------------------------------------- masking
def _masked_actions_are_legal(batch: SampleBatch) -> tuple[int, int]:
    masks = batch["obs"]["action_mask"]
    actions = batch["actions"]
    illegal = int(np.count_nonzero(masks[np.arange(len(actions)), actions] == 0))
    return illegal, len(actions)


@pytest.mark.parametrize("algorithm", ["PPO", "DQN"])
def test_masked_actions_are_never_sampled_or_chosen(algorithm):
    config = {"rollout_fragment_length": 500, "num_envs_per_worker": 4}
    if algorithm == "DQN":
        # Epsilon 1 at first: every action of the first 10k steps is a random draw.
        config["exploration_config"] = {"epsilon_timesteps": 100_000, "initial_epsilon": 1.0}
    agent = make(algorithm, MaskedGreedEnv, **config)
    try:
        worker = agent.workers.local_worker()
        sampled = illegal = 0
        while sampled < 10_000:  # the env itself raises on an illegal action
            bad, count = _masked_actions_are_legal(worker.sample())
            illegal += bad
            sampled += count
        assert illegal == 0
        agent.train()  # learning on masked observations, then greedy actions
        env = MaskedGreedEnv()
        obs, _ = env.reset(seed=3)
        greedy_zero = 0
        for _ in range(500):
            action = agent.compute_action(obs)
            assert obs["action_mask"][action] == 1
            greedy_zero += action == 0
            obs, *_ = env.step(action)
        policy = agent.get_policy()
        records = policy.obs_packer.pack([env._observe() for _ in range(1000)])
        actions, _ = policy.compute_actions(records, explore=False)
        assert np.all(records["action_mask"][np.arange(1000), actions] == 1)
    finally:
        agent.stop()


# ------------------------------------------------------------------- product actions
def test_multidiscrete_actions_reach_the_env_as_the_space_wants():
    agent = make("PPO", TwoDialsEnv, rollout_fragment_length=100, train_batch_size=200,
                 sgd_minibatch_size=50)
    try:
        batch = agent.workers.local_worker().sample()  # the env asserts every action
        assert batch["actions"].shape[1:] == (2,) and batch["actions"].dtype == np.int64
        action = agent.compute_action(np.eye(7, dtype=np.float32)[0])
        assert TwoDialsEnv().action_space.contains(np.asarray(action))
    finally:
        agent.stop()


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("algorithm", ["PPO", "DQN"])
@pytest.mark.parametrize("shape,channels_first", [((4, 84, 84), True), ((32, 32, 3), False),
                                                  ((3, 8, 8), True)])
def test_image_layouts_train_one_iteration(algorithm, shape, channels_first):
    config = {"env_config": {"shape": shape, "channels_first": channels_first},
              "rollout_fragment_length": 50}
    if algorithm == "PPO":
        config.update(train_batch_size=100, sgd_minibatch_size=50, num_sgd_iter=1)
    else:
        config.update(learning_starts=50, train_batch_size=16, buffer_size=1000)
    agent = make(algorithm, ImageGoalEnv, **config)
    try:
        result = agent.train()
        assert result["timesteps_total"] >= 50
        assert "Conv2d" in repr(agent.get_policy().model)
    finally:
        agent.stop()


# --------------------------------------------------------------- unsupported pairs
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
MASKED = gym.spaces.Dict({"action_mask": gym.spaces.Box(0, 1, (3,), np.int8),
                          "observations": BOX})
UNSUPPORTED = [
    # (algorithm, observation space, action space, words the message must hold)
    ("DQN", BOX, gym.spaces.MultiDiscrete([3, 4]), ["DQN and APEX", "MultiDiscrete", "PPO"]),
    ("DQN", BOX, gym.spaces.Box(-1, 1, (2,)), ["DQN and APEX", "Box", "DDPG"]),
    ("DQN", BOX, gym.spaces.Tuple([gym.spaces.Discrete(2)] * 2), ["DQN and APEX", "Tuple"]),
    ("APEX", BOX, gym.spaces.MultiBinary(3), ["DQN and APEX", "MultiBinary"]),
    ("DDPG", BOX, gym.spaces.Discrete(3), ["DDPG, TD3 and APEX_DDPG", "Discrete", "DQN"]),
    ("DDPG", BOX, gym.spaces.Dict({"a": gym.spaces.Discrete(2)}), ["DDPG", "Dict"]),
    ("DDPG", MASKED, gym.spaces.Box(-1, 1, (3,)), ["action_mask", "PPO or DQN"]),
    ("APEX_DDPG", BOX, gym.spaces.MultiDiscrete([2]), ["APEX_DDPG", "MultiDiscrete"]),
    ("ES", gym.spaces.Dict({"a": BOX}), gym.spaces.Discrete(2), ["ES takes Box or Discrete",
                                                                 "Dict", "PPO"]),
    ("PPO", BOX, gym.spaces.Text(5), ["Text"]),
    ("PPO", BOX, gym.spaces.Tuple([gym.spaces.Text(5)]), ["Text"]),
    ("IMPALA", gym.spaces.Text(5), gym.spaces.Discrete(2), ["Text"]),
]


@pytest.mark.parametrize("algorithm,obs_space,action_space,words", UNSUPPORTED,
                         ids=[f"{a}-{type(s).__name__}" for a, _, s, _ in UNSUPPORTED])
def test_each_unsupported_space_names_itself_and_the_algorithm(
        algorithm, obs_space, action_space, words, ray_session):
    config = {"env_config": {"observation_space": obs_space, "action_space": action_space}}
    if algorithm.startswith("APEX") or algorithm in ("ES", "IMPALA"):
        config.update(num_workers=1, num_cpus_per_worker=0.5)
    with pytest.raises((ValueError, TypeError)) as info:
        agent = make(algorithm, spaces_envs.AnySpacesEnv, **config)
        agent.stop()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# --------------------------------------------------------------------------- learning
@pytest.mark.learning
def test_ppo_learns_from_a_dict_observation():
    """Both leaves are needed: the cue alone scores about 5 of 10, random play 3.3."""
    from learning_bars import assert_learns
    assert_learns("PPO", {}, 9.0, 54_000, typical=27_000, env=CueEnv)


@pytest.mark.learning
def test_ppo_learns_multidiscrete_actions():
    """Random play scores 5.8 of 20; 18 needs both dials right 90% of the time."""
    from learning_bars import assert_learns
    assert_learns("PPO", {}, 18.0, 58_000, typical=29_000, env=TwoDialsEnv)


@pytest.mark.learning
def test_ppo_minigrid_empty_default_config():
    from learning_bars import assert_learns
    # gymnasium's "module:EnvId": each seed's fresh process imports minigrid itself.
    assert_learns("PPO", {}, 0.9, 32_000, typical=16_000,
                  env="minigrid:MiniGrid-Empty-5x5-v0")


def test_es_acts_with_the_mode_of_a_product_distribution(ray_session):
    agent = make("ES", TwoDialsEnv, num_workers=1, episodes_per_batch=4,
                 train_batch_size=100, noise_size=1_000_000)
    try:
        agent.train()  # rollouts step the env, which asserts every action
        action = agent.compute_action(np.eye(7, dtype=np.float32)[0])
        assert TwoDialsEnv().action_space.contains(np.asarray(action))
    finally:
        agent.stop()


def test_es_names_ppo_for_dict_observations(ray_session):
    with pytest.raises(ValueError, match="ES takes Box or Discrete observations.*use PPO"):
        make("ES", CueEnv, num_workers=1, noise_size=1_000_000)


@pytest.mark.parametrize("algorithm", ["PPO", "DQN"])
def test_masks_hold_in_evaluation_and_in_the_torchscript_export(algorithm, tmp_path):
    import torch
    agent = make(algorithm, MaskedGreedEnv, rollout_fragment_length=100,
                 evaluation_interval=1, evaluation_num_episodes=5)
    try:
        result = agent.train()  # evaluation episodes step the env, which raises on a leak
        assert result["evaluation"]["episodes_this_iter"] == 5
        path = agent.export_policy(str(tmp_path / "export"))
        module = torch.jit.load(path)
        env = MaskedGreedEnv()
        env.reset(seed=5)
        observations = [env._observe() for _ in range(1000)]
        masks = np.stack([o["action_mask"] for o in observations])
        exported = module(torch.as_tensor(masks),
                          torch.as_tensor(np.stack([o["observations"] for o in observations])))
        exported = exported.numpy()
        assert np.all(masks[np.arange(1000), exported] == 1)
        expected = [agent.compute_action(o) for o in observations[:50]]
        assert exported[:50].tolist() == expected
    finally:
        agent.stop()


@pytest.mark.parametrize("algorithm,env", [("DQN", CueEnv), ("APEX", CueEnv),
                                           ("DDPG", spaces_envs.DictPendulum),
                                           ("APEX_DDPG", spaces_envs.DictPendulum)])
def test_replay_algorithms_store_nested_observations(algorithm, env, ray_session, tmp_path):
    config = {"learning_starts": 100, "train_batch_size": 32, "buffer_size": 2000,
              "rollout_fragment_length": 50, "timesteps_per_iteration": 200,
              "min_iter_time_s": 0}
    if algorithm.startswith("APEX"):
        config.update(num_workers=1, num_replay_buffer_shards=1, num_cpus_per_worker=0.5,
                      checkpoint_replay_buffer=False)
    else:
        config["checkpoint_replay_buffer"] = True
    agent = make(algorithm, env, **config)
    try:
        for _ in range(3):
            result = agent.train()
        assert result["info"]["num_steps_trained"] > 0
        checkpoint = agent.save(str(tmp_path))
    finally:
        agent.stop()
    restored = make(algorithm, env, **config)
    try:
        restored.restore(checkpoint)
        trained_before = result["info"]["num_steps_trained"]
        for _ in range(5):  # APEX refills its (unsaved) replay shards first
            if restored.train()["info"]["num_steps_trained"] > trained_before:
                break
        else:
            pytest.fail(f"{algorithm} did not train after the restore")
    finally:
        restored.stop()


@pytest.mark.parametrize("algorithm", ["PG", "A2C", "A3C", "PPO", "IMPALA"])
@pytest.mark.parametrize("env", [CueEnv, TwoDialsEnv, spaces_envs.MixedActionEnv],
                         ids=["dict-obs", "multidiscrete", "tuple-obs-dict-action"])
def test_policy_gradient_family_trains_on_every_space(algorithm, env, ray_session):
    config = {"rollout_fragment_length": 50, "train_batch_size": 200}
    if algorithm == "PPO":
        config.update(sgd_minibatch_size=50, num_sgd_iter=2)
    if algorithm in ("A3C", "IMPALA"):
        config.update(num_workers=1, num_cpus_per_worker=0.5)
    if algorithm == "IMPALA":
        config.update(min_iter_time_s=0, timesteps_per_iteration=200)
    agent = make(algorithm, env, **config)
    try:
        steps = 0
        for _ in range(20):  # A3C and IMPALA report trained steps a bit later
            result = agent.train()
            steps = result["info"].get("num_steps_trained", 0)
            if steps:
                break
        assert steps > 0
        obs, _ = env().reset(seed=1)
        assert env().action_space.contains(agent.compute_action(obs))
    finally:
        agent.stop()
