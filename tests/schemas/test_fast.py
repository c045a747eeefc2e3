"""The fast path accepts only what the pydantic models accept, with equal values (differential tests)."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from schemas import EventValidationError, FeedbackEvent, InteractionEvent, Limits, ScoreEvent, UtilityEvent
from schemas.base import parse_event
from schemas.fast import (
    FastFeedback,
    FastInteraction,
    fast_feedback,
    fast_interaction,
    fast_score,
    fast_utility,
    parse_feedback,
    parse_interaction,
    score_json,
    utility_json,
)

MISSING = object()
TIGHT = Limits(max_prompt_bytes=40, max_response_bytes=40, max_metadata_bytes=120, max_event_bytes=1500)
LIMITS = [Limits(), TIGHT]

NAMES = ["a", "", "x" * 256, "x" * 257, "é" * 256, "😀" * 10, " ", None, 0, 1.5, True, [], {}, MISSING]
NUMBERS = [0, 1, 0.5, 1.0, -0.0, -1, 1e-300, 2, 1e308, True, False, None, "1", "0.5", [], MISSING]
TIMESTAMPS = [
    "2026-11-22T10:00:00Z", "2026-11-22T10:00:00.5Z", "2026-11-22T10:00:00.123456+00:00",
    "2026-11-22T10:00:00.1234567Z", "2026-11-22T10:00:00.999999999-05:30", "2026-11-22t10:00:00z",
    "2026-11-22 10:00:00+01:00", "2026-11-22T10:00:00", "2026-02-30T10:00:00Z", "2026-11-22T23:59:60Z",
    "2026-11-22T10:00Z", "2026-11-22", "20261122T100000Z", "2026-11-22T10:00:00+24:00", "", 0, None, MISSING,
    # outside the window around now that events may carry (Limits.max_ts_age_s, max_ts_ahead_s), or beyond UTC
    "1990-01-01T00:00:00Z", "2999-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
]  # fmt: skip
TEXTS = ["", "hi", "x" * 40, "x" * 41, "é" * 20, "é" * 21, "\u0000\n\"\\", None, 1, ["a"], MISSING,
         [{"role": "user", "content": "hi"}], []]  # fmt: skip
METADATA = [
    {}, {"i": 1}, {"k": "v" * 60}, {"k": "é" * 30}, {"k": "é" * 12}, {"deep": [[[[[[1]]]]]]}, {"f": 1e16},
    {"k": "\u0001" * 10}, [], None, "x", MISSING, {"n": None, "b": True, "l": [1, "a", {"x": 1.5}]},
]  # fmt: skip
VERSIONS = [1, 2, 0, "1", 1.0, True, None, MISSING]
HEX = "0123456789abcdef" * 2
# the pattern `^[0-9a-f]{32}$`: its edges (length, case, a trailing newline Python's `$` would let through, digits
# that are not ASCII, another type)
CALLERS = [HEX, "a" * 32, None, MISSING, HEX.upper(), HEX[:31], HEX + "0", HEX + "\n", "\n" + HEX, " " + HEX, "g" * 32,
           "\u0661" * 32, "", 0, 10**18, True, [HEX], {}]  # fmt: skip
# pydantic's lax bool (0/1, "yes", "off", ...) next to plain JSON booleans
FORCED = [True, False, MISSING, None, 0, 1, 0.0, 1.0, 2, "true", "false", "yes", "off", "", [], {}]


def base_interaction() -> dict[str, Any]:
    return {
        "event_id": "ev-1", "ts": "2026-11-22T10:00:00.123456Z", "agent_id": "agent", "task_type": "math",
        "operator": "cot", "prompt": "what is 1 + 1?", "response": "2", "adapter": None, "latency_ms": 5.0,
        "metadata": {"i": 1},
    }  # fmt: skip


def base_feedback() -> dict[str, Any]:
    return {"event_id": "fb-1", "interaction_id": "ev-1", "ts": "2026-11-22T10:00:01Z", "kind": "thumbs",
            "value": 1.0, "metadata": {}}  # fmt: skip


INTERACTION_VALUES = {
    "event_id": NAMES, "agent_id": NAMES, "task_type": NAMES, "operator": NAMES, "adapter": NAMES, "ts": TIMESTAMPS,
    "prompt": TEXTS, "response": TEXTS, "latency_ms": NUMBERS, "metadata": METADATA, "schema_version": VERSIONS,
    "extra": ["x", MISSING], "caller": CALLERS, "forced": FORCED,
}  # fmt: skip
FEEDBACK_VALUES = {
    "event_id": NAMES, "interaction_id": NAMES, "ts": TIMESTAMPS, "value": NUMBERS, "metadata": METADATA,
    "kind": ["thumbs", "rating", "custom", "nope", "", None, 1, ["thumbs"], MISSING], "schema_version": VERSIONS,
    "extra": ["x", MISSING], "caller": CALLERS,
}  # fmt: skip


def mutate(doc: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    doc = dict(doc)
    if value is MISSING:
        doc.pop(field, None)
    else:
        doc[field] = value
    return doc


def cases(base: dict[str, Any], values: dict[str, list[Any]], seed: int) -> list[bytes]:
    """Every single-field mutation, then 1,500 random multi-field ones; as compact and as spaced JSON."""
    docs = [base] + [mutate(base, f, v) for f, vs in values.items() for v in vs]
    rng = random.Random(seed)
    for _ in range(1500):
        doc = base
        for f in rng.sample(sorted(values), rng.randint(2, 4)):
            doc = mutate(doc, f, rng.choice(values[f]))
        docs.append(doc)
    out = [orjson.dumps(d) for d in docs] + [json.dumps(d, indent=1).encode() for d in docs[:200]]
    return [*out, b"", b"null", b"[]", b"{", b"{}", b'{"event_id": NaN}', b"\xff\xfe", b"{" * 100 + b"}" * 100]


def model_or_error(model: type, raw: bytes, limits: Limits) -> Any:
    try:
        return parse_event(model, raw, limits)
    except EventValidationError as exc:
        return exc


def same_values(fast: Any, model: Any, fields: tuple[str, ...]) -> None:
    for f in fields:
        a, b = getattr(fast, f), getattr(model, f)
        assert a == b and type(a) is type(b), (f, a, b)
    assert fast.ts.utcoffset() == model.ts.utcoffset()


KINDS = {
    "interaction": (InteractionEvent, fast_interaction, parse_interaction, base_interaction, INTERACTION_VALUES, 1),
    "feedback": (FeedbackEvent, fast_feedback, parse_feedback, base_feedback, FEEDBACK_VALUES, 2),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("limits", LIMITS, ids=["default", "tight"])
def test_fast_path_accepts_a_subset_with_equal_values(kind: str, limits: Limits) -> None:
    model_cls, fast_fn, parse_fn, base, values, seed = KINDS[kind]
    fast_hits = 0
    for raw in cases(base(), values, seed=seed):
        fast = fast_fn(raw, limits)
        model = model_or_error(model_cls, raw, limits)
        if fast is None:
            continue
        fast_hits += 1
        assert isinstance(model, model_cls), (raw, model)
        same_values(fast, model, type(fast).__slots__)
        assert isinstance(parse_fn(raw, limits), type(fast))
    assert fast_hits > 100  # the common shapes do take the fast path


def test_fast_path_takes_plain_events_and_falls_back_with_the_models_error() -> None:
    raw = orjson.dumps(base_interaction())
    assert isinstance(parse_interaction(raw, Limits()), FastInteraction)
    assert isinstance(parse_feedback(orjson.dumps(base_feedback()), Limits()), FastFeedback)
    chat = orjson.dumps({**base_interaction(), "prompt": [{"role": "user", "content": "hi"}]})
    assert isinstance(parse_interaction(chat, Limits()), InteractionEvent)  # valid, through pydantic
    with pytest.raises(EventValidationError, match="field 'response'"):
        parse_interaction(orjson.dumps({**base_interaction(), "response": 3}), Limits())
    with pytest.raises(EventValidationError, match="over the limit"):
        parse_feedback(orjson.dumps({**base_feedback(), "metadata": {"k": "é" * 100}}), TIGHT)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tenant_fields_take_the_fast_path_with_the_models_values(kind: str) -> None:
    """A gateway stamps `caller` (and `forced`) on every event it captures: plain values must stay on the fast
    path with the model's values, and whatever the model refuses must never be accepted here."""
    model_cls, fast_fn, _, base, _, _ = KINDS[kind]
    plain: dict[str, list[Any]] = {"caller": [HEX, "a" * 32, None, MISSING]}
    fields: dict[str, list[Any]] = {"caller": CALLERS}
    if kind == "interaction":
        plain["forced"], fields["forced"] = [True, False, MISSING], FORCED
    for name, values in fields.items():
        for value in values:
            raw = orjson.dumps(mutate(base(), name, value))
            fast, model = fast_fn(raw, Limits()), model_or_error(model_cls, raw, Limits())
            if any(value is p for p in plain[name]) or value in [p for p in plain[name] if type(p) is str]:
                assert fast is not None, (name, value, model)
            if fast is not None:
                assert isinstance(model, model_cls), (name, value, model)
                same_values(fast, model, type(fast).__slots__)
    doc = {**base(), "caller": HEX, **({"forced": True} if kind == "interaction" else {})}
    fast = fast_fn(orjson.dumps(doc), Limits())
    assert fast is not None and fast.caller == HEX
    assert isinstance(fast, FastFeedback) or fast.forced is True
    for bad in (HEX.upper(), HEX + "\n", "\u0661" * 32, 0):  # the model refuses these callers
        assert isinstance(model_or_error(model_cls, orjson.dumps({**base(), "caller": bad}), Limits()),
                          EventValidationError)  # fmt: skip


