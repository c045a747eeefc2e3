"""Routing by ACT-R utility, and the adapter lifecycle (canary -> promoted, or rolled back).

An operator is a serving strategy (system prompt / template) on an adapter: `<strategy>@<adapter>`, with
`base` for no adapter. Its utility per task type comes from `taoflow.utilities`, learned by the stream from
the rewards of the interactions it served. Requests go to the incumbent adapter's operators, chosen by
noisy utility with the stream's own `select_operator`; a canary (a newly published adapter) gets at least
`canary_fraction` of the traffic, serving the strategy the incumbent's utilities chose.

Utilities choose operators; they do not decide releases (an exponential average of a few dozen rewards is mostly
noise). Each utility update carries the reward that caused it, and the router feeds the rewards of canary and
incumbent, from the canary's start on and per (task type, strategy), into a sequential test
(`serving.release.SequentialTest`, valid however often it is looked at): the canary is promoted when it is better
at the configured error rate, rolled back when it is worse, and rolled back unproven at the cap. A promoted adapter
stays watched against its predecessor, which keeps `watch_fraction` of the traffic, and is rolled back by the same
test when it does worse. Evidence is gathered live only: a restarted gateway starts the test again (still valid).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from learners.actr import select_operator
from serving.exceptions import BadRequest
from serving.release import Evidence, SequentialTest
from taoflow.settings import OperatorSpec

log = logging.getLogger(__name__)

BASE = "base"


@dataclass(frozen=True)
class Operator:
    name: str  # "<strategy>@<adapter or base>"
    spec: OperatorSpec
    adapter: str | None


@dataclass
class Decision:
    action: Literal["promoted", "rolled_back"]
    adapter: str
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def operator_name(strategy: str, adapter: str | None) -> str:
    return f"{strategy}@{adapter or BASE}"


class Router:
    """Holds the live utilities and the lifecycle state; all methods run on the gateway's event loop."""

    def __init__(
        self, cfg: Any, *, initial_utility: float, noise_s: float, alpha: float = 0.2, seed: int | None = None
    ) -> None:
        self.cfg = cfg
        self.initial = initial_utility
        self.alpha = alpha
        self.noise_s = noise_s
        self.rng = random.Random(seed)
        self.utilities: dict[tuple[str, str], tuple[float, int]] = {}  # (task_type, operator) -> (u, n)
        self.incumbent: str | None = None
        self.history: list[str | None] = []  # earlier incumbents, most recent last
        self.canary: str | None = None
        self.test: SequentialTest | None = None  # the canary (challenger) against the incumbent
        self.watch: SequentialTest | None = None  # a promoted incumbent (challenger) against its predecessor
        self._seen_n: dict[tuple[str, str], int] = {}  # (task_type, operator) -> reward count already observed

    # -- operators and selection -----------------------------------------------------------------------------

    def strategies(self, task_type: str) -> list[OperatorSpec]:
        ops = self.cfg.operators
        return list(ops.get(task_type) or ops.get("default") or [OperatorSpec(name="default")])

    def operators(self, task_type: str) -> list[Operator]:
        return [Operator(operator_name(s.name, self.incumbent), s, self.incumbent) for s in self.strategies(task_type)]

    def canary_operators(self, task_type: str) -> list[Operator]:
        if self.canary is None:
            return []
        return [Operator(operator_name(s.name, self.canary), s, self.canary) for s in self.strategies(task_type)]

    def utility(self, task_type: str, op: str) -> float:
        return self.utilities.get((task_type, op), (self.initial, 0))[0]

    def choose(self, task_type: str, *, operator: str | None = None, adapter: str | None = None) -> Operator:
        """The operator for one request. `operator` forces a strategy (or a full `strategy@adapter` name);
        `adapter` forces the adapter (a model name other than the routed one)."""
        if operator is not None or adapter is not None:
            strategy, _, forced_adapter = (operator or "").partition("@")
            target = adapter if adapter is not None else (forced_adapter or None)
            if target == BASE:
                target = None
            if operator is None:
                specs = self.strategies(task_type)
                pool = {s.name: s for s in specs}
                u = {s.name: self.utility(task_type, operator_name(s.name, target)) for s in specs}
                strategy = select_operator(u, self.noise_s, self.rng)
            else:
                pool = {s.name: s for s in self.strategies(task_type)}
                if strategy not in pool:
                    raise BadRequest(
                        f"unknown operator {strategy!r} for task type {task_type!r}; known: {', '.join(pool)}",
                        code="operator_not_found",
                    )
                if not forced_adapter and adapter is None:
                    target = self.incumbent
            return Operator(operator_name(strategy, target), pool[strategy], target)
        # the strategy is chosen on the incumbent's utilities; a canary request serves that same strategy on the
        # canary adapter, so canary and incumbent are compared on the same mix of strategies
        ops = self.operators(task_type)
        by_strategy = {o.spec.name: o for o in ops}
        chosen = select_operator({o.spec.name: self.utility(task_type, o.name) for o in ops}, self.noise_s, self.rng)
        if self.canary is not None and self.rng.random() < self.cfg.canary_fraction:
            spec = by_strategy[chosen].spec
            return Operator(operator_name(spec.name, self.canary), spec, self.canary)
        if self.watch is not None and self.history and self.rng.random() < self.cfg.watch_fraction:
            previous, spec = self.history[-1], by_strategy[chosen].spec  # kept warm while the promotion is watched
            return Operator(operator_name(spec.name, previous), spec, previous)
        return by_strategy[chosen]

    # -- utilities and lifecycle ----------------------------------------------------------------------------

    def update_utility(
        self, task_type: str, operator: str, utility: float, n: int, last_reward: float | None = None,
        live: bool = False,
    ) -> None:  # fmt: skip
        """Take one utility update; a live one that counts a new reward feeds it to the release tests."""
        current = self.utilities.get((task_type, operator))
        if current is None or n >= current[1]:
            self.utilities[(task_type, operator)] = (utility, n)
        seen = self._seen_n.get((task_type, operator))
        self._seen_n[(task_type, operator)] = max(n, seen or 0)
        if live and last_reward is not None and n > (seen or 0):  # missed updates: the one reward known
            self.observe(task_type, operator, last_reward)

    def observe(self, task_type: str, operator: str, reward: float) -> None:
        """One reward of an operator, for the release tests: the canary's against the incumbent's (and a promoted
        adapter's against its predecessor's), stratified by task type and strategy."""
        strategy, _, served = operator.rpartition("@")
        adapter = None if served == BASE else served
        stratum = f"{task_type}/{strategy}"
        if self.canary is not None and self.test is None:
            self.test = self._new_test()
        if self.test is not None:
            if adapter == self.canary:
                self.test.add(stratum, reward, challenger=True)
            elif adapter == self.incumbent:
                self.test.add(stratum, reward, challenger=False)
        if self.watch is not None and self.history:
            if adapter == self.incumbent:
                self.watch.add(stratum, reward, challenger=True)
            elif adapter == self.history[-1]:
                self.watch.add(stratum, reward, challenger=False)

    def _new_test(self) -> SequentialTest:
        c = self.cfg
        return SequentialTest(alpha=c.release_alpha, tau=c.release_tau, min_effect=c.release_min_effect,
                              margin=c.rollback_margin, min_rewards=c.promote_after,
                              max_rewards=c.release_max_rewards)  # fmt: skip

    def unbiased(self, u: float, n: int) -> float:
        """The utility without the pull of its starting value: ACT-R's update is an exponential average that
        starts at `initial_utility`, so after n rewards the start still weighs (1 - alpha)^n (as in Adam's bias
        correction). Shown beside the evidence; decisions use the rewards themselves.

        >>> r = Router(None, initial_utility=0.0, noise_s=0.1, alpha=0.2)
        >>> round(r.unbiased(0.2 * 0.9, 1), 6)  # one reward of 0.9
        0.9
        """
        if n <= 0:
            return self.initial
        left = (1 - self.alpha) ** n
        return u if left >= 1 else (u - left * self.initial) / (1 - left)

    def score(self, adapter: str | None) -> tuple[float, int]:
        """n-weighted mean (bias-corrected) utility of every operator served with `adapter`, and their reward count."""
        suffix = "@" + (adapter or BASE)
        rows = [(self.unbiased(u, n), n) for (_, op), (u, n) in self.utilities.items() if op.endswith(suffix) and n > 0]
        total = sum(n for _, n in rows)
        if not total:
            return self.initial, 0
        return sum(u * n for u, n in rows) / total, total

    def decide(self) -> Decision | None:
        """Promote or roll back when the sequential test says so; applies the decision and returns it."""
        if self.canary is not None:
            if self.test is None:
                self.test = self._new_test()
            verdict, ev = self.test.decide()
            if verdict == "promote":
                assert ev is not None
                name = self.canary
                self.history.append(self.incumbent)
                self.incumbent, self.canary, self.test = name, None, None
                self.watch = self._new_test()
                return Decision("promoted", name, f"better than the incumbent: {ev.describe()}", _metrics(ev))
            if verdict in ("rollback", "expired"):
                name, self.canary, self.test = self.canary, None, None
                why = (f"worse than the incumbent: {ev.describe()}" if verdict == "rollback" and ev is not None
                       else f"not shown better after {self.cfg.release_max_rewards} rewards"
                       + (f": {ev.describe()}" if ev is not None else ""))  # fmt: skip
                return Decision("rolled_back", name, why, _metrics(ev))
            return None
        if self.watch is not None and self.incumbent is not None and self.history:
            verdict, ev = self.watch.decide()
            if verdict == "rollback":
                assert ev is not None
                name = self.incumbent
                self.incumbent, self.watch = self.history.pop(), None
                return Decision("rolled_back", name, f"worse than the adapter it replaced: {ev.describe()}",
                                _metrics(ev))  # fmt: skip
            if verdict in ("promote", "expired"):
                self.watch = None  # confirmed (or as good as can be told): the predecessor's share ends
        return None

    def apply_event(self, action: str, adapter: str) -> None:
        """Replay one AdapterEvent into the lifecycle state (at start-up, and for events others emitted)."""
        if action == "published":
            if adapter != self.incumbent and adapter not in self.history:
                self.canary, self.test = adapter, None
        elif action == "promoted":
            if self.incumbent != adapter:
                self.history.append(self.incumbent)
                self.incumbent = adapter
                self.watch = None  # promoted elsewhere (or before a restart): its watch is that gateway's
            if self.canary == adapter:
                self.canary, self.test = None, None
        elif action == "rolled_back":
            if self.canary == adapter:
                self.canary, self.test = None, None
            elif self.incumbent == adapter:
                self.incumbent, self.watch = (self.history.pop() if self.history else None), None

    def state(self) -> dict[str, Any]:
        return {
            "incumbent": self.incumbent,
            "canary": self.canary,
            "previous": self.history[-1:] or None,
            "scores": {a or BASE: self.score(a) for a in {self.incumbent, self.canary, *self.history[-1:]}},
            "canary_evidence": _metrics(self.test.evidence()) if self.test is not None else None,
            "watch_evidence": _metrics(self.watch.evidence()) if self.watch is not None else None,
        }


def _metrics(ev: Evidence | None) -> dict[str, float]:
    return ev.as_dict() if ev is not None else {}
