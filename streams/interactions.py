"""Batches of `taoflow.interactions`: validate, score with the rule scorers, start the feedback join."""

from __future__ import annotations

import logging
from typing import Any

from schemas import InteractionEvent, prompt_text
from streams.context import WorkerContext
from streams.expiry import dead_letter_parked
from streams.outbox import Outbox, table_rows
from streams.scoring import apply_feedback, new_state, position, refusal, replay_first_score, score
from streams.sessions import send_step

log = logging.getLogger(__name__)


def process_batch(ctx: WorkerContext, out: Outbox, messages: list[Any]) -> None:
    """Validate a batch, dead-letter the bad ones, score the rest in one call per scorer."""
    valid: list[tuple[InteractionEvent, Any]] = []
    for msg in messages:
        parsed = ctx.parse(out, InteractionEvent, msg)
        if parsed is not None:
            valid.append((parsed, msg))
    if not valid:
        return
    evs = [e for e, _ in valid]
    try:
        parts = ctx.scorer.rule_parts(
            [e.response for e in evs],
            prompts=[prompt_text(e.prompt) for e in evs],
            task_types=[e.task_type for e in evs],
            metadata=[e.metadata for e in evs],
        )
    except Exception:
        log.exception("a scorer failed on a batch of %d; those interactions get feedback-only rewards", len(evs))
        parts = [{} for _ in evs]
    table, pending = table_rows(ctx.interactions), table_rows(ctx.pending_feedback)
    for (ev, msg), p in zip(valid, parts, strict=True):
        ctx.isolated(out, msg, _one, ctx, out, ev, msg, p, table, pending)


def _one(ctx: WorkerContext, out: Outbox, ev: Any, msg: Any, p: dict[str, float], table: Any, pending: Any) -> None:
    """One valid interaction: score it, join its parked feedback; the tables are written last (see
    `WorkerContext.isolated`)."""
    iid = ev.event_id
    src = f"i:{msg.partition}"
    known = table.get(iid)
    if known is not None:
        if known.get("at") == [src, msg.offset]:
            # redelivery of the very message that created this state (after a crash or rebalance): its outputs may
            # not have gone out, so send them again; they are identical, downstream drops repeats
            replay_first_score(ctx, out, iid, known)
            if known.get("s"):
                send_step(ctx, out, ev, iid, known)
            ctx.count("replayed_interactions")
        else:
            ctx.count("duplicate_interactions")  # the same event id in another message: the first one counts
        return
    state = new_state(ev.task_type, ev.operator, ev.adapter, ev.ts.timestamp(), p, src, msg.offset,
                      caller=ev.caller, forced=ev.forced, session=ev.session_id, step=ev.step)  # fmt: skip
    score(ctx, out, iid, state, state["ts"], src, position(msg.offset))
    if ev.session_id is not None:
        send_step(ctx, out, ev, iid, state)
    parked = pending.get(iid)
    if parked:
        # their event ids count as seen: a redelivery of a parked feedback (its offset not yet committed when the
        # partition moved) must not re-score the interaction a second time
        seen = state.setdefault("fid", [])
        seen.extend(i for i in parked.get("ids", []) if i not in seen)
        for sub, item in enumerate(parked["items"], start=1):
            kind, value, ts = item[:3]
            # parked by an earlier version (no caller kept): that version had no callers, so it was trusted
            reason = refusal(iid, item[6] if len(item) > 6 else None, state)
            if reason is not None:
                dead_letter_parked(ctx, out, item, reason)
                ctx.count("feedback_refused")
                continue
            apply_feedback(ctx, out, iid, state, kind, value, max(ts, state["ts"]), src, position(msg.offset, sub))
    out.put_table(ctx.interactions, iid, state)  # first: the only write that can be refused (its size)
    if parked:
        out.put_table(ctx.pending_feedback, iid, None)
    ctx.count("interactions")