def test_worker_outputs_match_the_models() -> None:
    rng = random.Random(3)
    for i in range(300):
        ts = 1_700_000_000 + rng.random() * 1e8
        reward = rng.choice([0.0, 1.0, rng.random(), 1e-9])
        parts = {f"p{k}": rng.choice([0, 1, rng.random()]) for k in range(rng.randint(0, 3))}
        adapter = rng.choice([None, "tao-r1", "é" * 3])
        raw = score_json(f"i-{i}", ts, "math", "cot", adapter, reward, parts, i % 4)
        model = ScoreEvent.model_validate_json(raw)
        when = datetime.fromtimestamp(ts, UTC)
        expected = ScoreEvent(interaction_id=f"i-{i}", ts=when, task_type="math", operator="cot", adapter=adapter,
                              reward=reward, parts=parts, revision=i % 4)  # fmt: skip
        assert model == expected
        assert fast_score(raw, Limits()) == dict(model)
        last = rng.choice([None, rng.random()])
        u = rng.uniform(-1, 1)
        imported = rng.choice([0, 0, i, rng.randint(0, i)])  # knowledge imported from another deployment
        raw = utility_json("math", "cot", u, i, last, ts, imported)
        umodel = UtilityEvent.model_validate_json(raw)
        assert umodel == UtilityEvent(task_type="math", operator="cot", utility=u, n=i, last_reward=last,
                                     ts=datetime.fromtimestamp(ts, UTC), imported=imported)  # fmt: skip
        assert fast_utility(raw, Limits()) == dict(umodel)


