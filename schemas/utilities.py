"""UtilityEvent: the current ACT-R utility of one operator for one task type (compacted topic)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from schemas.base import EventModel, Timestamp, utcnow
from schemas.interactions import Name
from schemas.topics import UTILITIES


class UtilityEvent(EventModel):
    """State after an update: `U(n) = U(n-1) + alpha * (R(n) - U(n-1))`."""

    topic: ClassVar[str] = UTILITIES

    task_type: Name
    operator: Name
    utility: float = Field(allow_inf_nan=False)
    n: int = Field(ge=0, description="number of rewards folded in")
    last_reward: float | None = None
    ts: Timestamp = Field(default_factory=utcnow)

    def key(self) -> bytes:
        return f"{self.task_type}/{self.operator}".encode()
