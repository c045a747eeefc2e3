"""DeadLetter: input that could not be processed, kept whole with the reason (topic `taoflow.dead-letters`)."""

from __future__ import annotations

import base64
from typing import ClassVar

from pydantic import Field

from schemas.base import EventModel, Timestamp, utcnow
from schemas.topics import DEAD_LETTERS


class DeadLetter(EventModel):
    """The original bytes (base64), where they came from, and why they were rejected."""

    topic: ClassVar[str] = DEAD_LETTERS

    source_topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    error: str
    original_b64: str
    ts: Timestamp = Field(default_factory=utcnow)

    @classmethod
    def of(cls, source_topic: str, partition: int, offset: int, original: bytes, error: str) -> DeadLetter:
        """Build a dead letter from the raw message."""
        return cls(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            error=error,
            original_b64=base64.b64encode(original).decode(),
        )

    @property
    def original(self) -> bytes:
        """The rejected bytes, exactly as consumed."""
        return base64.b64decode(self.original_b64)

    def key(self) -> None:
        return None
