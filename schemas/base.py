"""Shared pieces of every taoflow event: strict base model, RFC 3339 timestamps, size limits."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, ValidationError, ValidationInfo

from schemas.exceptions import EventValidationError

SCHEMA_VERSION = 1

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def _parse_rfc3339(value: Any) -> datetime:
    """Accept an aware datetime or an RFC 3339 string that is a valid time in UTC; everything else is an error,
    never a guess."""
    ts = _parse_aware(value)
    try:
        ts.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"timestamp {ts.isoformat()} is out of range in UTC") from None
    return ts


def _parse_event_time(value: Any, info: ValidationInfo) -> datetime:
    """An agent's event time: as `_parse_rfc3339`, and within the limits' window around now."""
    return check_window(_parse_aware(value), limits_from(info))


def check_window(ts: datetime, limits: Limits) -> datetime:
    """`ts` if it lies in the window around now that the limits allow (a timestamp far in the past or future is a
    broken clock or a hostile event; one past year 9999 in UTC would break every computation made with it)."""
    try:
        age = (datetime.now(UTC) - ts.astimezone(UTC)).total_seconds()
    except (OverflowError, ValueError):
        raise ValueError(f"timestamp {ts.isoformat()} is out of range in UTC") from None
    if age > limits.max_ts_age_s:
        raise ValueError(
            f"timestamp {_format_rfc3339(ts)} is more than {limits.max_ts_age_s / 86400:g} days in the past "
            "(TAOFLOW_LIMITS_MAX_TS_AGE_S)"
        )
    if -age > limits.max_ts_ahead_s:
        raise ValueError(
            f"timestamp {_format_rfc3339(ts)} is more than {limits.max_ts_ahead_s:.0f} s in the future "
            "(TAOFLOW_LIMITS_MAX_TS_AHEAD_S; check the sender's clock)"
        )
    return ts


def _parse_aware(value: Any) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("timestamp has no timezone; use an aware datetime (e.g. datetime.now(timezone.utc))")
        return value
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be an RFC 3339 string, got {type(value).__name__}")
    if not _RFC3339.match(value):
        raise ValueError(f"{value!r} is not an RFC 3339 timestamp (expected e.g. 2026-01-31T12:00:00Z)")
    text = value.replace("z", "Z").replace("Z", "+00:00")
    # Python < 3.11 parsers reject >6 fractional digits; trim nanoseconds to microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid date or time: {exc}") from None


def _format_rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


Timestamp = Annotated[datetime, BeforeValidator(_parse_rfc3339), PlainSerializer(_format_rfc3339, return_type=str)]
"""An aware datetime that reads and writes RFC 3339 (UTC, `Z` suffix, on output)."""

EventTime = Annotated[datetime, BeforeValidator(_parse_event_time), PlainSerializer(_format_rfc3339, return_type=str)]
"""A Timestamp sent by an agent (interactions, feedback): also bounded to a window around now (`Limits`)."""


def utcnow() -> datetime:
    """The current time, timezone-aware, UTC."""
    return datetime.now(UTC)


def new_event_id() -> str:
    """A fresh unique event id (UUID4 hex)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Limits:
    """Size bounds applied while validating events; configurable through `TAOFLOW_LIMITS_*`."""

    max_prompt_bytes: int = 256 * 1024
    max_response_bytes: int = 256 * 1024
    max_metadata_bytes: int = 64 * 1024
    max_event_bytes: int = 1024 * 1024
    max_ts_age_s: float = 10 * 365 * 86400.0  # how far in the past an event's timestamp may lie
    max_ts_ahead_s: float = 86400.0  # and how far in the future (clock skew)


DEFAULT_LIMITS = Limits()


def limits_from(info: ValidationInfo) -> Limits:
    """The limits passed in the validation context, or the defaults."""
    ctx = info.context
    if isinstance(ctx, dict):
        limits = ctx.get("limits")
        if isinstance(limits, Limits):
            return limits
    return DEFAULT_LIMITS


def check_metadata_size(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """Reject metadata whose JSON encoding exceeds the configured bound."""
    limit = limits_from(info).max_metadata_bytes
    size = len(json.dumps(value, separators=(",", ":"), default=str).encode())
    if size > limit:
        raise ValueError(
            f"metadata is {size} bytes, over the limit of {limit} bytes (TAOFLOW_LIMITS_MAX_METADATA_BYTES)"
        )
    return value


class EventModel(BaseModel):
    """Base of every event we define: unknown fields are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=16 * 1024 * 1024)

    topic: ClassVar[str]
    schema_version: Literal[1] = 1  # SCHEMA_VERSION

    def key(self) -> bytes | None:
        """The Kafka message key of this event (README's topic table)."""
        return None

    def to_json_bytes(self) -> bytes:
        """The UTF-8 JSON wire form."""
        return self.model_dump_json().encode()


E = TypeVar("E", bound=EventModel)


def format_errors(model: type[BaseModel], exc: ValidationError) -> str:
    """One line per problem, each naming the field (dotted path) and what is wrong with it."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "<event>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of the schema; remove it or put it in metadata)"
        elif err["type"] == "missing":
            msg = "missing required field"
        parts.append(f"field '{loc}': {msg}")
    return f"invalid {model.__name__}: " + "; ".join(parts)


def parse_event(model: type[E], data: bytes | str | dict[str, Any], limits: Limits | None = None) -> E:
    """Validate raw bytes, a JSON string or a dict as `model`; raise EventValidationError naming each bad field."""
    limits = limits or DEFAULT_LIMITS
    ctx = {"limits": limits}
    try:
        if isinstance(data, dict):
            return model.model_validate(data, context=ctx)
        if len(data) > limits.max_event_bytes:
            raise EventValidationError(
                f"invalid {model.__name__}: event is {len(data)} bytes, over the limit of "
                f"{limits.max_event_bytes} bytes (TAOFLOW_LIMITS_MAX_EVENT_BYTES)"
            )
        return model.model_validate_json(data, context=ctx)
    except ValidationError as exc:
        raise EventValidationError(format_errors(model, exc)) from None
