"""UtilityEvent: the current ACT-R utility of one operator for one task type (compacted topic)."""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import Field, model_validator

from schemas.base import EventModel, Timestamp, utcnow
from schemas.interactions import Name
from schemas.topics import UTILITIES


class UtilityEvent(EventModel):
    """State after an update: `U(n) = U(n-1) + alpha * (R(n) - U(n-1))`.

    Knowledge imported from another deployment (`taoflow knowledge import`) enters as `imported` pseudo-rewards of
    the exported utility's value, folded in by the same rule: `n` counts them too, so `n - imported` rewards were
    learned here (and an update's `n` still only grows, which the landing upsert and the router rely on).
    """

    topic: ClassVar[str] = UTILITIES

    task_type: Name
    operator: Name
    utility: float = Field(allow_inf_nan=False)
    n: int = Field(ge=0, description="number of rewards folded in, the imported pseudo-rewards included")
    last_reward: float | None = None
    ts: Timestamp = Field(default_factory=utcnow)
    imported: int = Field(default=0, ge=0, description="of the n, pseudo-rewards imported from another deployment")

    @model_validator(mode="after")
    def _imported_within_n(self) -> Self:
        if self.imported > self.n:
            raise ValueError(f"imported ({self.imported}) cannot exceed n ({self.n}), which counts them")
        return self

    def key(self) -> bytes:
        return f"{self.task_type}/{self.operator}".encode()
