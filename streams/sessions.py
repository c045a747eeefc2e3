"""Multi-step sessions: the steps of one task and the feedback on the task as a whole.

An agent working in several steps sends each step as an interaction with the same `session_id` (and its `step`);
the outcome (the ticket resolved, the code merged) comes as one FeedbackEvent naming the `session_id`. The join:

- A session is kept per caller: the key is `<caller or ->|<session_id>`, so another API key's steps or feedback
  never join a session it did not capture (as feedback is refused for another caller's interaction). Feedback
  from a trusted producer (no caller) joins the sessions captured without a caller.
- The interactions processor hands every session step here (internal topic keyed by the session key), and the
  feedback processor hands session feedback here; either may come first, or late, in any order.
- Every session feedback kind is joined to every step: each step's score is recomputed with it (a `session`
  join record goes to the step's interaction, keyed by its id, on a second internal topic).
- The session's reward, composed from its session feedback as the scorer composes feedback, updates the utility of
  the operator that ran it (its first step's) once per session, when a step and session feedback are both known,
  not once per step; session steps give no per-step utility reward (`streams.scoring.score`). A session with no
  session feedback leaves the utilities as they are; its steps are still scored and landed.
- Each change publishes the session's outcome as a new revision on `taoflow.sessions`, landed in the `sessions`
  table (the `session_outcomes` view keeps the latest).

Redelivered records (the same step or feedback id) re-send the session's outputs exactly as before (same reward
position, same revision, same join ids): downstream drops what it has already seen.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from learners.actr import discounted_reward
from schemas import SessionEvent
from streams.context import WorkerContext
from streams.expiry import dead_letter_parked
from streams.outbox import Outbox, table_rows
from streams.scoring import apply_feedback, position
from streams.topics import SESSION_JOINS_INTERNAL, SESSIONS_INTERNAL

log = logging.getLogger(__name__)


def session_key(caller: str | None, session_id: str) -> str:
    """The table and internal-topic key of a session: its caller (or `-`) and id.

    >>> session_key(None, "s1"), session_key("a" * 32, "s1")[:3]
    ('-|s1', 'aaa')
    """
    return f"{caller or '-'}|{session_id}"


def send_step(ctx: WorkerContext, out: Outbox, ev: Any, iid: str, state: dict[str, Any]) -> None:
    """Hand an interaction that is a session step to the session's owner (called by the interactions processor)."""
    rec = {"k": "step", "iid": iid, "step": state.get("st"), "t": state["t"], "o": state["o"], "a": state["a"],
           "ts": state["ts"], "x": bool(state.get("x")), "c": state.get("c"), "sid": state["s"]}  # fmt: skip
    out.add(SESSIONS_INTERNAL, session_key(state.get("c"), state["s"]).encode(), orjson.dumps(rec))


def send_feedback(ctx: WorkerContext, out: Outbox, fb: Any, msg: Any) -> None:
    """Hand session feedback to the session's owner, with its origin and bytes (called by the feedback processor)."""
    raw = msg.value.decode("utf-8", "replace") if isinstance(msg.value, bytes) else str(msg.value)
    rec = {"k": "fb", "id": fb.event_id, "kind": fb.kind, "v": fb.value, "ts": fb.ts.timestamp(), "c": fb.caller,
           "sid": fb.session_id, "p": msg.partition, "o": msg.offset, "raw": raw}  # fmt: skip
    out.add(SESSIONS_INTERNAL, session_key(fb.caller, fb.session_id).encode(), orjson.dumps(rec))
    ctx.count("session_feedback_forwarded")


def process_batch(ctx: WorkerContext, out: Outbox, messages: list[Any]) -> None:
    """Fold steps and session feedback into the session table; join, reward and publish (see the module doc)."""
    table = table_rows(ctx.sessions)
    for msg in messages:
        ctx.isolated(out, msg, _one, ctx, out, msg, table)


def _new(sid: str, caller: str | None) -> dict[str, Any]:
    # steps: iid -> [step, task, operator, adapter, ts, forced]; f: kind -> [value, feedback id, ts]
    return {"sid": sid, "c": caller, "steps": {}, "f": {}, "fid": [], "rw": None, "r": 0, "w": time.time()}


