"""Reward functions and their composition: the interface the stream and the TAO learner share."""

from __future__ import annotations

import pytest

from learners.exceptions import ScorerConfigError
from learners.rewards import CompositeScorer, build_scorer
from learners.rewards.specs import ExactMatchSpec, JsonSpec, PythonSpec, RegexSpec
from taoflow.settings import Settings


def test_composite_applies_task_filters_and_weights() -> None:
    scorer = CompositeScorer(
        [
            build_scorer(RegexSpec(pattern=r"^\d+$", name="digits", task_types=["math"])),
            build_scorer(JsonSpec(name="json", weight=2.0, task_types=["extract"], schema={"required": ["a"]})),
            build_scorer(ExactMatchSpec(task_types=["math"])),
        ],
        {"thumbs": 3.0},
    )
    parts = scorer.rule_parts(
        ["42", '{"a": 1}', "x"],
        prompts=["6*7?", "extract", "6*7?"],
        task_types=["math", "extract", "math"],
        metadata=[{"answer": "42"}, {}, {"answer": "42"}],
    )
    assert parts == [{"digits": 1.0, "exact_match": 1.0}, {"json": 1.0}, {"digits": 0.0, "exact_match": 0.0}]
    item = scorer.compose(parts[2], {"thumbs": 1.0})
    assert item.reward == pytest.approx(3.0 / 5.0)  # (0 + 0 + 3*1) / (1 + 1 + 3)
    assert scorer.compose({}, {}).reward is None


def test_python_callable_scorer_and_clear_errors() -> None:
    s = build_scorer(PythonSpec(callable="tests.streams.scorers:reward_from_metadata", name="planted"))
    assert s(["a", "b"], metadata=[{"r": 0.3}, {}]) == [0.3, None]
    with pytest.raises(ScorerConfigError, match="must look like"):
        build_scorer(PythonSpec(callable="no_colon"))
    with pytest.raises(ScorerConfigError, match="cannot import"):
        build_scorer(PythonSpec(callable="not_a_module_xyz:fn"))
    with pytest.raises(ScorerConfigError, match="has no function"):
        build_scorer(PythonSpec(callable="tests.streams.scorers:missing"))


def test_scorers_are_configured_from_settings_json() -> None:
    settings = Settings(overrides={"stream": {"scorers": [{"type": "regex", "pattern": "ok"}, {"type": "length"}]}})
    kinds = [type(s).__name__ for s in settings.stream.scorers]
    assert kinds == ["RegexSpec", "LengthSpec"]
