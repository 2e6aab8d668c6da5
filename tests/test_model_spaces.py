"""Models on every observation space: per-leaf encoders, image layouts and sizes,
custom models on nested observations, action masking, DQN and DDPG networks on Dict
observations. Real torch and gymnasium throughout."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from flowrl.data.spaces import ObservationPacker, unpack
from flowrl.policies.ddpg_networks import ActionNormalizer, DDPGModel
from flowrl.policies.dqn_networks import QNetwork
from flowrl.policies.models import (
    ActionMaskedModel,
    FullyConnectedNetwork,
    ObservationEncoder,
    VisionNetwork,
    get_model,
    image_layout,
)

Box, Discrete = gym.spaces.Box, gym.spaces.Discrete
MultiDiscrete, MultiBinary = gym.spaces.MultiDiscrete, gym.spaces.MultiBinary


def _as_tensors(value):
    """Nested numpy leaves -> torch tensors as the policy converts them (float64 -> float32)."""
    if isinstance(value, dict):
        return {key: _as_tensors(sub) for key, sub in value.items()}
    if isinstance(value, tuple):
        return tuple(_as_tensors(sub) for sub in value)
    arr = np.ascontiguousarray(value)
    return torch.from_numpy(arr.astype(np.float32) if arr.dtype == np.float64 else arr)


def _batch(space: gym.Space, observations: list) -> object:
    """Observations of ``space`` as the model receives them: records -> nested tensors."""
    packer = ObservationPacker(space)
    return _as_tensors(unpack(packer.pack(observations), space))


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("shape, layout", [
    ((84, 84, 4), "HWC"), ((4, 84, 84), "CHW"), ((8, 8, 3), "HWC"), ((3, 8, 8), "CHW"),
    ((64, 64, 3), "HWC"), ((1, 32, 32), "CHW"), ((7, 7, 3), None), ((3, 7, 7), None),
    ((84, 4, 84), None),
])
def test_image_layout_rule(shape, layout):
    assert image_layout(Box(0, 255, shape, np.uint8)) == layout


def test_image_layout_is_none_for_other_spaces():
    assert image_layout(Box(-1, 1, (84, 84))) is None
    assert image_layout(Box(-1, 1, (2, 84, 84, 3))) is None
    assert image_layout(Discrete(84)) is None
    assert image_layout(gym.spaces.Dict({"image": Box(0, 255, (84, 84, 3), np.uint8)})) is None


# ----------------------------------------------------------------- encoders
def test_encoder_sizes_and_values_on_nested_space():
    space = gym.spaces.Dict({
        "a_pos": Box(-5, 5, (2, 2), np.float64),
        "b_dir": Discrete(4, start=1),
        "c_md": MultiDiscrete([3, 2], start=[1, 0]),
        "d_mb": MultiBinary(3),
        "e_tup": gym.spaces.Tuple((Discrete(2), Box(-1, 1, (1,), np.float32))),
    })
    encoder = ObservationEncoder(space, {})
    assert encoder.size == 4 + 4 + (3 + 2) + 3 + (2 + 1)
    obs = [
        {"a_pos": np.array([[1.0, 2.0], [3.0, 4.0]]), "b_dir": 4, "c_md": np.array([1, 1]),
         "d_mb": np.array([1, 0, 1], np.int8), "e_tup": (1, np.array([0.5], np.float32))},
        {"a_pos": np.zeros((2, 2)), "b_dir": 1, "c_md": np.array([3, 0]),
         "d_mb": np.array([0, 1, 0], np.int8), "e_tup": (0, np.array([-0.25], np.float32))},
    ]
    features = encoder(_batch(space, obs))
    assert features.dtype == torch.float32 and features.shape == (2, encoder.size)
    expected = torch.tensor([
        # a_pos (flattened)  | b_dir one-hot of 4-1 | c_md: 1-1 of 3, 1 of 2 | d_mb | e_tup
        [1, 2, 3, 4, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0.5],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, -0.25],
    ])
    torch.testing.assert_close(features, expected)


def test_encoder_plain_spaces():
    discrete = ObservationEncoder(Discrete(5, start=-2), {})
    torch.testing.assert_close(discrete(torch.tensor([-2, 2])),
                               torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))
    binary = ObservationEncoder(MultiBinary((2, 2)), {})
    obs = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [0, 0]]], dtype=torch.int8)
    torch.testing.assert_close(binary(obs), obs.reshape(2, 4).float())
    # MultiDiscrete with a 2-D nvec: components one-hot in flattened order.
    md = ObservationEncoder(MultiDiscrete([[2, 3], [1, 2]]), {})
    assert md.size == 8
    torch.testing.assert_close(md(torch.tensor([[[1, 2], [0, 0]]])),
                               torch.tensor([[0.0, 1, 0, 0, 1, 1, 1, 0]]))
    box = ObservationEncoder(Box(-1, 1, (4,)), {})
    x = torch.randn(3, 4)
    out = box(x)
    assert box.size == 4 and out.data_ptr() == x.data_ptr()  # float32 vector: no copy


def test_encoder_drops_leaves_without_array_form_and_rejects_unsupported_spaces():
    space = gym.spaces.Dict({"mission": gym.spaces.Text(8), "pos": Box(-1, 1, (3,))})
    encoder = ObservationEncoder(space, {})
    assert encoder.size == 3
    with pytest.raises(ValueError, match="Text"):
        ObservationEncoder(gym.spaces.Text(8), {})
    with pytest.raises(ValueError, match="Text"):
        get_model(gym.spaces.Text(8), Discrete(2), 2, {})


def test_small_3d_box_is_flattened_not_convolved():
    space = Box(0, 10, (7, 7, 3), np.uint8)  # MiniGrid's grid
    model = get_model(space, Discrete(3), 3, {})
    assert isinstance(model, FullyConnectedNetwork) and model.encoder.size == 147
    assert not _convs(model)
    obs = torch.from_numpy(np.stack([space.sample() for _ in range(4)]))
    torch.testing.assert_close(model.encoder(obs), obs.reshape(4, -1).float())  # unscaled


def test_image_leaf_scales_uint8_by_1_over_255():
    frames = torch.randint(0, 256, (3, 16, 16, 2), dtype=torch.uint8)
    raw = ObservationEncoder(gym.spaces.Dict({"img": Box(0, 255, (16, 16, 2), np.uint8)}), {})
    unit = ObservationEncoder(gym.spaces.Dict({"img": Box(0, 1, (16, 16, 2), np.float32)}), {})
    unit.load_state_dict(raw.state_dict())
    torch.testing.assert_close(raw({"img": frames}), unit({"img": frames.float() / 255.0}))
    vision = get_model(Box(0, 255, (16, 16, 2), np.uint8), Discrete(2), 2, {})
    torch.testing.assert_close(vision.preprocess(frames),
                               frames.permute(0, 3, 1, 2).float() / 255.0)


# ------------------------------------------------------------------- images
@pytest.mark.parametrize("side", [8, 32, 84])
@pytest.mark.parametrize("channels_first", [False, True])
def test_images_of_8_32_84_build_and_run(side, channels_first):
    shape = (4, side, side) if channels_first else (side, side, 4)
    space = Box(0, 255, shape, np.uint8)
    model = get_model(space, Discrete(3), 3, {})
    assert isinstance(model, VisionNetwork)
    obs = torch.from_numpy(np.stack([space.sample() for _ in range(2)]))
    logits, value = model(obs)
    assert logits.shape == (2, 3) and value.shape == (2,)
    assert torch.isfinite(logits).all() and torch.isfinite(value).all()
    convs = _convs(model.policy_tower)
    if side >= 36:  # Nature DQN
        assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == \
            [(8, 4, 0), (4, 2, 0), (3, 1, 0)]
    else:  # padded 3x3 stride-2 stack
        assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
                for c in convs] == [(32, 3, 2, 1), (64, 3, 2, 1), (64, 3, 2, 1)]
    q = QNetwork(space, Discrete(3), {}, [16], dueling=True)
    assert q(obs).shape == (2, 3)
    encoder = ObservationEncoder(gym.spaces.Tuple((space, Discrete(2))), {})
    assert encoder((obs, torch.tensor([0, 1]))).shape == (2, encoder.size)


def test_atari_network_keeps_the_nature_architecture():
    model = get_model(Box(0, 255, (84, 84, 4), np.uint8), Discrete(6), 6, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["policy_tower.0.0.weight"] == (32, 4, 8, 8)
    assert shapes["policy_tower.0.2.weight"] == (64, 32, 4, 4)
    assert shapes["policy_tower.0.4.weight"] == (64, 64, 3, 3)
    assert shapes["policy_tower.1.weight"] == (512, 3136)
    assert shapes["policy_head.weight"] == (6, 512)


def test_channels_first_and_last_give_the_same_network():
    hwc = get_model(Box(0, 255, (40, 48, 3), np.uint8), Discrete(4), 4, {})
    chw = get_model(Box(0, 255, (3, 40, 48), np.uint8), Discrete(4), 4, {})
    chw.load_state_dict(hwc.state_dict())
    frames = torch.randint(0, 256, (5, 40, 48, 3), dtype=torch.uint8)
    for a, b in zip(hwc(frames), chw(frames.permute(0, 3, 1, 2).contiguous())):
        torch.testing.assert_close(a, b)
    # The same inside a Dict, and for DQN's trunk.
    enc_hwc = ObservationEncoder(gym.spaces.Dict({"i": Box(0, 255, (12, 10, 2), np.uint8)}), {})
    enc_chw = ObservationEncoder(gym.spaces.Dict({"i": Box(0, 255, (2, 12, 10), np.uint8)}), {})
    enc_chw.load_state_dict(enc_hwc.state_dict())
    small = torch.randint(0, 256, (3, 12, 10, 2), dtype=torch.uint8)
    torch.testing.assert_close(enc_hwc({"i": small}), enc_chw({"i": small.permute(0, 3, 1, 2)}))
    q_hwc = QNetwork(Box(0, 255, (40, 48, 3), np.uint8), Discrete(4), {}, [8], dueling=False)
    q_chw = QNetwork(Box(0, 255, (3, 40, 48), np.uint8), Discrete(4), {}, [8], dueling=False)
    q_chw.load_state_dict(q_hwc.state_dict())
    torch.testing.assert_close(q_hwc(frames), q_chw(frames.permute(0, 3, 1, 2)))


def test_conv_filters_on_a_too_small_image_raise():
    grid = Box(0, 10, (7, 7, 3), np.uint8)
    filters = {"conv_filters": [[16, 2, 1], [32, 2, 1]]}
    with pytest.raises(ValueError, match=r"7x7.*8x8|8x8.*7x7"):
        get_model(grid, Discrete(3), 3, filters)
    with pytest.raises(ValueError, match=r"7x7"):
        VisionNetwork(grid, Discrete(3), 3, {})
    with pytest.raises(ValueError, match=r"7x7"):
        QNetwork(grid, Discrete(3), filters, [16], dueling=False)
    with pytest.raises(ValueError, match=r"7x7"):
        get_model(gym.spaces.Dict({"image": grid, "direction": Discrete(4)}), Discrete(3), 3,
                  filters)


def test_conv_filters_that_shrink_the_image_to_nothing_raise():
    filters = [[16, 8, 4], [32, 8, 4]]
    with pytest.raises(ValueError, match=r"16x16.*\[\[16, 8, 4\], \[32, 8, 4\]\]|"
                                         r"\[\[16, 8, 4\], \[32, 8, 4\]\].*16x16"):
        get_model(Box(0, 255, (16, 16, 3), np.uint8), Discrete(2), 2, {"conv_filters": filters})


def test_conv_filters_take_an_optional_padding():
    space = Box(0, 255, (8, 8, 1), np.uint8)
    model = get_model(space, Discrete(2), 2, {"conv_filters": [[4, 3, 1, 1], [4, 3, 1]]})
    convs = _convs(model.policy_tower)
    assert [c.padding[0] for c in convs] == [1, 0]
    assert model.policy_tower[1].in_features == 4 * 6 * 6  # 8 -> 8 (padded) -> 6


def test_conv_filters_take_square_pairs_and_name_bad_entries():
    """RLlib-style entries, ``[out, [k, k], stride]``, build the same net as ``[out, k,
    stride]``; a non-square or non-numeric entry is a ValueError naming it."""
    space = Box(0, 255, (84, 84, 4), np.uint8)
    pairs = get_model(space, Discrete(2), 2, {"conv_filters": [[16, [8, 8], 4],
                                                               [32, [4, 4], [2, 2]]]})
    ints = get_model(space, Discrete(2), 2, {"conv_filters": [[16, 8, 4], [32, 4, 2]]})
    assert [(c.kernel_size, c.stride) for c in _convs(pairs.policy_tower)] == \
        [(c.kernel_size, c.stride) for c in _convs(ints.policy_tower)] == \
        [((8, 8), (4, 4)), ((4, 4), (2, 2))]
    for bad, words in (([[16, [8, 4], 4]], r"\[16, \[8, 4\], 4\].*square.*\[8, 4\]"),
                       ([[16, "8", 4]], r"whole numbers, got \[16, '8', 4\]"),
                       ([16, 32], r"got 16")):
        with pytest.raises(ValueError, match=words):
            get_model(space, Discrete(2), 2, {"conv_filters": bad})


# ------------------------------------------------------------ custom models
class _NestedInputModel(nn.Module):
    """Asserts that it receives the nested observation as nested tensors."""

    seen: list = []

    def __init__(self, obs_space, action_space, num_outputs, model_config):
        super().__init__()
        self.encoder = ObservationEncoder(obs_space, model_config)
        self.head = nn.Linear(self.encoder.size, num_outputs)

    def forward(self, obs):
        assert isinstance(obs, dict) and set(obs) == {"pos", "parts"}
        assert isinstance(obs["parts"], tuple) and len(obs["parts"]) == 2
        assert obs["pos"].dtype == torch.float32 and obs["pos"].shape[1:] == (3,)
        assert obs["parts"][0].dtype == torch.int64 and obs["parts"][0].dim() == 1
        assert obs["parts"][1].dtype == torch.int8 and obs["parts"][1].shape[1:] == (2,)
        type(self).seen.append(obs)
        features = self.encoder(obs)
        return self.head(features), features.sum(dim=1)


def test_custom_model_receives_nested_tensors():
    space = gym.spaces.Dict({
        "pos": Box(-1, 1, (3,), np.float64),
        "parts": gym.spaces.Tuple((Discrete(3), MultiBinary(2))),
        "name": gym.spaces.Text(4),  # no array form: not passed to the model
    })
    model = get_model(space, Discrete(2), 2, {"custom_model": _NestedInputModel})
    obs = [space.sample() for _ in range(3)]
    logits, value = model(_batch(space, obs))
    assert logits.shape == (3, 2) and value.shape == (3,) and _NestedInputModel.seen


# ------------------------------------------------------------- action masks
def _masked_space(n: int) -> gym.spaces.Dict:
    return gym.spaces.Dict({"action_mask": Box(0, 1, (n,), np.int8),
                            "observations": Box(-1, 1, (4,))})


def test_action_masked_model_masks_logits():
    space = _masked_space(3)
    inner = get_model(space["observations"], Discrete(3), 3, {})
    model = ActionMaskedModel(inner, "observations", space["action_mask"], 3)
    x = torch.randn(3, 4)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.int8)
    logits, value = model({"action_mask": mask, "observations": x})
    inner_logits, inner_value = inner(x)
    torch.testing.assert_close(value, inner_value)
    probs = torch.softmax(logits, dim=-1)
    assert probs[0, 1].item() == 0.0 and probs[1, 0].item() == 0.0 and probs[1, 1].item() == 0.0
    assert probs[1, 2].item() == 1.0
    torch.testing.assert_close(logits[0, [0, 2]], inner_logits[0, [0, 2]])
    torch.testing.assert_close(logits[2], inner_logits[2])  # empty mask: row left alone
    # Entropy and log-probabilities stay finite, so do their gradients.
    dist = torch.distributions.Categorical(logits=logits)
    loss = dist.entropy().sum() + dist.log_prob(torch.tensor([0, 2, 1])).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in inner.parameters() if p.grad is not None)


def test_action_masked_model_on_q_values_and_float_masks():
    space = gym.spaces.Dict({"action_mask": MultiBinary(4),
                             "observation": gym.spaces.Dict({"a": Discrete(3),
                                                             "b": Box(-1, 1, (2,))})})
    q = QNetwork(space["observation"], Discrete(4), {"fcnet_hiddens": [8]}, [8], dueling=True)
    model = ActionMaskedModel(q, "observation", space["action_mask"], 4)
    obs = {"a": torch.tensor([0, 2]), "b": torch.zeros(2, 2)}
    mask = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    values = model({"action_mask": mask, "observation": obs})
    assert values.shape == (2, 4)
    assert values.argmax(dim=1)[0].item() == 1
    lowest = torch.finfo(values.dtype).min
    assert values[0, 0] == lowest and values[0, 2] == lowest and values[1, 2] == lowest
    torch.testing.assert_close(values[1, [0, 1, 3]], q(obs)[1, [0, 1, 3]])


def test_action_mask_size_mismatch_raises():
    inner = get_model(Box(-1, 1, (4,)), Discrete(3), 3, {})
    with pytest.raises(ValueError, match=r"5.*3"):
        ActionMaskedModel(inner, "observations", Box(0, 1, (5,), np.int8), 3)
    unchecked = ActionMaskedModel(inner, "observations")
    with pytest.raises(ValueError, match=r"5.*3"):
        unchecked({"action_mask": torch.ones(2, 5), "observations": torch.zeros(2, 4)})


# ---------------------------------------------------- DQN and DDPG networks
_DICT_OBS = gym.spaces.Dict({
    "frame": Box(0, 255, (3, 16, 16), np.uint8),
    "grid": Box(0, 10, (5, 5, 2), np.uint8),
    "state": Box(-1, 1, (3,), np.float64),
    "mode": Discrete(3),
    "keys": MultiDiscrete([2, 4]),
    "flags": MultiBinary(2),
})


def test_dqn_network_on_dict_observations():
    obs = _batch(_DICT_OBS, [_DICT_OBS.sample() for _ in range(5)])
    for dueling in (False, True):
        q = QNetwork(_DICT_OBS, Discrete(4), {"fcnet_hiddens": [32]}, [16], dueling)
        values = q(obs)
        assert values.shape == (5, 4) and torch.isfinite(values).all()
        values.sum().backward()
        assert all(p.grad is not None for p in q.parameters())


def test_ddpg_networks_on_dict_observations():
    action_space = Box(-2, 2, (2,), np.float32)
    config = {"actor_hiddens": [16], "actor_hidden_activation": "relu",
              "critic_hiddens": [16], "critic_hidden_activation": "relu", "twin_q": True,
              "model": {}}
    model = DDPGModel(_DICT_OBS, action_space, config, ActionNormalizer(action_space))
    obs = _batch(_DICT_OBS, [_DICT_OBS.sample() for _ in range(5)])
    actions = model(obs)
    assert actions.shape == (5, 2) and bool(((actions >= -2) & (actions <= 2)).all())
    q = model.critic(obs, model.actor(obs))
    assert q.shape == (2, 5) and torch.isfinite(q).all()


def test_pg_model_on_nested_observations():
    space = gym.spaces.Tuple((_DICT_OBS, MultiDiscrete([3, 3])))
    for share in (False, True):
        model = get_model(space, Discrete(5), 5, {"vf_share_layers": share})
        assert isinstance(model, FullyConnectedNetwork)
        logits, value = model(_batch(space, [space.sample() for _ in range(4)]))
        assert logits.shape == (4, 5) and value.shape == (4,)
