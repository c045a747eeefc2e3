"""Event contracts: every rejection names the field and the problem; valid events round-trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from schemas import (
    EVENTS,
    AdapterEvent,
    DeadLetter,
    EventValidationError,
    FeedbackEvent,
    InteractionEvent,
    Limits,
    ScoreEvent,
    UtilityEvent,
    export_json_schemas,
    parse_event,
)
from schemas.registry import DOCUMENTS


def interaction(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "e-1",
        "ts": "2026-11-22T10:00:00Z",
        "agent_id": "agent-1",
        "task_type": "qa",
        "operator": "cot",
        "prompt": "What is 2+2?",
        "response": "4",
        "adapter": None,
        "latency_ms": 12.0,
        "metadata": {"user": "u1"},
    }
    base.update(over)
    return base


def feedback(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "f-1",
        "interaction_id": "e-1",
        "ts": "2026-11-22T10:00:05+01:00",
        "kind": "thumbs",
        "value": 1.0,
        "metadata": {},
    }
    base.update(over)
    return base


def reject(model: type, data: Any, limits: Limits | None = None) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    with pytest.raises(EventValidationError) as info:
        parse_event(model, raw, limits)
    return str(info.value)


def test_valid_interaction_round_trips_plain_and_chat() -> None:
    ev = parse_event(InteractionEvent, json.dumps(interaction()).encode())
    assert ev.ts == datetime(2026, 11, 22, 10, tzinfo=UTC)
    again = parse_event(InteractionEvent, ev.to_json_bytes())
    assert again == ev
    chat = parse_event(
        InteractionEvent,
        interaction(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]),
    )
    assert chat.prompt[1].content == "2+2?"  # type: ignore[union-attr]
    assert json.loads(chat.to_json_bytes())["ts"] == "2026-11-22T10:00:00Z"
    assert ev.key() == b"e-1"


def test_missing_field_is_named() -> None:
    data = interaction()
    del data["operator"]
    msg = reject(InteractionEvent, data)
    assert "field 'operator': missing required field" in msg


def test_wrong_type_is_named() -> None:
    msg = reject(InteractionEvent, interaction(latency_ms="fast"))
    assert "field 'latency_ms'" in msg and "valid number" in msg
    msg = reject(InteractionEvent, interaction(prompt=42))
    assert "field 'prompt" in msg


def test_unknown_field_is_rejected() -> None:
    msg = reject(InteractionEvent, interaction(temperature=0.7))
    assert "field 'temperature': unknown field" in msg


@pytest.mark.parametrize("ts", ["2026-13-01T00:00:00Z", "yesterday", "2026-11-22 10:00:00", "2026-11-22", 1732269600])
def test_bad_timestamp_is_rejected(ts: Any) -> None:
    msg = reject(InteractionEvent, interaction(ts=ts))
    assert "field 'ts'" in msg
    assert "RFC 3339" in msg or "valid date" in msg


def test_naive_datetime_is_rejected_in_python() -> None:
    with pytest.raises(EventValidationError, match="no timezone"):
        parse_event(InteractionEvent, interaction(ts=datetime(2026, 1, 1)))


@pytest.mark.parametrize("value", [-0.01, 1.5, "NaN"])
def test_feedback_value_outside_unit_interval(value: Any) -> None:
    msg = reject(FeedbackEvent, feedback(value=value))
    assert "field 'value'" in msg
    assert ("greater than or equal to 0" in msg) or ("less than or equal to 1" in msg) or ("finite" in msg)


def test_feedback_kind_must_be_known() -> None:
    msg = reject(FeedbackEvent, feedback(kind="like"))
    assert "field 'kind'" in msg and "'thumbs'" in msg


def test_oversize_prompt_response_metadata_and_event() -> None:
    small = Limits(max_prompt_bytes=100, max_response_bytes=50, max_metadata_bytes=64, max_event_bytes=4096)
    msg = reject(InteractionEvent, interaction(prompt="é" * 60), small)  # 120 bytes in UTF-8
    assert "field 'prompt'" in msg and "120 bytes, over the limit of 100" in msg
    msg = reject(InteractionEvent, interaction(prompt=[{"role": "user", "content": "x" * 101}]), small)
    assert "prompt is 101 bytes" in msg
    msg = reject(InteractionEvent, interaction(response="y" * 51), small)
    assert "field 'response'" in msg and "over the limit of 50" in msg
    msg = reject(InteractionEvent, interaction(metadata={"blob": "z" * 100}), small)
    assert "field 'metadata'" in msg and "over the limit of 64" in msg
    msg = reject(InteractionEvent, json.dumps(interaction(metadata={"pad": "p" * 5000})).encode(), small)
    assert "over the limit of 4096 bytes" in msg


def test_bad_json_and_wrong_schema_version() -> None:
    assert "Invalid JSON" in reject(InteractionEvent, b"{not json")
    msg = reject(InteractionEvent, interaction(schema_version=2))
    assert "field 'schema_version'" in msg


def test_chat_message_roles_are_checked() -> None:
    msg = reject(InteractionEvent, interaction(prompt=[{"role": "robot", "content": "hi"}]))
    assert "prompt" in msg and "role" in msg


def test_other_events_validate() -> None:
    ScoreEvent(interaction_id="e", task_type="qa", operator="o", reward=0.5, parts={"regex": 1.0})
    assert UtilityEvent(task_type="qa", operator="o", utility=0.3, n=4).key() == b"qa/o"
    AdapterEvent(adapter="a1", action="published", base_model="tiny", sha256="a" * 64)
    dl = DeadLetter.of("taoflow.interactions", 2, 17, b"\xff\x00garbage", "bad json")
    assert parse_event(DeadLetter, dl.to_json_bytes()).original == b"\xff\x00garbage"
    with pytest.raises(EventValidationError, match="field 'reward'"):
        parse_event(ScoreEvent, {"interaction_id": "e", "task_type": "q", "operator": "o", "reward": 2})


def test_exported_json_schemas_accept_valid_and_reject_invalid(tmp_path: Path) -> None:
    paths = export_json_schemas(tmp_path / "schemas")
    assert {p.name for p in paths} == {f"{n}.schema.json" for n in (*EVENTS, *DOCUMENTS)}
    schema = json.loads((tmp_path / "schemas" / "InteractionEvent.schema.json").read_text())
    assert schema["x-topic"] == "taoflow.interactions"
    instance = json.loads(parse_event(InteractionEvent, interaction()).to_json_bytes())
    jsonschema.validate(instance, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**instance, "surprise": 1}, schema)
