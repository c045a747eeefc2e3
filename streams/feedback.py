"""Batches of `taoflow.feedback`: validate, join to the interaction by id, re-score with the feedback."""

from __future__ import annotations

import time
from typing import Any

from schemas import FeedbackEvent
from streams.app import WorkerContext
from streams.outbox import Outbox, table_rows
from streams.scoring import position, score


def process_batch(ctx: WorkerContext, out: Outbox, messages: list[Any]) -> None:
    """Feedback for a known interaction re-scores it now; feedback that came first is parked until it arrives."""
    table, pending = table_rows(ctx.interactions), table_rows(ctx.pending_feedback)
    for msg in messages:
        fb = ctx.parse(out, FeedbackEvent, msg)
        if fb is None:
            continue
        iid = fb.interaction_id
        ts = fb.ts.timestamp()
        state = table.get(iid)
        if state is None:
            parked = pending.get(iid) or {"items": [], "ids": [], "w": time.time()}
            if fb.event_id not in parked["ids"]:
                # where it came from and its bytes: if its interaction never arrives, it is dead-lettered as it was
                raw = msg.value.decode("utf-8", "replace") if isinstance(msg.value, bytes) else str(msg.value)
                parked["items"].append([fb.kind, fb.value, ts, msg.partition, msg.offset, raw])
                parked["ids"].append(fb.event_id)
                out.put_table(ctx.pending_feedback, iid, parked)
            ctx.count("feedback_parked")
            continue
        seen = state.setdefault("fid", [])
        if fb.event_id in seen:
            ctx.count("duplicate_feedback")
            continue
        seen.append(fb.event_id)
        state["f"][fb.kind] = fb.value
        score(ctx, out, iid, state, ts, f"f:{msg.partition}", position(msg.offset))
        out.put_table(ctx.interactions, iid, state)
        ctx.count("feedback")
