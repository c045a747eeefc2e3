"""FeedbackEvent: an outcome signal about an earlier interaction (topic `taoflow.feedback`)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from schemas.base import EventModel, EventTime, check_metadata_size, new_event_id, utcnow
from schemas.interactions import Caller, EventId
from schemas.topics import FEEDBACK

FeedbackKind = Literal["thumbs", "rating", "followup", "implemented", "task_success", "custom"]
FEEDBACK_KINDS: tuple[str, ...] = ("thumbs", "rating", "followup", "implemented", "task_success", "custom")


class FeedbackEvent(EventModel):
    """Implicit or explicit feedback, joined to its interaction by `interaction_id`, or to every step of a
    multi-step session by `session_id` (exactly one of the two)."""

    topic: ClassVar[str] = FEEDBACK

    event_id: EventId = Field(default_factory=new_event_id)
    interaction_id: EventId | None = None
    ts: EventTime = Field(default_factory=utcnow)
    kind: FeedbackKind
    value: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    metadata: Annotated[dict[str, Any], AfterValidator(check_metadata_size)] = Field(default_factory=dict)
    caller: Caller | None = None  # set by the gateway: accepted only for interactions this caller captured
    session_id: EventId | None = None  # feedback on a whole session (added in 0.2)

    @model_validator(mode="after")
    def _one_target(self) -> FeedbackEvent:
        if (self.interaction_id is None) == (self.session_id is None):
            raise ValueError("feedback names exactly one of interaction_id and session_id")
        return self

    def key(self) -> bytes:
        return (self.interaction_id or self.session_id or "").encode()
