"""Routing by ACT-R utility, and the adapter lifecycle (canary -> promoted, or rolled back).

An operator is a serving strategy (system prompt / template) on an adapter: `<strategy>@<adapter>`, with
`base` for no adapter. Its utility per task type comes from `taoflow.utilities`, learned by the stream from
the rewards of the interactions it served. Requests go to the incumbent adapter's operators, chosen by
noisy utility with the stream's own `select_operator`; a canary (a newly published adapter) gets at least
`canary_fraction` of the traffic. After `promote_after` rewards the canary is promoted if its utility beats
the incumbent's, or rolled back if it falls below by `rollback_margin`; a promoted adapter is likewise
rolled back to its predecessor if it falls below the predecessor's last utility by the margin.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

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
    action: str  # "promoted" | "rolled_back"
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
        canary = self.canary_operators(task_type)
        pool_ops = canary if canary and self.rng.random() < self.cfg.canary_fraction else self.operators(task_type)
        by_name = {o.name: o for o in pool_ops}
        chosen = select_operator({n: self.utility(task_type, n) for n in by_name}, self.noise_s, self.rng)
        return by_name[chosen]

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

    def decide(self) -> Decision | None:
        """Promote or roll back when the evidence is in; applies the decision and returns it."""
        margin, need = self.cfg.rollback_margin, self.cfg.promote_after
        if self.canary is not None:
            cu, cn = self.score(self.canary)
            iu, _ = self.score(self.incumbent)
            metrics = {"utility": cu, "n": float(cn), "incumbent_utility": iu}
            if cn >= need and cu > iu:
                name = self.canary
                self.history.append(self.incumbent)
                self.incumbent, self.canary, self.promoted_at_n = name, None, cn
                return Decision(
                    "promoted", name, f"utility {cu:.3f} beats the incumbent's {iu:.3f} after {cn} rewards", metrics
                )
            if cn >= need and cu < iu - margin:
                name, self.canary = self.canary, None
                return Decision(
                    "rolled_back",
                    name,
                    f"canary utility {cu:.3f} is below the incumbent's {iu:.3f} by more than {margin}",
                    metrics,
                )
            return None
        if self.incumbent is not None and self.history:
            u, n = self.score(self.incumbent)
            pu, _ = self.score(self.history[-1])
            if n - self.promoted_at_n >= need and u < pu - margin:
                name = self.incumbent
                self.incumbent = self.history.pop()
                return Decision(
                    "rolled_back",
                    name,
                    f"utility {u:.3f} fell below the previous adapter's {pu:.3f} by more than {margin}",
                    {"utility": u, "n": float(n), "previous_utility": pu},
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