def _one(ctx: WorkerContext, out: Outbox, msg: Any, table: Any) -> None:
    key = msg.key.decode()
    rec = orjson.loads(msg.value)
    old = table.get(key)
    state = _new(rec["sid"], rec.get("c")) if old is None else {
        **old, "steps": dict(old["steps"]), "f": dict(old["f"]), "fid": list(old["fid"])}  # fmt: skip
    if rec["k"] == "step":
        if rec["iid"] in state["steps"]:
            ctx.count("duplicate_session_steps")
            _replay(ctx, out, key, state)
            return
        if len(state["steps"]) >= ctx.cfg.max_session_steps:
            # the step is scored and landed as an interaction; only its session join is refused
            log.warning("session %s has %d steps (TAOFLOW_STREAM_MAX_SESSION_STEPS): step %s not joined", key,
                        len(state["steps"]), rec["iid"])  # fmt: skip
            ctx.count("session_steps_over_limit")
            return
        state["steps"][rec["iid"]] = [rec["step"], rec["t"], rec["o"], rec["a"], rec["ts"], rec["x"]]
        state.pop("pf", None)  # its feedback has a step now: nothing to dead-letter at expiry
        for kind, (value, fid, at) in state["f"].items():
            _join(out, rec["iid"], kind, value, fid, at)
        ctx.count("session_steps")
    elif rec["k"] == "fb":
        if rec["id"] in state["fid"]:
            ctx.count("duplicate_session_feedback")
            _replay(ctx, out, key, state)
            return
        # as parked feedback is kept (`streams.expiry.dead_letter_parked` reads it): dead-lettered as it came
        item = [rec["kind"], rec["v"], rec["ts"], rec["p"], rec["o"], rec["raw"], rec["c"]]
        if len(state["fid"]) >= ctx.cfg.max_feedback_per_interaction:
            dead_letter_parked(ctx, out, item, (
                f"session {rec['sid']!r} already took {ctx.cfg.max_feedback_per_interaction} feedback events "
                "(TAOFLOW_STREAM_MAX_FEEDBACK_PER_INTERACTION)"))  # fmt: skip
            ctx.count("session_feedback_over_limit")
            return
        if not state["steps"]:
            # kept as it came until a step arrives: if none does within the join TTL, it goes to the dead letters
            waiting = [*state.get("pf", ()), item]
            size = sum(len(w[5]) for w in waiting)
            refused = ctx.parking_refusal(f"session {rec['sid']!r}, which has no step yet", len(waiting), size)
            if refused is not None:
                dead_letter_parked(ctx, out, waiting[-1], refused)
                ctx.count("session_feedback_over_parking_limit")
                return
            state["pf"] = waiting
        state["fid"].append(rec["id"])
        state["f"][rec["kind"]] = [rec["v"], rec["id"], rec["ts"]]
        for iid in state["steps"]:
            _join(out, iid, rec["kind"], rec["v"], rec["id"], rec["ts"])
        ctx.count("session_feedback")
    else:
        raise ValueError(f"unknown session record kind {rec['k']!r}")
    _reward(ctx, out, key, state, f"s:{msg.partition}", position(msg.offset))
    state["r"] += 1
    out.add(ctx.topics.sessions.get_topic_name(), state["sid"].encode(), _event(ctx, state, state["r"] - 1))
    out.put_table(ctx.sessions, key, state)  # last (see `WorkerContext.isolated`)


def _first(state: dict[str, Any]) -> list[Any] | None:
    """The step that chose the operator: the lowest step number (then the earliest)."""
    steps = state["steps"].values()
    return min(steps, key=lambda s: (s[0] if s[0] is not None else 1 << 30, s[4]), default=None)


def _composed(ctx: WorkerContext, state: dict[str, Any]) -> Any:
    return ctx.scorer.compose({}, {kind: v[0] for kind, v in state["f"].items()})


