"""Plug-in point for reward functions: built-ins by name, user callables by import path."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from learners.exceptions import ScorerConfigError
from learners.rewards import rules
from learners.rewards.judge import LlmJudge
from learners.rewards.reward_model import RewardModel
from learners.rewards.specs import (
    ArithmeticSpec,
    ExactMatchSpec,
    JsonSpec,
    LengthSpec,
    LlmJudgeSpec,
    PythonSpec,
    RegexSpec,
    RewardModelSpec,
)
from learners.tasks import arithmetic_reward

RewardFn = Callable[..., list[float | None]] | Callable[..., list[float]]

REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "regex": rules.regex_reward,
    "json": rules.json_reward,
    "exact_match": rules.exact_match_reward,
    "length": rules.length_reward,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `fn` available to specs of `type = name` (for plug-ins)."""
    REWARD_FUNCTIONS[name] = fn


def load_callable(path: str) -> RewardFn:
    """Import 'package.module:function'; errors say what to fix."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ScorerConfigError(f"scorer callable {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ScorerConfigError(f"scorer callable {path!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ScorerConfigError(f"scorer callable {path!r}: {module_name} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


@dataclass
class Scorer:
    """A configured reward function with its part name, weight and task-type filter."""

    part: str
    weight: float
    fn: RewardFn
    options: dict[str, Any]
    task_types: frozenset[str] | None = None

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        values = list(self.fn(completions, **kwargs, **self.options))
        if len(values) != len(completions):
            raise ScorerConfigError(f"scorer {self.part!r} returned {len(values)} values for {len(completions)} items")
        return [None if v is None else min(1.0, max(0.0, float(v))) for v in values]


def build_scorer(spec: Any, *, device: str | None = None) -> Scorer:
    """The Scorer for one spec (see `learners.rewards.specs`). `device`: where a reward model runs when its spec
    does not say (the learner passes its own; unset: "auto", the GPU when there is one)."""
    tt = frozenset(spec.task_types) if spec.task_types else None
    if isinstance(spec, RegexSpec):
        opts: dict[str, Any] = {"pattern": spec.pattern, "full_match": spec.full_match}
        return Scorer(spec.part, spec.weight, REWARD_FUNCTIONS["regex"], opts, tt)
    if isinstance(spec, JsonSpec):
        return Scorer(spec.part, spec.weight, REWARD_FUNCTIONS["json"], {"schema": spec.schema_}, tt)
    if isinstance(spec, ExactMatchSpec):
        return Scorer(spec.part, spec.weight, REWARD_FUNCTIONS["exact_match"], {}, tt)
    if isinstance(spec, LengthSpec):
        opts = {"min_chars": spec.min_chars, "max_chars": spec.max_chars}
        return Scorer(spec.part, spec.weight, REWARD_FUNCTIONS["length"], opts, tt)
    if isinstance(spec, PythonSpec):
        fn = REWARD_FUNCTIONS.get(spec.callable) or load_callable(spec.callable)
        return Scorer(spec.part, spec.weight, fn, dict(spec.options), tt)
    if isinstance(spec, RewardModelSpec):
        model = RewardModel(
            spec.path, batch_size=spec.batch_size, max_length=spec.max_length, device=spec.device or device or "auto"
        )
        return Scorer(spec.part, spec.weight, model, {}, tt)
    if isinstance(spec, ArithmeticSpec):
        return Scorer(spec.part, spec.weight, arithmetic_reward, {}, tt)
    if isinstance(spec, LlmJudgeSpec):
        return Scorer(spec.part, spec.weight, LlmJudge(spec), {}, tt)
    raise ScorerConfigError(f"unknown scorer spec {spec!r}")
