"""InteractionEvent: one agent request and its response (topic `taoflow.interactions`)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from schemas.base import EventModel, EventTime, check_metadata_size, limits_from, new_event_id, utcnow
from schemas.topics import INTERACTIONS

EventId = Annotated[str, Field(min_length=1, max_length=256)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
# who captured an event: the hex sha256 (first 32 digits) of the gateway API key it came in with; None for trusted
# producers (the SDK writing to Kafka directly, or an admin key)
Caller = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class ChatMessage(BaseModel):
    """One OpenAI-style chat message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


Prompt = str | Annotated[list[ChatMessage], Field(min_length=1)]


def prompt_bytes(prompt: Prompt) -> int:
    """UTF-8 size of a prompt: the string, or the sum of the messages' contents."""
    if isinstance(prompt, str):
        return len(prompt.encode())
    return sum(len((m.content or "").encode()) for m in prompt)


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string (chat messages joined as `role: content` lines)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content or ''}" for m in prompt)


class InteractionEvent(EventModel):
    """An agent's request and the response it got."""

    topic: ClassVar[str] = INTERACTIONS

    event_id: EventId = Field(default_factory=new_event_id)
    ts: EventTime = Field(default_factory=utcnow)
    agent_id: Name
    task_type: Name
    operator: Name
    prompt: Prompt
    response: str
    adapter: Name | None = None
    latency_ms: float = Field(default=0.0, ge=0)
    metadata: Annotated[dict[str, Any], AfterValidator(check_metadata_size)] = Field(default_factory=dict)
    caller: Caller | None = None  # only feedback from the same caller (or a trusted producer) may score it
    forced: bool = False  # the client forced its operator or adapter: served and landed, never in utilities
    # what a learner needs of a tool-using call (added in 0.2, optional: events without them stay valid)
    tools: list[dict[str, Any]] | None = None  # the tools the request offered (OpenAI `tools`)
    tool_calls: list[dict[str, Any]] | None = None  # the tool calls the response made
    response_format: dict[str, Any] | None = None  # the response format the request asked for
    finish_reason: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    # a multi-step task: its steps share a session id, and its outcome (session feedback) is judged as a whole
    session_id: EventId | None = None
    step: int | None = Field(default=None, ge=0, le=1_000_000)

    @field_validator("prompt")
    @classmethod
    def _prompt_size(cls, value: Prompt, info: ValidationInfo) -> Prompt:
        limit = limits_from(info).max_prompt_bytes
        size = prompt_bytes(value)
        if size > limit:
            raise ValueError(
                f"prompt is {size} bytes, over the limit of {limit} bytes (TAOFLOW_LIMITS_MAX_PROMPT_BYTES)"
            )
        return value

    @field_validator("response")
    @classmethod
    def _response_size(cls, value: str, info: ValidationInfo) -> str:
        limit = limits_from(info).max_response_bytes
        size = len(value.encode())
        if size > limit:
            raise ValueError(
                f"response is {size} bytes, over the limit of {limit} bytes (TAOFLOW_LIMITS_MAX_RESPONSE_BYTES)"
            )
        return value

    def key(self) -> bytes:
        return self.event_id.encode()
