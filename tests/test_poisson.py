"""Poisson sampler: inclusion frequency, reproducible resume, rank splits."""
import json

import numpy as np
import pytest

from dpldm.data.poisson import PoissonSampler, split_for_rank
from dpldm.errors import DpldmError


def test_inclusion_frequency_is_q_per_example_and_batch_size_is_binomial():
    n, q, steps = 2000, 0.05, 400
    sampler = PoissonSampler(n, q, seed=0)
    counts = np.zeros(n)
    sizes = []
    for _ in range(steps):
        idx = sampler.next_indices()
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0) and (idx.size == 0 or idx[-1] < n)
        counts[idx] += 1
        sizes.append(idx.size)
    assert sampler.steps_taken == steps
    # total inclusions ~ Binomial(n·steps, q): 5 standard deviations
    total, mean = counts.sum(), n * steps * q
    assert abs(total - mean) < 5 * np.sqrt(mean * (1 - q))
    # each example separately ~ Binomial(steps, q): no example is favoured
    sd = np.sqrt(steps * q * (1 - q))
    assert np.abs(counts - steps * q).max() < 6 * sd
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.25)   # variable batch sizes


def test_state_dict_round_trip_reproduces_the_draws():
    a = PoissonSampler(1000, 0.03, seed=5)
    for _ in range(7):
        a.next_indices()
    state = json.loads(json.dumps(a.state_dict()))       # JSON-serialisable
    expected = [a.next_indices() for _ in range(5)]
    assert "seed" not in json.dumps(state)                # the seed is secret: never in a checkpoint's state
    b = PoissonSampler(1000, 0.03, seed=5)
    b.load_state_dict(state)
    assert b.steps_taken == 7
    for want in expected:
        assert np.array_equal(b.next_indices(), want)
    assert b.steps_taken == 12
    other = PoissonSampler(1000, 0.03, seed=999)          # the state alone does not give the batches
    other.load_state_dict(state)
    assert not np.array_equal(other.next_indices(), expected[0])


def test_secure_mode_draws_poisson_batches_from_the_keystream():
    a = PoissonSampler(2000, 0.05, seed=3, secure=True)
    sizes = [len(a.next_indices()) for _ in range(40)]
    assert abs(np.mean(sizes) - 100) < 6 * np.sqrt(100 * 0.95 / 40)    # Binomial(2000, 0.05) batches
    b = PoissonSampler(2000, 0.05, seed=3, secure=True)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.next_indices(), b.next_indices())          # same seed + step: same draws
    assert not np.array_equal(PoissonSampler(2000, 0.05, seed=3).next_indices(),
                              PoissonSampler(2000, 0.05, seed=3, secure=True).next_indices())


def test_same_seed_same_draws_other_seed_other_draws():
    def draw(seed):
        return PoissonSampler(500, 0.1, seed).next_indices()

    assert np.array_equal(draw(1), draw(1))
    assert not np.array_equal(draw(1), draw(2))


def test_state_for_another_dataset_is_refused():
    state = PoissonSampler(100, 0.1, 0).state_dict()
    with pytest.raises(DpldmError, match="n=100"):
        PoissonSampler(200, 0.1, 0).load_state_dict(state)
    with pytest.raises(DpldmError, match="malformed"):
        PoissonSampler(100, 0.1, 0).load_state_dict({"n": 100})


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n_idx", [0, 1, 2, 10, 11])
def test_split_for_rank_covers_each_index_exactly_once(world_size, n_idx):
    idx = np.sort(np.random.default_rng(n_idx).choice(1000, n_idx, replace=False)).astype(np.int64)
    parts = [split_for_rank(idx, r, world_size) for r in range(world_size)]
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), idx) and len(joined) == len(idx)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_arguments():
    with pytest.raises(DpldmError, match="sample_rate"):
        PoissonSampler(10, 0.0, 0)
    with pytest.raises(DpldmError, match="n \\(dataset size\\)"):
        PoissonSampler(0, 0.1, 0)
    with pytest.raises(DpldmError, match="rank"):
        split_for_rank(np.arange(3), 2, 2)
    assert PoissonSampler(10, 1.0, 0).next_indices().tolist() == list(range(10))
