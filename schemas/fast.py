"""A fast path for the events the stream worker and the lander read at full rate.

Validating an InteractionEvent with pydantic costs about 10 us, most of it building the model and running
the Python validators; `orjson` parses the same bytes in under 1 us. The functions here parse with `orjson`
and check the common, plainly valid shape of an event by hand, returning a light record with the same
attribute names as the model. Anything they are not sure of (a missing field that pydantic would fill in with
a fresh value, a chat prompt, a bool where a number goes, a metadata object near its size limit, deep nesting,
...) returns None, and the caller validates with pydantic as before, which also gives the precise error.

So the fast path only ever accepts a subset of what the models accept, with equal values; the differential
tests in `tests/schemas/test_fast.py` check that over valid, edge and mutated events.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.base import _RFC3339, Limits, parse_event
from schemas.feedback import FEEDBACK_KINDS, FeedbackEvent
from schemas.interactions import InteractionEvent

_INTERACTION_FIELDS = frozenset(
    ("schema_version", "event_id", "ts", "agent_id", "task_type", "operator", "prompt", "response", "adapter",
     "latency_ms", "metadata", "caller", "forced", "finish_reason", "session_id", "step")
)  # fmt: skip
# tools, tool_calls and response_format (nested client documents) always take the model's way
_FEEDBACK_FIELDS = frozenset(
    ("schema_version", "event_id", "interaction_id", "ts", "kind", "value", "metadata", "caller", "session_id")
)
# `schemas.interactions.Caller`'s pattern; pydantic's (Rust) regex `$` is the end of the text, so `fullmatch`, not a
# Python `$`, which would also match before a trailing newline
_CALLER = re.compile(r"[0-9a-f]{32}")
_KINDS = frozenset(FEEDBACK_KINDS)
_MAX_NESTING = 64  # well inside pydantic's JSON recursion limit; counted conservatively (brackets in strings too)


class FastInteraction:
    """A validated InteractionEvent's fields (plain string prompt), as attributes."""

    __slots__ = ("adapter", "agent_id", "caller", "event_id", "finish_reason", "forced", "latency_ms", "metadata",
                 "operator", "prompt", "response", "session_id", "step", "task_type", "ts")  # fmt: skip
    tools = tool_calls = response_format = None  # never on the fast path

    def __init__(self, d: dict[str, Any], ts: datetime) -> None:
        self.event_id: str = d["event_id"]
        self.ts = ts
        self.agent_id: str = d["agent_id"]
        self.task_type: str = d["task_type"]
        self.operator: str = d["operator"]
        self.prompt: str = d["prompt"]
        self.response: str = d["response"]
        self.adapter: str | None = d.get("adapter")
        self.latency_ms = float(d.get("latency_ms", 0.0))
        self.metadata: dict[str, Any] = d.get("metadata", {})
        self.caller: str | None = d.get("caller")
        self.forced: bool = d.get("forced", False)
        self.finish_reason: str | None = d.get("finish_reason")
        self.session_id: str | None = d.get("session_id")
        self.step: int | None = d.get("step")


class FastFeedback:
    """A validated FeedbackEvent's fields, as attributes."""

    __slots__ = ("caller", "event_id", "interaction_id", "kind", "metadata", "session_id", "ts", "value")

    def __init__(self, d: dict[str, Any], ts: datetime) -> None:
        self.event_id: str = d["event_id"]
        self.interaction_id: str | None = d.get("interaction_id")
        self.session_id: str | None = d.get("session_id")
        self.ts = ts
        self.kind: str = d["kind"]
        self.value = float(d["value"])
        self.metadata: dict[str, Any] = d.get("metadata", {})
        self.caller: str | None = d.get("caller")


