"""Actions of every supported gymnasium space: MultiCategorical and ProductDistribution
against torch.distributions references, ActionLayout (batch rows <-> env actions),
the greedy export heads, and the errors for unsupported spaces."""

from __future__ import annotations

import json
import os
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.spaces import Box, Dict, Discrete, MultiBinary, MultiDiscrete, Sequence, Text, Tuple
from torch import nn
from torch.distributions import Categorical as TorchCategorical
from torch.distributions import Independent, Normal, kl_divergence

from flowrl.data.actions import ActionLayout
from flowrl.policies.distributions import (Categorical, DiagGaussian, MultiCategorical,
                                           ProductDistribution, get_dist_class)
from flowrl.policies.export import DistInputsGreedy, describe_space, to_torchscript, write_export

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

NESTED_DICT = Dict({
    "move": Tuple((Discrete(3), Box(-1.0, 1.0, (2, 2), np.float32))),
    "buttons": MultiBinary(3),
    "gear": Dict({"level": MultiDiscrete([4, 2, 5]), "boost": Box(0.0, 2.0, (), np.float64)}),
})
SPACES = {
    "MultiDiscrete": MultiDiscrete([3, 2, 5]),
    "MultiDiscrete-2d": MultiDiscrete([[2, 3], [4, 4]]),
    "MultiDiscrete-uniform": MultiDiscrete([4, 4, 4]),
    "MultiBinary": MultiBinary(4),
    "MultiBinary-2d": MultiBinary([2, 3]),
    "Tuple": Tuple((Discrete(4), Box(-1.0, 1.0, (3,), np.float32))),
    "Tuple-discrete": Tuple((Discrete(3), Discrete(5))),
    "Tuple-box": Tuple((Box(-1.0, 1.0, (2,), np.float32), Box(0.0, 5.0, (1,), np.float32))),
    "Dict-nested": NESTED_DICT,
}


def _seeded(space: gym.Space, seed: int = 0) -> gym.Space:
    space.seed(seed)
    return space


# ------------------------------------------------------------- slow references
def _reference_leaf(space: gym.Space, inputs: torch.Tensor) -> list:
    """torch.distributions for one leaf's inputs (one row), one per component."""
    if isinstance(space, Discrete):
        return [TorchCategorical(logits=inputs)]
    if isinstance(space, Box):
        k = inputs.shape[0] // 2
        return [Independent(Normal(inputs[:k], inputs[k:].exp()), 1)]
    nvec = (space.nvec.reshape(-1).tolist() if isinstance(space, MultiDiscrete)
            else [2] * int(np.prod(space.shape)))
    dists, offset = [], 0
    for n in nvec:
        dists.append(TorchCategorical(logits=inputs[offset:offset + n]))
        offset += n
    return dists


def _leaf_inputs_size(space: gym.Space) -> int:
    if isinstance(space, Discrete):
        return int(space.n)
    if isinstance(space, Box):
        return 2 * int(np.prod(space.shape))
    if isinstance(space, MultiDiscrete):
        return int(space.nvec.sum())
    return 2 * int(np.prod(space.shape))


def _reference(space: gym.Space, row_inputs: torch.Tensor) -> list[tuple]:
    """``[(torch dists of the leaf, leaf)]`` for one row of dist inputs, leaf order."""
    out, offset = [], 0
    for leaf in ActionLayout(space).leaves:
        size = _leaf_inputs_size(leaf.space)
        out.append((_reference_leaf(leaf.space, row_inputs[offset:offset + size]), leaf))
        offset += size
    assert offset == row_inputs.shape[0]
    return out


def _reference_logp(space, row_inputs, action_row):
    total = torch.zeros((), dtype=torch.float64)
    flat = action_row.reshape(-1)
    for dists, leaf in _reference(space, row_inputs):
        values = flat[leaf.offset:leaf.offset + leaf.size]
        if isinstance(leaf.space, Box):
            total = total + dists[0].log_prob(values.to(torch.float64))
        else:
            for dist, value in zip(dists, values):
                total = total + dist.log_prob(value.long())
    return total


def _reference_entropy(space, row_inputs):
    return sum(d.entropy() for dists, _ in _reference(space, row_inputs) for d in dists)


