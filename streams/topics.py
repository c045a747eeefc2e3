"""faust topic objects for the product's topics and the worker's internal repartition topics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust

from schemas import topics as names

REWARDS_INTERNAL = "taoflow.worker.rewards"  # rewards re-keyed by task_type/operator for the utility table
SESSIONS_INTERNAL = (
    "taoflow.worker.sessions"  # session steps and session feedback, keyed by session (`streams.sessions`)
)
SESSION_JOINS_INTERNAL = "taoflow.worker.session-joins"  # session feedback for one step, keyed by its interaction


@dataclass(frozen=True)
class Topics:
    interactions: faust.TopicT
    feedback: faust.TopicT
    scores: faust.TopicT
    utilities: faust.TopicT
    dead_letters: faust.TopicT
    rewards: faust.TopicT
    sessions: faust.TopicT
    session_steps: faust.TopicT
    session_joins: faust.TopicT


def declare(app: faust.App, partitions: int) -> Topics:
    """Every topic the worker reads or writes; values are raw bytes (we parse with the schemas ourselves)."""

    def topic(name: str, parts: int | None = partitions, **kw: Any) -> faust.TopicT:
        return app.topic(name, key_serializer="raw", value_serializer="raw", partitions=parts, **kw)

    return Topics(
        interactions=topic(names.INTERACTIONS),
        feedback=topic(names.FEEDBACK),
        scores=topic(names.SCORES),
        utilities=topic(names.UTILITIES, parts=None),
        dead_letters=topic(names.DEAD_LETTERS),
        rewards=topic(REWARDS_INTERNAL, internal=True),
        sessions=topic(names.SESSIONS),
        session_steps=topic(SESSIONS_INTERNAL, internal=True),
        session_joins=topic(SESSION_JOINS_INTERNAL, internal=True),
    )
