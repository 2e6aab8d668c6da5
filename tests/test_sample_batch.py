"""Tests for SampleBatch / MultiAgentBatch (flowrl/sample_batch.py)."""

import pickle

import numpy as np
import pytest

from flowrl.data.sample_batch import DEFAULT_POLICY_ID, MultiAgentBatch, SampleBatch, minibatch_bounds


def make_batch(n: int = 10, offset: int = 0) -> SampleBatch:
    rows = np.arange(offset, offset + n)
    return SampleBatch(
        {
            SampleBatch.OBS: np.stack([rows, rows * 10], axis=1).astype(np.float32),
            SampleBatch.ACTIONS: rows.copy(),
            SampleBatch.REWARDS: rows * 2.0,
        }
    )


def test_construction_converts_lists_and_counts_rows():
    batch = SampleBatch(obs=[[1.0, 2.0], [3.0, 4.0]], rewards=[0.5, 1.5], infos=[{"a": 1}, {}])
    assert isinstance(batch["obs"], np.ndarray) and batch["obs"].shape == (2, 2)
    assert batch["rewards"].dtype == np.float64
    assert batch["infos"].dtype == object and batch["infos"][0] == {"a": 1}
    assert batch.count == 2 and len(batch) == 2
    assert SampleBatch().count == 0
    assert SampleBatch.OBS == "obs" and SampleBatch.VALUE_TARGETS == "value_targets"
    assert "count=2" in repr(batch) and "obs" in repr(batch)


def test_unequal_lengths_error_names_every_column():
    with pytest.raises(ValueError) as err:
        SampleBatch(obs=np.zeros((3, 2)), rewards=np.zeros(4))
    assert "obs=3" in str(err.value) and "rewards=4" in str(err.value)


def test_setting_wrong_length_column_names_it():
    batch = make_batch(5)
    with pytest.raises(ValueError, match="'advantages'.*length 4"):
        batch["advantages"] = np.zeros(4)
    batch["advantages"] = np.zeros(5)
    with pytest.raises(ValueError, match="'weights'"):
        batch.update(weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        batch["t"] = 3


def test_concat_samples_and_concat():
    a, b = make_batch(4), make_batch(3, offset=4)
    joined = SampleBatch.concat_samples([a, SampleBatch(), b])
    assert isinstance(joined, SampleBatch) and joined.count == 7
    np.testing.assert_array_equal(joined["actions"], np.arange(7))
    np.testing.assert_array_equal(a.concat(b)["obs"], joined["obs"])
    assert SampleBatch.concat_samples([]).count == 0
    with pytest.raises(ValueError, match="rewards"):
        SampleBatch.concat_samples([a, SampleBatch(obs=b["obs"], actions=b["actions"])])


def test_from_arrays_takes_the_columns_as_they_are():
    obs, rewards = np.zeros((3, 2), np.float32), np.ones(3, np.float32)
    batch = SampleBatch.from_arrays({"obs": obs, "rewards": rewards})
    assert isinstance(batch, SampleBatch) and batch.count == 3
    assert batch["obs"] is obs and batch["rewards"] is rewards  # no copies, no conversion
    batch["actions"] = np.arange(3)  # checks apply again to later changes
    with pytest.raises(ValueError, match="actions"):
        batch["actions"] = np.arange(4)


def test_slicing_returns_views():
    batch = make_batch(30)
    part = batch[10:20]
    assert isinstance(part, SampleBatch) and part.count == 10
    np.testing.assert_array_equal(part["actions"], np.arange(10, 20))
    assert np.shares_memory(part["obs"], batch["obs"])
    np.testing.assert_array_equal(batch.slice(25, 30)["rewards"], batch["rewards"][25:])
    assert batch[-5:].count == 5


def test_copy_is_independent():
    batch = make_batch(4)
    clone = batch.copy()
    clone["rewards"][0] = 99.0
    assert batch["rewards"][0] == 0.0


def test_shuffle_permutes_all_columns_consistently():
    batch = make_batch(50)
    result = batch.shuffle(seed=3)
    assert result is batch
    actions = batch["actions"]
    assert not np.array_equal(actions, np.arange(50))
    np.testing.assert_array_equal(np.sort(actions), np.arange(50))
    np.testing.assert_array_equal(batch["rewards"], actions * 2.0)
    np.testing.assert_array_equal(batch["obs"][:, 1], actions * 10)
    again = make_batch(50).shuffle(seed=3)
    np.testing.assert_array_equal(again["actions"], actions)


def test_minibatch_bounds_remainder_rule():
    assert minibatch_bounds(9, 4) == [(0, 4), (4, 9)]  # remainder 1 < 4/2 -> merged
    assert minibatch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]  # remainder 2 == 4/2 -> kept
    assert minibatch_bounds(11, 4) == [(0, 4), (4, 8), (8, 11)]  # remainder 3 kept
    assert minibatch_bounds(5, 0) == [(0, 5)]
    assert minibatch_bounds(5, 8) == [(0, 5)]
    assert minibatch_bounds(0, 8) == []


