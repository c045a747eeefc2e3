"""ACT-R maths: the update rule, its closed form, discounting, and noisy selection."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from learners.actr import (
    discounted_reward,
    select_operator,
    selection_probabilities,
    update_utility,
    utility_after,
)


@pytest.mark.parametrize(("u0", "r", "alpha", "n"), [(0.0, 1.0, 0.2, 50), (0.5, 0.1, 0.05, 300), (1.0, 0.3, 1.0, 3)])
def test_iterating_the_rule_matches_the_closed_form(u0: float, r: float, alpha: float, n: int) -> None:
    u = u0
    for _ in range(n):
        u = update_utility(u, r, alpha)
    assert abs(u - utility_after(u0, r, alpha, n)) < 1e-12


def test_discount_lowers_reward_with_time_and_never_raises_it() -> None:
    assert discounted_reward(1.0, 10, 0.05) == pytest.approx(0.5)
    assert discounted_reward(1.0, -5, 0.05) == 1.0  # a clock skew never adds reward


def test_probabilities_are_a_softmax_at_temperature_sqrt2_s() -> None:
    p = selection_probabilities({"a": 0.8, "b": 0.5, "c": 0.1}, 0.2)
    t = math.sqrt(2) * 0.2
    z = sum(math.exp(u / t) for u in (0.8, 0.5, 0.1))
    assert p["a"] == pytest.approx(math.exp(0.8 / t) / z)
    assert sum(p.values()) == pytest.approx(1.0)


def test_noisy_selection_frequencies_match_the_probabilities() -> None:
    utilities = {"a": 0.7, "b": 0.5, "c": 0.2}
    rng = random.Random(3)
    n = 40_000
    counts = Counter(select_operator(utilities, 0.15, rng) for _ in range(n))
    expected = selection_probabilities(utilities, 0.15)
    for op, p in expected.items():
        # the softmax is ACT-R's approximation of the max of logistic draws; it holds to within a few points
        assert abs(counts[op] / n - p) < 0.03, (op, counts[op] / n, p)


def test_selection_without_noise_is_greedy_and_empty_is_an_error() -> None:
    assert select_operator({"a": 0.1, "b": 0.9}, 0.0) == "b"
    with pytest.raises(ValueError, match="no operators"):
        select_operator({}, 0.1)