def _name(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= 256


def _caller(v: Any) -> bool:
    return v is None or (type(v) is str and _CALLER.fullmatch(v) is not None)


def _number(v: Any) -> bool:
    return type(v) is float or type(v) is int


def _ts(v: Any) -> datetime | None:
    if type(v) is not str or not _RFC3339.match(v):
        return None
    try:
        ts = datetime.fromisoformat(v)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else None


_WINDOW_MARGIN_S = 60.0  # the model checks the time window a moment later: stay clear of its edges


def _in_window(ts: datetime, limits: Limits) -> bool:
    """Plainly inside the window around now that `schemas.base.EventTime` allows (edges go to the model)."""
    if not 1 < ts.year < 9999:  # near the ends of datetime's range, UTC conversion may overflow
        return False
    age = time.time() - ts.timestamp()
    return -(limits.max_ts_ahead_s - _WINDOW_MARGIN_S) <= age <= limits.max_ts_age_s - _WINDOW_MARGIN_S


def _small_metadata(d: dict[str, Any], limit: int) -> bool:
    m = d.get("metadata")
    if m is None:
        return "metadata" not in d
    if type(m) is not dict:
        return False
    # the model measures `json.dumps` (ASCII-escaped: at most 3x the UTF-8 size); accept only well under it
    return not m or 3 * len(orjson.dumps(m)) + 16 <= limit


def _load(raw: Any, limits: Limits, fields: frozenset[str]) -> dict[str, Any] | None:
    if type(raw) is not bytes or len(raw) > limits.max_event_bytes:
        return None
    if raw.count(b"{") + raw.count(b"[") > _MAX_NESTING:
        return None
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(d) is not dict or not fields.issuperset(d):
        return None
    sv = d.get("schema_version", 1)
    if type(sv) is not int or sv != 1:
        return None
    return d


def fast_interaction(raw: Any, limits: Limits) -> FastInteraction | None:
    """The event, when `raw` is plainly a valid InteractionEvent with a string prompt; else None."""
    d = _load(raw, limits, _INTERACTION_FIELDS)
    if d is None:
        return None
    try:
        if not (_name(d["event_id"]) and _name(d["agent_id"]) and _name(d["task_type"]) and _name(d["operator"])):
            return None
        prompt, response = d["prompt"], d["response"]
        ts = _ts(d["ts"])
    except KeyError:  # a required field (pydantic's error) or a defaulted one (pydantic fills it in)
        return None
    if ts is None or not _in_window(ts, limits) or type(prompt) is not str or type(response) is not str:
        return None
    if len(prompt.encode()) > limits.max_prompt_bytes or len(response.encode()) > limits.max_response_bytes:
        return None
    adapter = d.get("adapter")
    if adapter is not None and not _name(adapter):
        return None
    lat = d.get("latency_ms", 0.0)
    if not _number(lat) or lat < 0:
        return None
    if not _small_metadata(d, limits.max_metadata_bytes):
        return None
    # pydantic's lax bool also takes 0/1 and "yes"/"off"/...; those go the slow way
    if not _caller(d.get("caller")) or type(d.get("forced", False)) is not bool:
        return None
    finish, session, step = d.get("finish_reason"), d.get("session_id"), d.get("step")
    if finish is not None and not (type(finish) is str and 0 < len(finish) <= 64):
        return None
    if session is not None and not _name(session):
        return None
    if step is not None and not (type(step) is int and 0 <= step <= 1_000_000):
        return None
    return FastInteraction(d, ts)


def fast_feedback(raw: Any, limits: Limits) -> FastFeedback | None:
    """The event, when `raw` is plainly a valid FeedbackEvent; else None."""
    d = _load(raw, limits, _FEEDBACK_FIELDS)
    if d is None:
        return None
    try:
        target = [d[k] for k in ("interaction_id", "session_id") if d.get(k) is not None]
        if not (_name(d["event_id"]) and len(target) == 1 and _name(target[0])) or d["kind"] not in _KINDS:
            return None
        value = d["value"]
        ts = _ts(d["ts"])
    except (KeyError, TypeError):  # TypeError: an unhashable kind
        return None
    if ts is None or not _in_window(ts, limits) or not _number(value) or not 0.0 <= value <= 1.0:
        return None
    if not _small_metadata(d, limits.max_metadata_bytes) or not _caller(d.get("caller")):
        return None
    return FastFeedback(d, ts)


def parse_interaction(raw: Any, limits: Limits) -> FastInteraction | InteractionEvent:
    """The fast record, or the pydantic model (raising EventValidationError with every problem named)."""
    return fast_interaction(raw, limits) or parse_event(InteractionEvent, raw, limits)


def parse_feedback(raw: Any, limits: Limits) -> FastFeedback | FeedbackEvent:
    """The fast record, or the pydantic model (raising EventValidationError with every problem named)."""
    return fast_feedback(raw, limits) or parse_event(FeedbackEvent, raw, limits)


_SCORE_FIELDS = frozenset(
    ("schema_version", "interaction_id", "ts", "task_type", "operator", "adapter", "reward", "parts", "revision")
)
_UTILITY_FIELDS = frozenset(
    ("schema_version", "task_type", "operator", "utility", "n", "last_reward", "ts", "imported")
)


def fast_score(raw: Any, limits: Limits) -> dict[str, Any] | None:
    """A ScoreEvent's fields (`ts` a datetime, numbers floats), when `raw` is plainly valid; else None."""
    d = _load(raw, limits, _SCORE_FIELDS)
    if d is None or len(d) != len(_SCORE_FIELDS):  # the worker writes every field
        return None
    rev, reward, parts, adapter = d["revision"], d["reward"], d["parts"], d["adapter"]
    if not (_name(d["interaction_id"]) and _name(d["task_type"]) and _name(d["operator"])):
        return None
    if adapter is not None and not _name(adapter):
        return None
    if type(rev) is not int or rev < 0 or not _number(reward) or not 0.0 <= reward <= 1.0 or type(parts) is not dict:
        return None
    if not all(_number(v) for v in parts.values()):
        return None
    ts = _ts(d["ts"])
    if ts is None:
        return None
    d["ts"], d["reward"] = ts, float(reward)
    d["parts"] = {k: float(v) for k, v in parts.items()}
    return d


def fast_utility(raw: Any, limits: Limits) -> dict[str, Any] | None:
    """A UtilityEvent's fields (`ts` a datetime, numbers floats), when `raw` is plainly valid; else None."""
    d = _load(raw, limits, _UTILITY_FIELDS)
    # `imported` came later: an event without it (an older worker's) is plainly valid with the model's default 0
    if d is None or len(d) + ("imported" not in d) != len(_UTILITY_FIELDS):
        return None
    u, n, last, imported = d["utility"], d["n"], d["last_reward"], d.setdefault("imported", 0)
    if not (_name(d["task_type"]) and _name(d["operator"])) or type(n) is not int or n < 0:
        return None
    if type(imported) is not int or not 0 <= imported <= n:
        return None
    if not _number(u) or not (last is None or _number(last)):
        return None
    ts = _ts(d["ts"])
    if ts is None:
        return None
    d["ts"], d["utility"] = ts, float(u)
    d["last_reward"] = None if last is None else float(last)
    return d


# -- the worker's own outputs: the models' JSON, written directly -------------------------------------------


def score_json(
    interaction_id: str, ts: float, task_type: str, operator: str, adapter: str | None, reward: float,
    parts: dict[str, float], revision: int,
) -> bytes:  # fmt: skip
    """A ScoreEvent's JSON (what `ScoreEvent(...).to_json_bytes()` gives, for values the worker has checked)."""
    return orjson.dumps({
        "schema_version": 1, "interaction_id": interaction_id, "ts": datetime.fromtimestamp(ts, UTC),
        "task_type": task_type, "operator": operator, "adapter": adapter, "reward": float(reward),
        "parts": {k: float(v) for k, v in parts.items()}, "revision": revision,
    }, option=orjson.OPT_UTC_Z)  # fmt: skip


def utility_json(
    task_type: str, operator: str, utility: float, n: int, last_reward: float | None, ts: float, imported: int = 0
) -> bytes:
    """A UtilityEvent's JSON (as `UtilityEvent(...).to_json_bytes()`)."""
    return orjson.dumps({
        "schema_version": 1, "task_type": task_type, "operator": operator, "utility": float(utility), "n": n,
        "last_reward": None if last_reward is None else float(last_reward), "ts": datetime.fromtimestamp(ts, UTC),
        "imported": imported,
    }, option=orjson.OPT_UTC_Z)  # fmt: skip


__all__ = [
    "FastFeedback",
    "FastInteraction",
    "fast_feedback",
    "fast_interaction",
    "fast_score",
    "fast_utility",
    "parse_feedback",
    "parse_interaction",
    "score_json",
    "utility_json",
]
