"""AdapterEvent: a LoRA adapter published, promoted or rolled back (topic `taoflow.adapters`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from schemas.base import EventModel, Timestamp, utcnow
from schemas.interactions import Name
from schemas.topics import ADAPTERS

AdapterAction = Literal["published", "canary", "promoted", "rolled_back", "loaded", "unloaded"]


class AdapterEvent(EventModel):
    """A transition in an adapter's life; `path` points at `adapters/<name>/` with its manifest."""

    topic: ClassVar[str] = ADAPTERS

    adapter: Name
    action: AdapterAction
    ts: Timestamp = Field(default_factory=utcnow)
    base_model: str
    path: str | None = None
    round_id: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    def key(self) -> bytes:
        return self.adapter.encode()