def _reference_kl(space, row_p, row_q):
    return sum(kl_divergence(p, q)
               for (ps, _), (qs, _) in zip(_reference(space, row_p), _reference(space, row_q))
               for p, q in zip(ps, qs))


def _batch_rows(space: gym.Space, count: int) -> np.ndarray:
    """``count`` env actions of ``space`` as batch rows (ActionLayout.from_env)."""
    layout = ActionLayout(space)
    return np.stack([layout.from_env(space.sample()) for _ in range(count)])


@pytest.mark.parametrize("name", list(SPACES))
def test_logp_entropy_kl_match_torch_distributions(name):
    space = _seeded(SPACES[name])
    dist_class, num_inputs = get_dist_class(space)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, num_inputs, generator=gen, dtype=torch.float64) * 2
    other = torch.randn(6, num_inputs, generator=gen, dtype=torch.float64) * 2
    actions = torch.as_tensor(_batch_rows(space, 6))
    ours, theirs = dist_class(inputs), dist_class(other)
    logp, entropy, kl = ours.logp(actions), ours.entropy(), ours.kl(theirs)
    assert logp.shape == entropy.shape == kl.shape == (6,)
    for i in range(6):
        torch.testing.assert_close(logp[i], _reference_logp(space, inputs[i], actions[i]))
        torch.testing.assert_close(entropy[i], _reference_entropy(space, inputs[i]))
        torch.testing.assert_close(kl[i], _reference_kl(space, inputs[i], other[i]))


@pytest.mark.parametrize("name", ["MultiDiscrete", "Dict-nested"])
def test_gradients_are_finite_with_padded_components(name):
    # Uneven sizes are padded with -inf: no NaN may leak into the gradients.
    space = _seeded(SPACES[name])
    dist_class, num_inputs = get_dist_class(space)
    inputs = torch.randn(5, num_inputs, requires_grad=True)
    dist = dist_class(inputs)
    actions = torch.as_tensor(_batch_rows(space, 5))
    loss = dist.logp(actions).sum() + dist.entropy().sum() \
        + dist.kl(dist_class(torch.randn(5, num_inputs))).sum()
    loss.backward()
    assert torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0


def test_index_tensors_first_made_while_acting_serve_the_learner():
    # The policy acts under torch.inference_mode; cached index tensors made there
    # must still be usable in the learner's autograd afterwards.
    space = Tuple((MultiDiscrete([3, 6, 2]), Box(-1.0, 1.0, (1,)), Discrete(7)))  # fresh sizes
    dist_class, num_inputs = get_dist_class(space)
    with torch.inference_mode():
        dist_class(torch.randn(2, num_inputs)).sample()
    inputs = torch.randn(2, num_inputs, requires_grad=True)
    dist = dist_class(inputs)
    (dist.entropy() + dist.logp(dist.sample().detach())).sum().backward()
    assert torch.isfinite(inputs.grad).all()


@pytest.mark.parametrize("name", list(SPACES))
def test_samples_are_inside_the_space(name):
    space = SPACES[name]
    layout = ActionLayout(space)
    dist_class, num_inputs = get_dist_class(space)
    # Wide Gaussians: Box samples leave the bounds, clip=True brings them back.
    inputs = torch.randn(64, num_inputs) * 3
    samples = dist_class(inputs).sample()
    greedy = dist_class(inputs).deterministic_sample()
    for actions in (samples, greedy):
        # As the policy stores them: the layout's dtype and row shape.
        rows = actions.numpy().reshape((64, *layout.shape)).astype(layout.dtype)
        assert rows.dtype == layout.dtype and rows.shape[1:] == layout.shape
        for row, env_action in zip(rows, layout.to_env_batch(rows, clip=True)):
            assert space.contains(layout.to_env(row, clip=True)), (row, space)
            assert space.contains(env_action), (env_action, space)


def test_multicategorical_sample_frequencies_follow_the_probabilities():
    dist_class, _ = get_dist_class(MultiDiscrete([2, 4, 3]))
    logits = torch.tensor([0.5, -0.5, 1.0, 0.0, -1.0, 2.0, 0.3, 0.3, -2.0])
    n = 40_000
    samples = dist_class(logits.expand(n, -1)).sample()
    assert samples.shape == (n, 3) and samples.dtype == torch.int64
    offset = 0
    for c, size in enumerate((2, 4, 3)):
        expected = torch.softmax(logits[offset:offset + size], dim=0)
        counts = torch.bincount(samples[:, c], minlength=size).float() / n
        assert counts.shape == (size,)  # never an index past the component's size
        torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)
        offset += size


