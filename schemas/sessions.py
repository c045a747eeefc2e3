"""SessionEvent: the outcome of a multi-step session so far (topic `taoflow.sessions`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from schemas.base import EventModel, Timestamp, utcnow
from schemas.interactions import Caller, EventId, Name
from schemas.topics import SESSIONS


class SessionEvent(EventModel):
    """A session's steps and reward, published again (revision + 1) as steps and session feedback arrive."""

    topic: ClassVar[str] = SESSIONS

    session_id: EventId
    caller: Caller | None = None  # sessions are kept per caller: another key's steps never join this one
    revision: int = Field(ge=0)
    ts: Timestamp = Field(default_factory=utcnow)
    task_type: Name | None = None  # of its first step (None until a step arrived)
    operator: Name | None = None  # the operator that ran it (its first step's; the gateway keeps it sticky)
    adapter: Name | None = None
    steps: int = Field(ge=0)
    started: Timestamp | None = None  # its first and last step's event times
    ended: Timestamp | None = None
    reward: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)  # from session feedback
    feedback: dict[str, float] = Field(default_factory=dict)  # the latest value of each session feedback kind
    rewarded: bool = False  # its reward went to the operator's utility (once per session)

    def key(self) -> bytes:
        return self.session_id.encode()