def test_fast_utility_reads_events_without_imported_and_declines_what_the_model_rejects() -> None:
    """An older worker's UtilityEvent has no `imported`: both paths read it as 0. Every value of `imported` the fast
    path takes, the model takes with the same value."""
    good = orjson.loads(utility_json("math", "cot", 0.5, 4, 1.0, 1.7e9, 2))
    old = orjson.dumps({k: v for k, v in good.items() if k != "imported"})
    assert UtilityEvent.model_validate_json(old).imported == 0
    assert fast_utility(old, Limits()) == dict(UtilityEvent.model_validate_json(old))
    for value in (0, 1, 4, 5, -1, 1.0, 2.5, True, None, "1", [], MISSING):
        raw = orjson.dumps(mutate(good, "imported", value))
        fast, model = fast_utility(raw, Limits()), model_or_error(UtilityEvent, raw, Limits())
        if fast is not None:
            assert isinstance(model, UtilityEvent) and fast == dict(model), (value, model)
        if type(value) is int and value in (5, -1):  # beyond n, or negative: the model refuses
            assert fast is None and isinstance(model, EventValidationError), (value, model)
    assert fast_utility(orjson.dumps(mutate(good, "imported", 4)), Limits()) is not None


@pytest.mark.parametrize(
    "doc",
    [
        {"reward": 1.5}, {"reward": -0.1}, {"revision": -1}, {"revision": 1.5}, {"parts": {"a": "x"}}, {"adapter": ""},
        {"ts": "yesterday"}, {"interaction_id": ""}, {"extra": 1},
    ],
)  # fmt: skip
def test_fast_score_declines_what_the_model_rejects(doc: dict[str, Any]) -> None:
    good = orjson.loads(score_json("i-1", 1.7e9, "math", "cot", None, 0.5, {"a": 1.0}, 0))
    raw = orjson.dumps({**good, **doc})
    assert fast_score(raw, Limits()) is None
    with pytest.raises(ValueError):
        ScoreEvent.model_validate_json(raw)


def test_nan_never_takes_the_fast_path() -> None:
    assert fast_utility(utility_json("m", "o", math.nan, 1, None, 1.7e9), Limits()) is None
