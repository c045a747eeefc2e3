"""ScoreEvent: the reward given to an interaction, with its parts (topic `taoflow.scores`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from schemas.base import EventModel, Timestamp, utcnow
from schemas.interactions import EventId, Name
from schemas.topics import SCORES


class ScoreEvent(EventModel):
    """A reward in [0, 1] and the per-scorer parts it was composed from."""

    topic: ClassVar[str] = SCORES

    interaction_id: EventId
    ts: Timestamp = Field(default_factory=utcnow)
    task_type: Name
    operator: Name
    adapter: Name | None = None
    reward: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    parts: dict[str, float] = Field(default_factory=dict)
    revision: int = Field(default=0, ge=0, description="0 at first score; +1 each time late feedback re-scores it")

    def key(self) -> bytes:
        return self.interaction_id.encode()
