"""The sequential release test: its interval, stratification, and (a short version of `bench/canary.py`) its error
rates and power by simulation."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.release import SequentialTest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import canary


def test_evidence_is_the_stratified_difference_with_the_msprt_interval() -> None:
    t = SequentialTest(alpha=0.05, tau=0.05, min_rewards=2)
    for x in (1.0, 0.0, 1.0, 1.0):
        t.add("qa/direct", x, challenger=True)
    for x in (0.0, 1.0, 0.0):
        t.add("qa/direct", x, challenger=False)
    ev = t.evidence()
    assert ev is not None
    vc, vr = np.var([1, 0, 1, 1], ddof=1), np.var([0, 1, 0], ddof=1)
    var = vc / 4 + vr / 3
    t2 = 0.05**2
    r = math.sqrt(var * (var + t2) / t2 * (2 * math.log(20) + math.log((var + t2) / var)))
    assert ev.diff == pytest.approx(0.75 - 1 / 3)
    assert (ev.lower, ev.upper) == (pytest.approx(ev.diff - r), pytest.approx(ev.diff + r))
    assert (ev.n_challenger, ev.n_reference) == (4, 3)


def test_a_different_strategy_mix_is_not_taken_for_a_better_adapter() -> None:
    # both adapters are equally good per strategy; the canary happens to serve the easy strategy more often
    rng = random.Random(0)
    t = SequentialTest(min_rewards=30)
    for _ in range(4000):
        easy = rng.random() < 0.8
        t.add("qa/easy" if easy else "qa/hard", float(rng.random() < (0.9 if easy else 0.1)), challenger=True)
        easy = rng.random() < 0.2
        t.add("qa/easy" if easy else "qa/hard", float(rng.random() < (0.9 if easy else 0.1)), challenger=False)
    verdict, ev = t.decide()
    assert ev is not None and abs(ev.diff) < 0.05, ev
    assert verdict == "continue"  # a pooled comparison would have promoted: 0.74 against 0.26


def test_nothing_is_decided_before_both_sides_have_the_minimum() -> None:
    t = SequentialTest(min_rewards=30)
    for _ in range(29):
        t.add("s", 1.0, challenger=True)
        t.add("s", 0.0, challenger=False)
    assert t.decide() == ("continue", None)
    t.add("s", 1.0, challenger=True)
    t.add("s", 0.0, challenger=False)
    assert t.decide()[0] == "promote"


def test_the_simulation_agrees_with_the_test_object_reward_by_reward() -> None:
    # the vectorised simulation decides exactly where SequentialTest would, on the same rewards
    rule = SequentialTest(min_rewards=10, max_rewards=3000)
    rng = np.random.default_rng(11)
    v1, a1 = canary.sequential(rng, 1, 0.15, "bernoulli", rule, share=0.5, block=100_000)
    rng = np.random.default_rng(11)
    is_c = rng.random((1, 100_000)) < 0.5
    r = canary._rewards(rng, np.where(is_c, canary.BASE_MEAN + 0.15, canary.BASE_MEAN), "bernoulli")
    t = SequentialTest(alpha=rule.alpha, tau=rule.tau, min_rewards=rule.min_rewards, max_rewards=rule.max_rewards)
    for c, x in zip(is_c[0], r[0], strict=True):
        t.add("s", float(x), challenger=bool(c))
        verdict1, ev = t.decide()
        if verdict1 != "continue":
            break
    assert {"promote": 1, "rollback": -1, "expired": 0}[verdict1] == v1[0]
    assert ev is not None and ev.n_challenger == a1[0]


@pytest.mark.parametrize("kind", ["bernoulli", "beta"])
def test_error_rates_and_power_by_simulation(kind: str) -> None:
    """300 canaries per case (the bench runs 1,000): equal quality promoted at most at alpha (5%); +0.05 promoted
    and -0.05 rolled back in at least 80% within the cap; a regression after promotion rolled back."""
    rule = SequentialTest(max_rewards=6000)
    rng = np.random.default_rng([1, len(kind)])
    v, _ = canary.sequential(rng, 300, 0.0, kind, rule, share=0.1)
    assert (v == 1).mean() <= 0.05
    v, _ = canary.sequential(rng, 300, 0.05, kind, rule, share=0.1)
    assert (v == 1).mean() >= 0.8 and (v == -1).mean() <= 0.05
    v, _ = canary.sequential(rng, 300, -0.05, kind, rule, share=0.1)
    assert (v == -1).mean() >= 0.8 and (v == 1).mean() <= 0.05
    back = canary.watch(rng, 100, -0.10, kind, rule, share=0.1)
    assert (back >= 0).mean() >= 0.8


def test_the_router_promotes_watches_and_rolls_back_on_rewards_not_utilities() -> None:
    from serving.router import Router
    from taoflow.settings import Settings

    cfg = Settings(overrides={"serve": {"canary_fraction": 0.5, "watch_fraction": 0.5, "promote_after": 30}}).serve
    r = Router(cfg, initial_utility=0.0, noise_s=0.0, seed=1)
    counts: dict[str, int] = {}

    def reward(op: str, x: float, live: bool = True) -> None:
        counts[op] = counts.get(op, 0) + 1
        r.update_utility("qa", op, x, counts[op], last_reward=x, live=live)

    rng = random.Random(5)
    for _ in range(50):  # before the canary: the incumbent's rewards are no evidence about it
        reward("default@base", 0.0)
    r.apply_event("published", "ad1")
    reward("default@ad1", 1.0, live=False)  # a replayed update (catch-up after a restart) is not counted
    assert r.test is None or r.test.evidence() is None
    decision = None
    while decision is None:
        reward("default@ad1", float(rng.random() < 0.8))
        reward("default@base", float(rng.random() < 0.5))
        decision = r.decide()
    assert decision.action == "promoted" and r.incumbent == "ad1"
    assert decision.metrics["lower"] > 0 and decision.metrics["n_challenger"] >= 30
    # watched: the base it replaced keeps a share of the traffic, and the same test rolls a regression back
    served = [r.choose("qa").adapter for _ in range(400)]
    assert 100 < served.count(None) < 300 and served.count("ad1") > 100
    decision = None
    while decision is None:
        reward("default@ad1", float(rng.random() < 0.3))
        reward("default@base", float(rng.random() < 0.5))
        decision = r.decide()
    assert decision.action == "rolled_back" and decision.adapter == "ad1" and r.incumbent is None
    assert "worse than the adapter it replaced" in decision.reason


def test_an_equal_canary_is_not_promoted_and_is_rolled_back_unproven_at_the_cap() -> None:
    from serving.router import Router
    from taoflow.settings import Settings

    cfg = Settings(overrides={"serve": {"release_max_rewards": 400}}).serve
    r = Router(cfg, initial_utility=0.0, noise_s=0.0, seed=2)
    r.apply_event("published", "ad1")
    rng = random.Random(9)
    decision = None
    n = 0
    while decision is None:
        n += 1
        r.update_utility("qa", "default@ad1", 0.5, n, last_reward=float(rng.random() < 0.5), live=True)
        r.update_utility("qa", "default@base", 0.5, n, last_reward=float(rng.random() < 0.5), live=True)
        decision = r.decide()
    assert decision.action == "rolled_back" and "not shown better after 400 rewards" in decision.reason
    assert n == 400
