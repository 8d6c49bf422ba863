"""Replay buffer: FIFO order, sampling, priorities, reference staleness, state round-trip."""

import numpy as np
import pytest

from reval_jax.data.batch import Trajectories, concatenate
from reval_jax.data.replay import ReplayBuffer

T = 6


def make_trajectories(
    ids, iteration: int = 0, ref_version: int = 0, length: int = T
) -> Trajectories:
    """Trajectories tagged by `group_id = id`; token values also encode the id."""
    ids = np.asarray(ids)
    n = len(ids)
    pos = np.arange(length)
    resp = (pos >= 2)[None, :] & (pos < 2 + 1 + ids[:, None] % (length - 2))  # varying lengths
    attn = pos[None, :] < 2 + 1 + ids[:, None] % (length - 2)
    return Trajectories.from_numpy(
        dict(
            tokens=np.where(attn, 100 * ids[:, None] + pos + 1, 0),
            attn_mask=attn,
            response_mask=resp,
            s1_index=np.full(n, 1),
            group_id=ids,
            reward=ids % 2,
            raw_reward=ids % 2,
            ref_logp=np.where(resp, -0.5, 0.0),
            ref_v=np.full(n, 0.25),
            ref_version=np.full(n, ref_version),
            sampler_logp=np.where(resp, -0.4, 0.0),
            iteration=np.full(n, iteration),
        )
    )


def ids_of(batch: Trajectories) -> list[int]:
    return [int(x) for x in batch.group_id]


def test_fifo_eviction_order():
    buf = ReplayBuffer(5, T)
    buf.add(make_trajectories([0, 1, 2]))
    assert ids_of(buf.contents()) == [0, 1, 2] and buf.size == 3
    buf.add(make_trajectories([3, 4, 5]))
    assert ids_of(buf.contents()) == [1, 2, 3, 4, 5]
    assert buf.stats()["num_evicted"] == 1
    buf.add(make_trajectories([6, 7, 8, 9]))
    assert ids_of(buf.contents()) == [5, 6, 7, 8, 9] and len(buf) == 5
    assert buf.stats()["num_evicted"] == 5
    contents = buf.contents()
    reference = make_trajectories([5, 6, 7, 8, 9])
    for name, value in reference.to_numpy().items():
        np.testing.assert_array_equal(contents.to_numpy()[name], value, err_msg=name)
    with pytest.raises(ValueError, match="capacity"):
        buf.add(make_trajectories(range(6)))


def test_add_pads_to_buffer_length_and_rejects_longer():
    buf = ReplayBuffer(4, T + 3, pad_id=-1)
    short = make_trajectories([1, 2])
    buf.add(short)
    stored = buf.contents()
    assert stored.length == T + 3
    np.testing.assert_array_equal(stored.tokens[:, :T], short.tokens)
    assert np.all(stored.tokens[:, T:] == -1)
    for name in ("attn_mask", "response_mask", "ref_logp", "sampler_logp"):
        np.testing.assert_array_equal(getattr(stored, name)[:, :T], getattr(short, name))
        assert not np.any(getattr(stored, name)[:, T:])
    with pytest.raises(ValueError, match="exceeds the replay buffer's seq_len"):
        buf.add(make_trajectories([3], length=T + 4))


def test_sampling_without_replacement():
    buf = ReplayBuffer(8, T, seed=1)
    buf.add(make_trajectories(range(10, 18)))
    contents = ids_of(buf.contents())
    for _ in range(50):
        sample = buf.sample(5)
        assert len(set(sample.indices.tolist())) == 5
        assert np.all((sample.indices >= 0) & (sample.indices < buf.size))
        np.testing.assert_array_equal(sample.weights, np.ones(5, np.float32))
        # The batch holds the entries stored at the returned slots.
        assert ids_of(sample.batch) == [10 + int(i) for i in sample.indices]
    everything = buf.sample(8)
    assert sorted(ids_of(everything.batch)) == contents
    with pytest.raises(ValueError, match="cannot sample 9 distinct trajectories"):
        buf.sample(9)


def test_same_seed_same_samples():
    a, b = ReplayBuffer(8, T, seed=3), ReplayBuffer(8, T, seed=3)
    other = ReplayBuffer(8, T, seed=4)
    for buf in (a, b, other):
        buf.add(make_trajectories(range(8)))
    draws_a = [a.sample(4).indices.tolist() for _ in range(5)]
    assert draws_a == [b.sample(4).indices.tolist() for _ in range(5)]
    assert draws_a != [other.sample(4).indices.tolist() for _ in range(5)]


