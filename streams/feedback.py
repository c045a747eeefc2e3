"""Batches of `taoflow.feedback`: validate, join to the interaction by id, re-score with the feedback."""

from __future__ import annotations

import time
from typing import Any

from schemas import FeedbackEvent
from streams.app import WorkerContext
from streams.outbox import Outbox, table_rows
from streams.scoring import apply_feedback, position, refusal


def process_batch(ctx: WorkerContext, out: Outbox, messages: list[Any]) -> None:
    """Feedback for a known interaction re-scores it now; feedback that came first is parked until it arrives.

    Feedback from another caller than the interaction's is dead-lettered, here or when the parked feedback's
    interaction arrives; a repeated kind replaces its value without a second utility reward (`streams.scoring`).
    """
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
                # where it came from and its bytes: if its interaction never arrives, or it is refused when it
                # does, it is dead-lettered as it was; its caller is checked then
                raw = msg.value.decode("utf-8", "replace") if isinstance(msg.value, bytes) else str(msg.value)
                parked["items"].append([fb.kind, fb.value, ts, msg.partition, msg.offset, raw, fb.caller])
                parked["ids"].append(fb.event_id)
                out.put_table(ctx.pending_feedback, iid, parked)
            ctx.count("feedback_parked")
            continue
        reason = refusal(iid, fb.caller, state)
        if reason is not None:
            ctx.dead_letter(out, msg, reason)
            ctx.count("feedback_refused")
            continue
        seen = state.setdefault("fid", [])
        if fb.event_id in seen:
            ctx.count("duplicate_feedback")
            continue
        seen.append(fb.event_id)
        apply_feedback(ctx, out, iid, state, fb.kind, fb.value, ts, f"f:{msg.partition}", position(msg.offset))
        out.put_table(ctx.interactions, iid, state)
        ctx.count("feedback")
