"""Routing by ACT-R utility, and the adapter lifecycle (canary -> promoted, or rolled back).

An operator is a serving strategy (system prompt / template) on an adapter: `<strategy>@<adapter>`, with
`base` for no adapter. Its utility per task type comes from `taoflow.utilities`, learned by the stream from
the rewards of the interactions it served. Requests go to the incumbent adapter's operators, chosen by
noisy utility with the stream's own `select_operator`; a canary (a newly published adapter) gets at least
`canary_fraction` of the traffic, serving the strategy the incumbent's utilities chose. After `promote_after`
rewards the canary is promoted if its utility beats the incumbent's on the same strategies (a paired,
bias-corrected comparison), or rolled back if it falls below by `rollback_margin`; a promoted adapter is
likewise rolled back to its predecessor if it falls below the predecessor's last utilities by the margin.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from learners.actr import select_operator
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
        self.promoted_at_n: int = 0  # the promoted adapter's reward count when it was promoted

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
                    from serving.exceptions import BadRequest

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
        return by_strategy[chosen]

    # -- utilities and lifecycle ----------------------------------------------------------------------------

    def update_utility(self, task_type: str, operator: str, utility: float, n: int) -> None:
        current = self.utilities.get((task_type, operator))
        if current is None or n >= current[1]:
            self.utilities[(task_type, operator)] = (utility, n)

    def unbiased(self, u: float, n: int) -> float:
        """The utility without the pull of its starting value: ACT-R's update is an exponential average that
        starts at `initial_utility`, so after n rewards the start still weighs (1 - alpha)^n. Comparing a
        canary (few rewards) with an incumbent (many) needs that weight removed, as in Adam's bias correction.

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

    def compare(self, challenger: str | None, reference: str | None) -> tuple[float, int]:
        """Paired comparison: for every task type and strategy the challenger has rewards for, its
        (bias-corrected) utility minus the reference's on the same strategy, weighted by the challenger's
        rewards there. Returns (weighted mean difference, challenger rewards counted)."""
        c_suffix, r_suffix = "@" + (challenger or BASE), "@" + (reference or BASE)
        total = weight = 0.0
        for (task, op), (u, n) in self.utilities.items():
            if n <= 0 or not op.endswith(c_suffix):
                continue
            strategy = op[: -len(c_suffix)]
            ref = self.utilities.get((task, strategy + r_suffix))
            if ref is None or ref[1] <= 0:
                continue
            total += n * (self.unbiased(u, n) - self.unbiased(*ref))
            weight += n
        return (total / weight if weight else 0.0), int(weight)

    def decide(self) -> Decision | None:
        """Promote or roll back when the evidence is in; applies the decision and returns it."""
        margin, need = self.cfg.rollback_margin, self.cfg.promote_after
        if self.canary is not None:
            diff, cn = self.compare(self.canary, self.incumbent)
            metrics = {"utility_gain": diff, "n": float(cn)}
            if cn >= need and diff > 0:
                name = self.canary
                self.history.append(self.incumbent)
                self.incumbent, self.canary, self.promoted_at_n = name, None, self.score(name)[1]
                return Decision(
                    "promoted",
                    name,
                    f"utility {diff:+.3f} over the incumbent on the same strategies after {cn} rewards",
                    metrics,
                )
            if cn >= need and diff < -margin:
                name, self.canary = self.canary, None
                return Decision(
                    "rolled_back",
                    name,
                    f"utility {diff:+.3f} against the incumbent on the same strategies, below the margin {margin}",
                    metrics,
                )
            return None
        if self.incumbent is not None and self.history:
            diff, _ = self.compare(self.incumbent, self.history[-1])
            n = self.score(self.incumbent)[1]
            if n - self.promoted_at_n >= need and diff < -margin:
                name = self.incumbent
                self.incumbent = self.history.pop()
                return Decision(
                    "rolled_back",
                    name,
                    f"utility {diff:+.3f} against the previous adapter on the same "
                    f"strategies, below the margin {margin}",
                    {"utility_gain": diff, "n": float(n)},
                )
        return None

    def apply_event(self, action: str, adapter: str) -> None:
        """Replay one AdapterEvent into the lifecycle state (at start-up, and for events others emitted)."""
        if action == "published":
            if adapter != self.incumbent and adapter not in self.history:
                self.canary = adapter
        elif action == "promoted":
            if self.incumbent != adapter:
                self.history.append(self.incumbent)
                self.incumbent = adapter
                self.promoted_at_n = self.score(adapter)[1]
            if self.canary == adapter:
                self.canary = None
        elif action == "rolled_back":
            if self.canary == adapter:
                self.canary = None
            elif self.incumbent == adapter:
                self.incumbent = self.history.pop() if self.history else None

    def state(self) -> dict[str, Any]:
        return {
            "incumbent": self.incumbent,
            "canary": self.canary,
            "previous": self.history[-1:] or None,
            "scores": {a or BASE: self.score(a) for a in {self.incumbent, self.canary, *self.history[-1:]}},
        }
