"""Agent on `taoflow.feedback`: validate, join to the interaction by id, re-score with the feedback."""

from __future__ import annotations

import logging
from typing import Any

import faust

from schemas import EventValidationError, FeedbackEvent, parse_event
from streams.app import WorkerContext
from streams.scoring import position, score

log = logging.getLogger(__name__)


def register(app: faust.App, ctx: WorkerContext) -> None:
    @app.agent(ctx.topics.feedback, name="taoflow.agents.feedback")
    async def feedback(stream: Any) -> None:
        async for events in stream.take_events(ctx.cfg.batch_size, within=ctx.cfg.batch_ms / 1000):
            process_batch(ctx, events)


def process_batch(ctx: WorkerContext, events: list[Any]) -> None:
    """Feedback for a known interaction re-scores it now; feedback that came first is parked until it arrives."""
    table, pending = ctx.interactions, ctx.pending_feedback
    for ev in events:
        msg = ev.message
        try:
            fb = parse_event(FeedbackEvent, msg.value, ctx.limits)
        except EventValidationError as exc:
            ctx.dead_letter(msg, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - nothing in the input may crash the worker
            log.exception("unexpected error validating %s[%s]@%s", msg.topic, msg.partition, msg.offset)
            ctx.dead_letter(msg, f"unexpected error: {exc!r}")
            continue
        iid = fb.interaction_id
        ts = fb.ts.timestamp()
        state = table.get(iid)
        if state is None:
            parked = pending.get(iid) or {"items": [], "ids": []}
            if fb.event_id not in parked["ids"]:
                parked["items"].append([fb.kind, fb.value, ts])
                parked["ids"].append(fb.event_id)
                pending[iid] = parked
            ctx.count("feedback_parked")
            continue
        seen = state.setdefault("fid", [])
        if fb.event_id in seen:
            ctx.count("duplicate_feedback")
            continue
        seen.append(fb.event_id)
        state["f"][fb.kind] = fb.value
        score(ctx, iid, state, ts, f"f:{msg.partition}", position(msg.offset))
        table[iid] = state
        ctx.count("feedback")
