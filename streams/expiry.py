"""Join-state expiry: interactions stop waiting for feedback `join_ttl_s` after the worker first saw them, and
parked feedback whose interaction never arrived goes to the dead letters (with its original bytes and the
reason) instead of being kept forever or dropped silently.

It runs inside the lane's processing loop (`Lane.run`), between batches, so it never races the processors,
and its table deletions go out as changelog tombstones in an Outbox like any other output. Only keys of input
partitions this worker holds are touched: the new owner of a partition expires its own keys.
"""

from __future__ import annotations

import time
from typing import Any

from schemas import DeadLetter
from schemas import topics as names
from streams.outbox import Outbox, partition_for
from streams.topics import SESSIONS_INTERNAL


def expire(ctx: Any, out: Outbox, assigned: set[tuple[str, int]], now: float | None = None) -> dict[str, int]:
    """Remove join state older than the TTL from `ctx.interactions` and `ctx.pending_feedback`.

    `assigned`: the (topic, partition) pairs of the input topics this worker holds. Returns counts.
    """
    now = time.time() if now is None else now
    horizon = now - ctx.cfg.join_ttl_s
    parts = ctx.settings.broker.partitions
    counts = {"expired_interactions": 0, "expired_feedback": 0, "expired_sessions": 0}

    def owned(topic: str, key: str) -> bool:
        return (topic, partition_for(key.encode(), parts)) in assigned

    for iid, state in list(ctx.interactions.data.items()):
        if state.get("w", state.get("ts", now)) < horizon and owned(names.INTERACTIONS, iid):
            out.put_table(ctx.interactions, iid, None)
            counts["expired_interactions"] += 1
    for iid, parked in list(ctx.pending_feedback.data.items()):
        items = parked.get("items", [])
        if parked.get("w", min((i[2] for i in items), default=now)) >= horizon or not owned(names.FEEDBACK, iid):
            continue
        for item in items:
            reason = (
                f"feedback for interaction {iid!r}: no such interaction arrived within the join TTL "
                f"({ctx.cfg.join_ttl_s:.0f}s)"
            )
            dead_letter_parked(ctx, out, item, reason, count=False)
            counts["expired_feedback"] += 1
        out.put_table(ctx.pending_feedback, iid, None)
    sessions = getattr(ctx, "sessions", None)
    for key, state in list(sessions.data.items()) if sessions is not None else ():
        if state.get("w", now) >= horizon or not owned(SESSIONS_INTERNAL, key):
            continue
        for item in state.get("pf", ()):
            reason = (f"feedback for session {state['sid']!r}: no step of it arrived within the join TTL "
                      f"({ctx.cfg.join_ttl_s:.0f}s)")  # fmt: skip
            dead_letter_parked(ctx, out, item, reason, count=False)
            counts["expired_feedback"] += 1
        out.put_table(ctx.sessions, key, None)
        counts["expired_sessions"] += 1
    for name, n in counts.items():
        if n:
            ctx.count(name, n)
    return counts


def dead_letter_parked(ctx: Any, out: Outbox, item: list[Any], reason: str, count: bool = True) -> None:
    """Queue a parked feedback item for the dead letters: its original bytes and origin, and why.

    An item is `[kind, value, ts, partition, offset, raw, caller]`; earlier versions kept the first six, or only
    the first three (no origin)."""
    if len(item) >= 6:
        partition, offset, raw = item[3:6]
        where = ""
    else:
        partition, offset, raw, where = 0, 0, "", " (origin not recorded)"
    dl = DeadLetter.of(names.FEEDBACK, partition, offset, raw.encode(), reason + where)
    out.add(ctx.topics.dead_letters.get_topic_name(), None, dl.to_json_bytes())
    if count:
        ctx.count("dead_letters")
