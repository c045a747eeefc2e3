"""FeedbackEvent: an outcome signal about an earlier interaction (topic `taoflow.feedback`)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from schemas.base import EventModel, EventTime, check_metadata_size, new_event_id, utcnow
from schemas.interactions import Caller, EventId
from schemas.topics import FEEDBACK

FeedbackKind = Literal["thumbs", "rating", "followup", "implemented", "task_success", "custom"]
FEEDBACK_KINDS: tuple[str, ...] = ("thumbs", "rating", "followup", "implemented", "task_success", "custom")


class FeedbackEvent(EventModel):
    """Implicit or explicit feedback, joined to its interaction by `interaction_id`."""

    topic: ClassVar[str] = FEEDBACK

    event_id: EventId = Field(default_factory=new_event_id)
    interaction_id: EventId
    ts: EventTime = Field(default_factory=utcnow)
    kind: FeedbackKind
    value: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    metadata: Annotated[dict[str, Any], AfterValidator(check_metadata_size)] = Field(default_factory=dict)
    caller: Caller | None = None  # set by the gateway: accepted only for interactions this caller captured

    def key(self) -> bytes:
        return self.interaction_id.encode()