@pytest.mark.parametrize("name", list(SPACES))
def test_deterministic_sample_is_argmax_per_component_and_box_mean(name):
    space = SPACES[name]
    dist_class, num_inputs = get_dist_class(space)
    inputs = torch.randn(7, num_inputs)
    got = dist_class(inputs).deterministic_sample()
    for i in range(7):
        expected = []
        for dists, leaf in _reference(space, inputs[i]):
            if isinstance(leaf.space, Box):
                expected.extend(dists[0].mean.tolist())
            else:
                expected.extend(int(torch.argmax(d.logits)) for d in dists)
        assert got[i].reshape(-1).tolist() == pytest.approx(expected)


def test_product_samples_are_float_rows_in_layout_order():
    space = Tuple((Box(-1.0, 1.0, (2,), np.float32), Discrete(3), MultiDiscrete([2, 2])))
    dist_class, num_inputs = get_dist_class(space)
    assert issubclass(dist_class, ProductDistribution)
    assert num_inputs == 4 + 3 + 4 and dist_class.num_slots == 5
    # Very confident logits and a near-zero std pin down each slot's value.
    inputs = torch.tensor([[0.25, -0.5, -20.0, -20.0, 0.0, 0.0, 20.0, 20.0, 0.0, 0.0, 20.0]])
    sample = dist_class(inputs).sample()
    assert sample.dtype == torch.float32 and sample.shape == (1, 5)
    torch.testing.assert_close(sample, torch.tensor([[0.25, -0.5, 2.0, 0.0, 1.0]]),
                               atol=1e-6, rtol=0)


# ------------------------------------------------------------ get_dist_class
def test_get_dist_class_per_space():
    assert get_dist_class(Discrete(4)) == (Categorical, 4)
    assert get_dist_class(Box(-1, 1, (2, 3))) == (DiagGaussian, 12)
    multi, n = get_dist_class(MultiDiscrete([[2, 3], [4, 5]]))
    assert issubclass(multi, MultiCategorical) and n == 14 and multi.nvec == (2, 3, 4, 5)
    binary, n = get_dist_class(MultiBinary(3))
    assert issubclass(binary, MultiCategorical) and n == 6 and binary.nvec == (2, 2, 2)
    product, n = get_dist_class(NESTED_DICT)
    # Dict leaves in the space's (sorted) key order: buttons, gear/boost, gear/level, move.
    assert n == 6 + 2 + 11 + (3 + 8)
    assert product.__name__ == "ProductDistribution" and multi.__name__ == "MultiCategorical"
    # Same sizes, same class; bound classes survive plain pickle.
    assert get_dist_class(MultiDiscrete([[2, 3], [4, 5]]))[0] is multi
    assert pickle.loads(pickle.dumps(multi)) is multi
    assert pickle.loads(pickle.dumps(product)) is product
    with pytest.raises(TypeError, match="bind"):
        MultiCategorical(torch.zeros(1, 3))


def test_discrete_leaves_must_start_at_zero():
    with pytest.raises(ValueError, match="start"):
        get_dist_class(Discrete(3, start=1))
    with pytest.raises(ValueError, match=r"MultiDiscrete\(\[2 3\], start"):
        get_dist_class(Tuple((Discrete(2), MultiDiscrete([2, 3], start=[1, 0]))))


@pytest.mark.parametrize("space, named", [
    (Text(5), "Text("),
    (Sequence(Discrete(2)), "Sequence("),
    (gym.spaces.Graph(Box(0, 1, (2,)), Discrete(2)), "Graph("),
    (gym.spaces.OneOf((Discrete(2), Box(0, 1, (2,)))), "OneOf("),
    (Tuple((Discrete(2), Text(4))), "Text("),
    (Dict({"ok": Discrete(2), "deep": Dict({"bad": Sequence(Discrete(3))})}), "Sequence("),
    (Tuple(()), "Tuple()"),
])
def test_unsupported_action_spaces_are_refused_by_name(space, named):
    for build in (get_dist_class, ActionLayout):
        with pytest.raises(ValueError) as err:
            build(space)
        message = str(err.value)
        assert named in message and str(space) in message
        assert "MultiDiscrete" in message and "Tuple / Dict" in message  # what is supported


