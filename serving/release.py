"""Release decisions by a sequential test on rewards: promote, roll back, or keep collecting.

A canary's utility is an exponentially weighted average, the right tool for choosing an operator and the wrong
statistic for a release: after a few dozen rewards a utility comparison is mostly noise. This module decides on the
rewards themselves. Canary and incumbent rewards of the same time window are kept per stratum (task type and
strategy, so both are compared on the same mix), and their difference in means is tested with a mixture sequential
probability ratio test (mSPRT, Johari, Pekelis and Walsh, "Always valid inference", 2017): with a normal mixture of
scale `tau` over the true difference, the likelihood ratio

    Lambda_n = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta)^2 / (2 V (V + tau^2)))

(d the stratified difference in means, V its variance) is a martingale under `difference = theta`, so by Ville's
inequality P(Lambda_n ever >= 1/alpha) <= alpha: the test may be looked at after every reward and the error rate
still holds. Inverting it gives an always-valid confidence sequence d +- r_n. Decisions:

- promote when the whole interval lies above `min_effect` (the canary is better, by at least that much, at level
  alpha);
- roll back when the whole interval lies below `-margin` (worse by more than the margin);
- roll back at the cap (`max_rewards` canary rewards) when neither happened: an unproven canary is not shipped;
- a promoted adapter stays watched against its predecessor the same way, and is rolled back when it is worse.

V uses each side's sample variance per stratum (with a floor, and at least `min_rewards` per side before any
decision), the normal approximation the mSPRT for two streams uses. `bench/canary.py` measures the resulting error
rates and power by simulation, beside the utility rule it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["promote", "rollback", "continue", "expired"]

_VAR_FLOOR = 1e-4  # a side whose rewards so far are all equal still has some uncertainty


def radius(var: Any, tau: float, alpha: float, log: Callable[[Any], Any] = math.log) -> Any:
    """Half-width of the always-valid (1 - alpha) interval for a difference with variance `var` (floats, or numpy
    arrays with `log=numpy.log`): where the mSPRT's likelihood ratio reaches 1/alpha."""
    t2 = tau * tau
    return (var * (var + t2) / t2 * (2 * math.log(1 / alpha) + log((var + t2) / var))) ** 0.5


def log_likelihood_ratio(diff: Any, var: Any, tau: float, log: Callable[[Any], Any] = math.log) -> Any:
    """log Lambda of the mSPRT against "no difference"."""
    t2 = tau * tau
    return 0.5 * log(var / (var + t2)) + t2 * diff * diff / (2 * var * (var + t2))


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of one side's rewards in one stratum (Welford)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def var(self) -> float:
        return max(self.m2 / (self.n - 1), _VAR_FLOOR) if self.n > 1 else 0.25


@dataclass(frozen=True)
class Evidence:
    """What a decision rests on: rewards per side, means, the difference's always-valid interval, the statistic."""

    n_challenger: int
    n_reference: int
    mean_challenger: float
    mean_reference: float
    diff: float
    lower: float
    upper: float
    log_lr: float  # log of the mSPRT likelihood ratio against "no difference"
    alpha: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    def describe(self) -> str:
        return (
            f"mean reward {self.mean_challenger:.3f} (n={self.n_challenger}) vs {self.mean_reference:.3f} "
            f"(n={self.n_reference}), difference {self.diff:+.3f}, {100 * (1 - self.alpha):.0f}% always-valid "
            f"interval [{self.lower:+.3f}, {self.upper:+.3f}]"
        )


@dataclass
class SequentialTest:
    """The challenger's rewards against the reference's, per stratum, tested after every reward."""

    alpha: float = 0.05
    tau: float = 0.05
    min_effect: float = 0.0
    margin: float = 0.0
    min_rewards: int = 30
    max_rewards: int = 20_000
    challenger: dict[str, Moments] = field(default_factory=dict)
    reference: dict[str, Moments] = field(default_factory=dict)

    def add(self, stratum: str, reward: float, *, challenger: bool) -> None:
        side = self.challenger if challenger else self.reference
        side.setdefault(stratum, Moments()).add(float(reward))

    def evidence(self) -> Evidence | None:
        """The stratified difference over strata both sides have rewards in, weighted by the challenger's rewards
        (its traffic mix); None before both sides have `min_rewards` there."""
        strata = [s for s, m in self.challenger.items() if m.n > 0 and self.reference.get(s, Moments()).n > 0]
        nc = sum(self.challenger[s].n for s in strata)
        nr = sum(self.reference[s].n for s in strata)
        if nc < self.min_rewards or nr < self.min_rewards:
            return None
        diff = var = mc = mr = 0.0
        for s in strata:
            c, r = self.challenger[s], self.reference[s]
            w = c.n / nc
            diff += w * (c.mean - r.mean)
            var += w * w * (c.var() / c.n + r.var() / r.n)
            mc += w * c.mean
            mr += w * r.mean
        r = radius(var, self.tau, self.alpha)
        log_lr = log_likelihood_ratio(diff, var, self.tau)
        return Evidence(nc, nr, mc, mr, diff, diff - r, diff + r, log_lr, self.alpha)

    def decide(self) -> tuple[Verdict, Evidence | None]:
        ev = self.evidence()
        n = sum(m.n for m in self.challenger.values())
        if ev is not None and ev.lower > self.min_effect:
            return "promote", ev
        if ev is not None and ev.upper < -self.margin:
            return "rollback", ev
        if n >= self.max_rewards:
            return "expired", ev
        return "continue", ev