@pytest.mark.parametrize("prioritized", [False, True])
def test_state_round_trip_gives_identical_future(prioritized, tmp_path):
    original = ReplayBuffer(6, T, seed=5, prioritized=prioritized)
    original.add(make_trajectories(range(4), iteration=0))
    original.add(make_trajectories(range(4, 8), iteration=1))
    first = original.sample(3)
    if prioritized:
        original.update_priorities(first.indices, np.array([0.1, 2.0, 0.7]))
    state = original.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    np.savez(tmp_path / "replay.npz", **state)  # as a checkpoint would store it
    with np.load(tmp_path / "replay.npz") as loaded:
        state = {k: loaded[k] for k in loaded.files}

    restored = ReplayBuffer(6, T, seed=999, prioritized=prioritized)
    restored.load_state_dict(state)
    assert restored.stats() == original.stats()
    for step in range(4):
        x, y = original.sample(3, iteration=2), restored.sample(3, iteration=2)
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.weights, y.weights)
        for name, value in x.batch.to_numpy().items():
            np.testing.assert_array_equal(y.batch.to_numpy()[name], value, err_msg=name)
        batch = make_trajectories([20 + step], iteration=2)
        original.add(batch)
        restored.add(batch)
    assert restored.stats() == original.stats()
    np.testing.assert_array_equal(restored.uses(), original.uses())

    wrong = ReplayBuffer(7, T)
    with pytest.raises(ValueError, match="capacity"):
        wrong.load_state_dict(state)


def test_stale_reference_entries_are_recomputed_and_written_back():
    buf = ReplayBuffer(6, T, seed=2)
    buf.add(make_trajectories([0, 1, 2], ref_version=1))
    buf.add(make_trajectories([3, 4, 5], ref_version=0))
    buf.add(make_trajectories([6], ref_version=-1))  # never computed; evicts id 0
    calls = []

    def recompute(batch):
        calls.append(ids_of(batch))
        ref_logp = np.full(batch.tokens.shape, -2.0)  # junk outside the response is masked
        return ref_logp, batch.group_id.astype(np.float32) * 10.0

    sample = buf.sample(6, ref_version=1, recompute_fn=recompute)
    assert len(calls) == 1
    assert sorted(calls[0]) == [3, 4, 5, 6]  # only the stale ones
    assert sample.num_recomputed == 4
    batch = sample.batch
    assert np.all(batch.ref_version == 1)
    for i, gid in enumerate(ids_of(batch)):
        if gid in (3, 4, 5, 6):
            assert batch.ref_v[i] == 10.0 * gid
            np.testing.assert_array_equal(
                batch.ref_logp[i], np.where(batch.response_mask[i], -2.0, 0.0)
            )
        else:
            assert batch.ref_v[i] == 0.25
    # Written back: the buffer now holds the recomputed values with the new version.
    contents = buf.contents()
    assert ids_of(contents) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(contents.ref_version, np.ones(6))
    np.testing.assert_array_equal(contents.ref_v, [0.25, 0.25, 30.0, 40.0, 50.0, 60.0])

    def fail(batch):
        raise AssertionError("nothing is stale")

    again = buf.sample(6, ref_version=1, recompute_fn=fail)
    assert again.num_recomputed == 0 and buf.stats()["num_recomputed"] == 4
    with pytest.raises(ValueError, match="no recompute_fn"):
        buf.sample(2, ref_version=2)
    with pytest.raises(ValueError, match="recompute_fn returned"):
        buf.sample(2, ref_version=3, recompute_fn=lambda b: (np.zeros((1, T)), np.zeros(1)))


def test_flush():
    buf = ReplayBuffer(4, T)
    buf.add(make_trajectories([0, 1, 2]))
    buf.sample(2)
    buf.flush()
    assert buf.size == 0 and ids_of(buf.contents()) == []
    stats = buf.stats()
    assert stats["num_evicted"] == 3 and stats["uses_mean_evicted"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="cannot sample"):
        buf.sample(1)
    buf.add(make_trajectories([7, 8]))
    assert ids_of(buf.contents()) == [7, 8]
    assert sorted(ids_of(buf.sample(2).batch)) == [7, 8]