def _reward(ctx: WorkerContext, out: Outbox, key: str, state: dict[str, Any], src: str, pos: int) -> None:
    """The session's one utility reward, once both a step and session feedback are known."""
    first = _first(state)
    if state["rw"] is not None or first is None or not state["f"]:
        return
    item = _composed(ctx, state)
    if item.reward is None:
        return
    at = max(v[2] for v in state["f"].values())
    _, task, operator, _, started, forced = first
    state["rw"] = [src, pos, item.reward, at, bool(forced)]
    if forced:
        ctx.count("forced_session_rewards")  # the client chose the operator: its outcome says nothing of the choice
        return
    discounted = discounted_reward(item.reward, at - started, ctx.cfg.discount)
    ctx.send_reward(out, f"{task}/{operator}", discounted, src, pos, f"session:{key}", at)
    ctx.count("session_rewards")


def _replay(ctx: WorkerContext, out: Outbox, key: str, state: dict[str, Any]) -> None:
    """Re-send what this state has sent (a redelivery may come after its outputs were lost): identical records."""
    for iid in state["steps"]:
        for kind, (value, fid, at) in state["f"].items():
            _join(out, iid, kind, value, fid, at)
    rw = state["rw"]
    first = _first(state)
    if rw is not None and first is not None and not rw[4]:
        src, pos, reward, at, _ = rw
        discounted = discounted_reward(reward, at - first[4], ctx.cfg.discount)
        ctx.send_reward(out, f"{first[1]}/{first[2]}", discounted, src, pos, f"session:{key}", at)
    if state["r"]:
        out.add(ctx.topics.sessions.get_topic_name(), state["sid"].encode(), _event(ctx, state, state["r"] - 1))


def _join(out: Outbox, iid: str, kind: str, value: float, fid: str, at: float) -> None:
    """Session feedback for one step, to the owner of the step's join state (keyed by its interaction id)."""
    rec = {"iid": iid, "kind": kind, "v": value, "id": fid, "ts": at}
    out.add(SESSION_JOINS_INTERNAL, iid.encode(), orjson.dumps(rec))


def _event(ctx: WorkerContext, state: dict[str, Any], revision: int) -> bytes:
    first = _first(state)
    stamps = [s[4] for s in state["steps"].values()]
    item = _composed(ctx, state) if state["f"] else None
    rw = state["rw"]
    at = max([*stamps, *(v[2] for v in state["f"].values())])
    ev = SessionEvent(
        session_id=state["sid"], caller=state["c"], revision=revision, ts=_dt(at),
        task_type=first[1] if first else None, operator=first[2] if first else None,
        adapter=first[3] if first else None, steps=len(stamps),
        started=_dt(min(stamps)) if stamps else None, ended=_dt(max(stamps)) if stamps else None,
        reward=item.reward if item is not None else None,
        feedback={kind: v[0] for kind, v in state["f"].items()},
        rewarded=rw is not None and not rw[4],
    )  # fmt: skip
    return ev.to_json_bytes()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def process_joins(ctx: WorkerContext, out: Outbox, messages: list[Any]) -> None:
    """Session feedback joined to one step: the step is re-scored with it (no utility reward: see the module doc)."""
    table = table_rows(ctx.interactions)
    for msg in messages:
        ctx.isolated(out, msg, _join_one, ctx, out, msg, table)


def _join_one(ctx: WorkerContext, out: Outbox, msg: Any, table: Any) -> None:
    rec = orjson.loads(msg.value)
    iid = rec["iid"]
    known = table.get(iid)
    if known is None:
        ctx.count("session_joins_expired")  # its join state expired (TTL): the session outcome still has it
        return
    if rec["id"] in known.get("fid", ()):
        ctx.count("duplicate_session_joins")
        return
    state = {**known, "f": dict(known["f"]), "fid": [*known.get("fid", ()), rec["id"]]}
    apply_feedback(ctx, out, iid, state, rec["kind"], float(rec["v"]), float(rec["ts"]), f"j:{msg.partition}",
                   position(msg.offset))  # fmt: skip
    out.put_table(ctx.interactions, iid, state)
    ctx.count("session_joins")
