"""Rule and verifier rewards: regex, JSON (with optional JSON Schema), exact match, length bounds."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=256)
def _compiled(pattern: str, flags: int) -> re.Pattern[str]:
    return re.compile(pattern, flags)


def regex_reward(completions: list[str], *, pattern: str, full_match: bool = False, **kwargs: Any) -> list[float]:
    """1.0 where the completion matches `pattern` (anywhere, or whole with `full_match`), else 0.0.

    >>> regex_reward(["answer: 42", "no idea"], pattern=r"answer: \\d+")
    [1.0, 0.0]
    """
    rx = _compiled(pattern, re.DOTALL)
    match = rx.fullmatch if full_match else rx.search
    return [1.0 if match(c) else 0.0 for c in completions]


def json_reward(completions: list[str], *, schema: dict[str, Any] | None = None, **kwargs: Any) -> list[float]:
    """1.0 where the completion is JSON (and valid against `schema`, if given), else 0.0.

    >>> json_reward(['{"a": 1}', "{oops"])
    [1.0, 0.0]
    >>> json_reward(['{"a": 1}', '{"a": "x"}'], schema={"properties": {"a": {"type": "integer"}}})
    [1.0, 0.0]
    """
    validator = None
    if schema is not None:
        import jsonschema

        validator = jsonschema.Draft202012Validator(schema)
    out = []
    for c in completions:
        try:
            doc = json.loads(c)
        except ValueError:
            out.append(0.0)
            continue
        out.append(1.0 if validator is None or validator.is_valid(doc) else 0.0)
    return out


def exact_match_reward(
    completions: list[str], *, answers: list[str | None] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 where the completion's last number or line equals the reference answer; None without one.

    References come from `answers` or each item's `metadata["answer"]`.

    >>> exact_match_reward(["so it is 12", "13"], answers=["12", "12"])
    [1.0, 0.0]
    >>> exact_match_reward(["12"], metadata=[{}])
    [None]
    """
    if answers is None:
        answers = [m.get("answer") if isinstance(m, dict) else None for m in kwargs.get("metadata") or []]
        answers += [None] * (len(completions) - len(answers))
    out: list[float | None] = []
    for c, ref in zip(completions, answers, strict=True):
        if ref is None:
            out.append(None)
            continue
        out.append(1.0 if extract_answer(c) == str(ref).strip() else 0.0)
    return out


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The last number in `text`, else its last non-empty line, stripped.

    >>> extract_answer("3 + 4 = 7")
    '7'
    >>> extract_answer("Paris")
    'Paris'
    """
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def length_reward(completions: list[str], *, min_chars: int = 1, max_chars: int = 4000, **kwargs: Any) -> list[float]:
    """1.0 where the completion's length is within [min_chars, max_chars], else 0.0.

    >>> length_reward(["", "ok"], min_chars=1)
    [0.0, 1.0]
    """
    return [1.0 if min_chars <= len(c) <= max_chars else 0.0 for c in completions]
