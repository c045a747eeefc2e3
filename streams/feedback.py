"""Batches of `taoflow.feedback`: validate, join to the interaction by id, re-score with the feedback."""

from __future__ import annotations

import time
from typing import Any

from schemas import FeedbackEvent
from streams.context import WorkerContext
from streams.outbox import Outbox, table_rows
from streams.scoring import apply_feedback, position, refusal
from streams.sessions import send_feedback


def process_batch(ctx: WorkerContext, out: Outbox, messages: list[Any]) -> None:
    """Feedback for a known interaction re-scores it now; feedback that came first is parked until it arrives.

    Feedback from another caller than the interaction's is dead-lettered, here or when the parked feedback's
    interaction arrives; a repeated kind replaces its value without a second utility reward (`streams.scoring`).
    """
    table, pending = table_rows(ctx.interactions), table_rows(ctx.pending_feedback)
    for msg in messages:
        fb = ctx.parse(out, FeedbackEvent, msg)
        if fb is not None:
            ctx.isolated(out, msg, _one, ctx, out, fb, msg, table, pending)


def _one(ctx: WorkerContext, out: Outbox, fb: Any, msg: Any, table: Any, pending: Any) -> None:
    """One valid feedback event; it works on copies and writes its table last (see `WorkerContext.isolated`)."""
    cfg = ctx.cfg
    if fb.session_id is not None:
        send_feedback(ctx, out, fb, msg)  # to the session's owner, which joins it to every step
        return
    iid = fb.interaction_id
    ts = fb.ts.timestamp()
    known = table.get(iid)
    if known is None:
        old = pending.get(iid)
        parked: dict[str, Any] = ({**old, "items": list(old["items"]), "ids": list(old["ids"])} if old
                  else {"items": [], "ids": [], "w": time.time(), "b": 0})  # fmt: skip
        if fb.event_id in parked["ids"]:
            ctx.count("duplicate_feedback")
            return
        # where it came from and its bytes: if its interaction never arrives, or it is refused when it does, it is
        # dead-lettered as it was; its caller is checked then
        raw = msg.value.decode("utf-8", "replace") if isinstance(msg.value, bytes) else str(msg.value)
        size = parked.get("b", sum(len(i[5]) for i in parked["items"])) + len(raw)
        refused = ctx.parking_refusal(f"interaction {iid!r}, which has not arrived", len(parked["items"]) + 1, size)
        if refused is not None:
            ctx.dead_letter(out, msg, refused)
            ctx.count("feedback_over_parking_limit")
            return
        parked["items"].append([fb.kind, fb.value, ts, msg.partition, msg.offset, raw, fb.caller])
        parked["ids"].append(fb.event_id)
        parked["b"] = size
        out.put_table(ctx.pending_feedback, iid, parked)
        ctx.count("feedback_parked")
        return
    reason = refusal(iid, fb.caller, known)
    if reason is not None:
        ctx.dead_letter(out, msg, reason)
        ctx.count("feedback_refused")
        return
    if fb.event_id in known.get("fid", ()):
        ctx.count("duplicate_feedback")
        return
    if len(known.get("fid", ())) >= cfg.max_feedback_per_interaction:
        ctx.dead_letter(out, msg, (
            f"interaction {iid!r} already took {cfg.max_feedback_per_interaction} feedback events "
            "(TAOFLOW_STREAM_MAX_FEEDBACK_PER_INTERACTION)"
        ))  # fmt: skip
        ctx.count("feedback_over_interaction_limit")
        return
    state = {**known, "f": dict(known["f"]), "fid": [*known.get("fid", ()), fb.event_id]}
    apply_feedback(ctx, out, iid, state, fb.kind, fb.value, ts, f"f:{msg.partition}", position(msg.offset))
    out.put_table(ctx.interactions, iid, state)
    ctx.count("feedback")