def test_prioritized_sampling_frequencies_match_priorities():
    alpha = 0.7
    buf = ReplayBuffer(6, T, seed=11, prioritized=True, alpha=alpha, priority_eps=0.0)
    buf.add(make_trajectories(range(6)))
    priorities = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
    buf.update_priorities(np.arange(6), priorities)
    expected = priorities**alpha / np.sum(priorities**alpha)
    draws = 12000
    counts = np.bincount([int(buf.sample(1).indices[0]) for _ in range(draws)], minlength=6)
    chi2 = np.sum((counts - draws * expected) ** 2 / (draws * expected))
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 5 degrees of freedom
    uniform = np.full(6, 1 / 6)  # the test discriminates: uniform draws would fail it
    assert np.sum((counts - draws * uniform) ** 2 / (draws * uniform)) > 1000
    # Without replacement in prioritised mode too.
    for _ in range(20):
        assert len(set(buf.sample(4).indices.tolist())) == 4


def test_importance_weights_and_new_entry_priority():
    alpha, beta, eps = 0.6, 0.4, 1e-3
    buf = ReplayBuffer(8, T, seed=4, prioritized=True, alpha=alpha, beta_is=beta, priority_eps=eps)
    buf.add(make_trajectories(range(5)))
    np.testing.assert_array_equal(buf.priorities(), np.ones(5))  # initial max priority 1
    abs_delta = np.array([0.2, 3.0, 0.05, 1.5, 0.7])
    buf.update_priorities(np.arange(5), -abs_delta)  # the sign of δ is ignored
    buf.add(make_trajectories([5]))  # gets the current max priority
    p = np.append(abs_delta + eps, 3.0 + eps)
    np.testing.assert_allclose(buf.priorities(), p)
    probs = p**alpha / np.sum(p**alpha)
    w_all = (6 * probs) ** (-beta)
    sample = buf.sample(4)
    np.testing.assert_allclose(sample.weights, w_all[sample.indices] / w_all.max(), rtol=1e-6)
    assert np.all(sample.weights <= 1.0)
    with pytest.raises(ValueError, match="out of range"):
        buf.update_priorities(np.array([6]), np.array([1.0]))
    with pytest.raises(ValueError, match="prioritized=True"):
        ReplayBuffer(4, T).update_priorities(np.array([0]), np.array([1.0]))


def test_usage_counts_and_ages():
    buf = ReplayBuffer(4, T, seed=0)
    buf.add(make_trajectories([0, 1], iteration=0))
    buf.add(make_trajectories([2, 3], iteration=1))
    sample = buf.sample(4, iteration=3)
    ages = {gid: int(a) for gid, a in zip(ids_of(sample.batch), sample.ages, strict=True)}
    assert ages == {0: 3, 1: 3, 2: 2, 3: 2}
    stats = buf.stats()
    assert stats["sample_age_mean"] == 2.5 and stats["sample_age_max"] == 3
    np.testing.assert_array_equal(buf.uses(), [1, 1, 1, 1])
    buf.sample(1)
    buf.add(make_trajectories([4, 5], iteration=2))  # evicts ids 0 and 1
    uses = buf.uses()
    assert uses[2:].tolist() == [0, 0]
    stats = buf.stats()
    assert stats["uses_mean_current"] == pytest.approx(uses.mean())
    evicted_uses = 4 + 1 - uses[:2].sum()  # 5 draws in all, minus those of ids 2 and 3
    assert stats["uses_mean_evicted"] == pytest.approx(evicted_uses / 2)
    # Without an explicit iteration the newest added iteration is the current one.
    sample = buf.sample(4)
    expected = [0 if gid in (4, 5) else 1 for gid in ids_of(sample.batch)]  # 2 − iteration
    np.testing.assert_array_equal(sample.ages, expected)


def test_trajectories_helpers():
    a, b = make_trajectories([0, 1]), make_trajectories([2, 3, 4])
    both = concatenate([a, b])
    assert ids_of(both) == [0, 1, 2, 3, 4]
    assert ids_of(both.take(np.array([4, 0]))) == [4, 0]
    assert both.num_response_tokens() == int(a.response_mask.sum() + b.response_mask.sum())
    round_trip = Trajectories.from_numpy(both.to_numpy())
    for name, value in both.to_numpy().items():
        np.testing.assert_array_equal(getattr(round_trip, name), value)
    with pytest.raises(ValueError, match="missing"):
        Trajectories.from_numpy({k: v for k, v in a.to_numpy().items() if k != "ref_v"})
    with pytest.raises(ValueError, match="different lengths"):
        concatenate([a, make_trajectories([5], length=T + 1)])
