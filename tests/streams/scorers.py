"""A user-supplied scorer, named in settings as 'tests.streams.scorers:reward_from_metadata'."""

from __future__ import annotations

from typing import Any


def reward_from_metadata(completions: list[str], **kwargs: Any) -> list[float | None]:
    """The reward the test planted in each interaction's metadata (None where it planted none)."""
    return [m.get("r") for m in kwargs["metadata"]]
