"""ACT-R utility learning and noisy-utility selection, as pure functions (shared by streams and serving)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping


def update_utility(previous: float, reward: float, alpha: float) -> float:
    """One step of ACT-R's utility learning rule, `U(n) = U(n-1) + alpha * (R(n) - U(n-1))`.

    >>> update_utility(0.0, 1.0, 0.2)
    0.2
    >>> round(update_utility(0.2, 1.0, 0.2), 10)
    0.36
    """
    return previous + alpha * (reward - previous)


def utility_after(initial: float, reward: float, alpha: float, n: int) -> float:
    """Closed form after `n` identical rewards: `r + (U0 - r) * (1 - alpha) ** n`.

    >>> round(utility_after(0.0, 1.0, 0.5, 2), 10)
    0.75
    """
    return reward + (initial - reward) * (1.0 - alpha) ** n


def discounted_reward(reward: float, seconds_since_selection: float, discount: float) -> float:
    """ACT-R's time-discounted reward, `R - discount * seconds since the operator was selected`.

    >>> discounted_reward(1.0, 30.0, 0.01)
    0.7
    """
    return reward - discount * max(0.0, seconds_since_selection)


def logistic_noise(s: float, rng: random.Random) -> float:
    """A draw from Logistic(0, s) by inverse transform.

    >>> logistic_noise(0.0, random.Random(1))
    0.0
    """
    if s <= 0:
        return 0.0
    u = rng.random()
    while u <= 0.0:  # random() may return exactly 0
        u = rng.random()
    return s * math.log(u / (1.0 - u))


def selection_probabilities(utilities: Mapping[str, float], s: float) -> dict[str, float]:
    """Probability that each operator has the highest noisy utility.

    With logistic noise of scale `s`, ACT-R's conflict resolution is a softmax with temperature
    `t = sqrt(2) * s`: `P(i) = exp(U_i / t) / sum_j exp(U_j / t)`. With `s == 0` the best operator(s)
    share probability 1.

    >>> selection_probabilities({"a": 1.0, "b": 1.0}, 0.5)
    {'a': 0.5, 'b': 0.5}
    >>> selection_probabilities({"a": 1.0, "b": 0.0}, 0.0)
    {'a': 1.0, 'b': 0.0}
    """
    if not utilities:
        return {}
    if s <= 0:
        best = max(utilities.values())
        winners = [k for k, u in utilities.items() if u == best]
        return {k: (1.0 / len(winners) if k in winners else 0.0) for k in utilities}
    t = math.sqrt(2.0) * s
    top = max(utilities.values())
    weights = {k: math.exp((u - top) / t) for k, u in utilities.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def select_operator(utilities: Mapping[str, float], s: float, rng: random.Random | None = None) -> str:
    """The operator with the highest utility plus Logistic(0, s) noise (ties go to the first listed).

    >>> select_operator({"a": 0.9, "b": 0.1}, 0.0)
    'a'
    """
    if not utilities:
        raise ValueError("no operators to select from")
    rng = rng or random.Random()
    return max(utilities, key=lambda k: utilities[k] + logistic_noise(s, rng))