@pytest.mark.parametrize("n,size", [(100, 32), (64, 16), (7, 3), (5, 10)])
def test_minibatches_cover_every_row_once(n, size):
    batch = make_batch(n)
    seen = []
    for mb in batch.minibatches(size, shuffle=True, seed=0):
        assert isinstance(mb, SampleBatch)
        assert mb.count <= max(size * 1.5, n if n < size else 0)
        np.testing.assert_array_equal(mb["rewards"], mb["actions"] * 2.0)
        seen.extend(mb["actions"].tolist())
    assert sorted(seen) == list(range(n))
    # the source batch is untouched
    np.testing.assert_array_equal(batch["actions"], np.arange(n))
    ordered = [mb["actions"] for mb in batch.minibatches(size, shuffle=False)]
    np.testing.assert_array_equal(np.concatenate(ordered), np.arange(n))


def test_split_by_episode_uses_contiguous_runs():
    batch = make_batch(6)
    batch[SampleBatch.EPS_ID] = np.array([7, 7, 3, 3, 3, 7])
    pieces = batch.split_by_episode()
    assert [p.count for p in pieces] == [2, 3, 1]
    assert [int(p[SampleBatch.EPS_ID][0]) for p in pieces] == [7, 3, 7]
    np.testing.assert_array_equal(pieces[1]["actions"], [2, 3, 4])
    with pytest.raises(ValueError, match="eps_id"):
        make_batch(3).split_by_episode()


def test_size_bytes():
    batch = make_batch(10)
    expected = sum(v.nbytes for v in batch.values())
    assert batch.size_bytes() == expected
    batch["infos"] = [{} for _ in range(10)]
    assert batch.size_bytes() > expected + batch["infos"].nbytes


def test_seq_lens_is_exempt_from_row_count_and_slices_on_boundaries():
    batch = make_batch(5)
    batch[SampleBatch.SEQ_LENS] = np.array([2, 3])
    assert batch.count == 5
    np.testing.assert_array_equal(batch.slice(2, 5)[SampleBatch.SEQ_LENS], [3])
    with pytest.raises(ValueError, match="seq_lens"):
        batch.slice(1, 5)
    with pytest.raises(ValueError, match="seq_lens"):
        batch.shuffle()


def test_pickle_round_trip():
    batch = make_batch(4)
    restored = pickle.loads(pickle.dumps(batch))
    assert isinstance(restored, SampleBatch)
    np.testing.assert_array_equal(restored["obs"], batch["obs"])


def test_multi_agent_batch_concat():
    ma1 = MultiAgentBatch({"p1": make_batch(3), "p2": make_batch(2)}, env_steps=3)
    ma2 = MultiAgentBatch({"p1": make_batch(4, offset=3)}, env_steps=4)
    joined = SampleBatch.concat_samples([ma1, ma2])
    assert isinstance(joined, MultiAgentBatch)
    assert joined.count == joined.env_steps == 7
    assert joined.agent_steps() == 9
    np.testing.assert_array_equal(joined.policy_batches["p1"]["actions"], np.arange(7))
    assert joined.policy_batches["p2"].count == 2
    assert joined.size_bytes() == sum(b.size_bytes() for b in joined.policy_batches.values())
    clone = joined.copy()
    clone.policy_batches["p1"]["rewards"][0] = -1.0
    assert joined.policy_batches["p1"]["rewards"][0] == 0.0


def test_as_multi_agent():
    ma = make_batch(5).as_multi_agent()
    assert DEFAULT_POLICY_ID == "default_policy"
    assert list(ma.policy_batches) == [DEFAULT_POLICY_ID] and ma.env_steps == 5
    assert make_batch(2).as_multi_agent("p").policy_batches["p"].count == 2