# ------------------------------------------------------------- ActionLayout
@pytest.mark.parametrize("space, dtype, shape", [
    (Discrete(5), np.int64, ()),
    (Box(-1, 1, (2, 3), np.float64), np.float64, (2, 3)),
    (MultiDiscrete([2, 3], dtype=np.int32), np.int64, (2,)),
    (MultiBinary([2, 2]), np.int8, (2, 2)),
    (Tuple((Discrete(4), Box(-1, 1, (3,)))), np.float32, (4,)),
    (NESTED_DICT, np.float32, (1 + 4 + 1 + 3 + 3,)),
])
def test_layout_dtype_and_shape(space, dtype, shape):
    layout = ActionLayout(space)
    assert layout.dtype == np.dtype(dtype) and layout.shape == shape
    assert layout.nested == isinstance(space, (Tuple, Dict))


def _same_action(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_action(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(
            _same_action(x, y) for x, y in zip(a, b))
    return np.asarray(a).shape == np.asarray(b).shape and np.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", [*SPACES, "Discrete", "Box", "MultiDiscrete-start"])
def test_layout_round_trips(name):
    space = {"Discrete": Discrete(3, start=-1), "Box": Box(-2, 2, (3,), np.float32),
             "MultiDiscrete-start": MultiDiscrete([3, 4], start=[5, -1])}.get(name) \
        or SPACES[name]
    space = _seeded(space)
    layout = ActionLayout(space)
    for _ in range(20):
        action = space.sample()
        row = layout.from_env(action)
        assert row.dtype == layout.dtype and row.shape == layout.shape
        env_action = layout.to_env(row, clip=False)
        assert space.contains(env_action) and _same_action(env_action, action)
        np.testing.assert_array_equal(layout.from_env(env_action), row)
    rows = layout.from_env_batch([space.sample() for _ in range(5)])
    assert rows.shape == (5, *layout.shape) and rows.dtype == layout.dtype
    for row, env_action in zip(rows, layout.to_env_batch(rows, clip=False)):
        assert _same_action(env_action, layout.to_env(row, clip=False))


def test_layout_env_types():
    assert type(ActionLayout(Discrete(3)).to_env(np.int64(2), clip=False)) is int
    assert ActionLayout(Discrete(3)).to_env_batch(np.array([0, 2]), clip=True) == [0, 2]
    action = ActionLayout(Tuple((Discrete(3), MultiBinary(2)))).to_env(
        np.array([2.0, 1.0, 0.0], np.float32), clip=False)
    assert type(action[0]) is int and action[1].dtype == np.int8
    md = ActionLayout(MultiDiscrete([3, 3], dtype=np.int32))
    assert md.to_env(np.array([1, 2]), clip=False).dtype == np.int32


def test_box_leaves_are_clipped_only_when_asked():
    space = Dict({"steer": Box(-1.0, 1.0, (2,), np.float32), "pick": Discrete(2),
                  "force": Box(np.array([0.0, -5.0]), np.array([1.0, 5.0]), dtype=np.float64)})
    layout = ActionLayout(space)  # slots: force [0, 2), pick [2], steer [3, 5)
    row = np.array([3.0, -9.0, 1.0, -1.5, 0.5], np.float32)
    clipped = layout.to_env(row, clip=True)
    np.testing.assert_array_equal(clipped["force"], [1.0, -5.0])
    assert clipped["force"].dtype == np.float64 and clipped["pick"] == 1
    np.testing.assert_array_equal(clipped["steer"], np.array([-1.0, 0.5], np.float32))
    assert space.contains(clipped)
    raw = layout.to_env(row, clip=False)
    np.testing.assert_array_equal(raw["force"], [3.0, -9.0])
    np.testing.assert_array_equal(raw["steer"], np.array([-1.5, 0.5], np.float32))
    # A flat Box: to_env_batch clips all rows at once.
    box = ActionLayout(Box(-1.0, 1.0, (2,), np.float32))
    rows = np.array([[2.0, -0.5], [-3.0, 0.25]], np.float32)
    np.testing.assert_array_equal(np.stack(box.to_env_batch(rows, clip=True)),
                                  [[1.0, -0.5], [-1.0, 0.25]])
    np.testing.assert_array_equal(np.stack(box.to_env_batch(rows, clip=False)), rows)
    # Out-of-bounds Box values fit the batch (samples are stored unclipped).
    np.testing.assert_array_equal(box.from_env(np.array([2.0, -0.5])), [2.0, -0.5])


@pytest.mark.parametrize("space, action", [
    (Discrete(3), 3),
    (Discrete(3), 1.5),
    (Discrete(3), "a"),
    (Box(-1, 1, (2,)), np.zeros(3)),
    (MultiDiscrete([2, 3]), [1, 3]),
    (MultiDiscrete([2, 3]), [1]),
    (MultiBinary(2), [0, 2]),
    (Tuple((Discrete(2), Box(-1, 1, (2,)))), (1,)),
    (Tuple((Discrete(2), Box(-1, 1, (2,)))), (1, np.zeros(3))),
    (Dict({"a": Discrete(2), "b": MultiBinary(1)}), {"a": 1}),
    (Dict({"a": Discrete(2)}), 1),
])
def test_from_env_refuses_actions_that_do_not_fit(space, action):
    with pytest.raises(ValueError) as err:
        ActionLayout(space).from_env(action)
    message = str(err.value)
    assert str(space) in message and repr(action)[:10] in message


# ------------------------------------------------------------------- export
class _TinyModel(nn.Module):
    """Scriptable catalog-like model: ``obs -> (dist_inputs, value)``."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, num_outputs)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(obs) * 4.0, obs[:, 0]


@pytest.mark.parametrize("name", list(SPACES))
def test_export_gives_the_distributions_mode(name, tmp_path):
    space = SPACES[name]
    obs_space = Box(-1.0, 1.0, (4,), np.float32)
    dist_class, num_inputs = get_dist_class(space)
    model = _TinyModel(num_inputs)
    module = DistInputsGreedy(model, space, dist_class.__name__, clip_actions=True)
    exported = to_torchscript(module, obs_space)
    assert isinstance(exported, torch.jit.RecursiveScriptModule)  # scripted, not traced
    obs = torch.rand(9, 4) * 2 - 1
    got = exported(obs)
    mode = dist_class(model(obs)[0]).deterministic_sample()
    layout = ActionLayout(space)
    if layout.nested:
        assert got.dtype == torch.float32 and got.shape == (9, layout.size)
        expected = np.stack([layout.from_env(layout.to_env(row, clip=True))
                             for row in mode.numpy()])  # Box leaves clipped
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    else:
        assert got.dtype == torch.int64 and got.shape == (9, *space.shape)
        assert torch.equal(got.reshape(9, -1), mode)
    for row in got.numpy():
        assert space.contains(layout.to_env(row, clip=False))

    path = write_export(str(tmp_path), module, obs_space, space, {"algorithm": "test"})
    meta = json.load(open(os.path.join(tmp_path, "policy.json")))
    assert meta["action_space"] == json.loads(json.dumps(describe_space(space)))
    assert torch.equal(torch.jit.load(path)(obs), got)
    if layout.nested:
        assert "ActionLayout" in meta["output"] and f"[B, {layout.size}]" in meta["output"]
        slots = [entry["slots"] for entry in meta["action_row"]]
        assert slots == [[leaf.offset, leaf.offset + leaf.size] for leaf in layout.leaves]
    else:
        assert "int64" in meta["output"]


def test_describe_space_of_new_action_spaces():
    assert describe_space(MultiDiscrete([[2, 3], [4, 5]])) == {
        "type": "MultiDiscrete", "shape": [2, 2], "dtype": "int64",
        "nvec": [[2, 3], [4, 5]], "start": [[0, 0], [0, 0]]}
    assert describe_space(MultiBinary(3)) == {"type": "MultiBinary", "shape": [3],
                                              "dtype": "int8", "n": 3}
    desc = describe_space(NESTED_DICT)
    assert desc["type"] == "Dict" and desc["keys"] == ["buttons", "gear", "move"]
    assert desc["spaces"]["move"]["type"] == "Tuple"
    assert desc["spaces"]["move"]["spaces"][0] == {"type": "Discrete", "n": 3, "start": 0,
                                                   "dtype": "int64"}
    assert desc["spaces"]["gear"]["spaces"]["level"]["nvec"] == [4, 2, 5]
