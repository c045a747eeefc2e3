"""Weighted composition of reward parts: configured scorers plus implicit feedback joined later."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from learners.rewards.registry import Scorer

FEEDBACK_PREFIX = "feedback."


def combine_parts(parts: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """Weighted mean of the parts present (weight 1 for parts without one); None when nothing applies.

    >>> combine_parts({"regex": 1.0, "feedback.thumbs": 0.0}, {"regex": 1.0, "feedback.thumbs": 3.0})
    0.25
    >>> combine_parts({}, {}) is None
    True
    """
    total = wsum = 0.0
    for name, value in parts.items():
        w = weights.get(name, 1.0)
        total += w * value
        wsum += w
    if wsum <= 0:
        return None
    return min(1.0, max(0.0, total / wsum))


@dataclass
class ScoredItem:
    """The reward of one response (None until some part applies) and its parts."""

    reward: float | None
    parts: dict[str, float] = field(default_factory=dict)


class CompositeScorer:
    """Runs every configured scorer over a batch and composes the parts with their weights."""

    def __init__(self, scorers: Sequence[Scorer], feedback_weights: Mapping[str, float] | None = None) -> None:
        self.scorers = list(scorers)
        self.weights: dict[str, float] = {s.part: s.weight for s in self.scorers}
        for kind, w in (feedback_weights or {}).items():
            self.weights[FEEDBACK_PREFIX + kind] = w

    def rule_parts(
        self,
        completions: list[str],
        *,
        prompts: list[Any],
        task_types: list[str],
        metadata: list[dict[str, Any]],
    ) -> list[dict[str, float]]:
        """Per item, the parts from every scorer that applies to its task type."""
        out: list[dict[str, float]] = [{} for _ in completions]
        for scorer in self.scorers:
            idx = [i for i, t in enumerate(task_types) if scorer.task_types is None or t in scorer.task_types]
            if not idx:
                continue
            values = scorer(
                [completions[i] for i in idx],
                prompts=[prompts[i] for i in idx],
                task_types=[task_types[i] for i in idx],
                metadata=[metadata[i] for i in idx],
            )
            for i, v in zip(idx, values, strict=True):
                if v is not None:
                    out[i][scorer.part] = v
        return out

    def compose(self, parts: Mapping[str, float], feedback: Mapping[str, float] | None = None) -> ScoredItem:
        """Rule parts plus feedback by kind (latest value per kind) into one reward."""
        merged = dict(parts)
        for kind, value in (feedback or {}).items():
            merged[FEEDBACK_PREFIX + kind] = value
        return ScoredItem(combine_parts(merged, self.weights), merged)
