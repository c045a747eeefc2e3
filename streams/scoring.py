"""Turning an interaction's join state into a ScoreEvent and a reward for its operator's utility."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from learners.actr import discounted_reward
from schemas import ScoreEvent
from streams.app import WorkerContext
from streams.outbox import Outbox


def new_state(
    task_type: str, operator: str, adapter: str | None, ts: float, parts: dict[str, float], src: str, offset: int
) -> dict[str, Any]:
    """The join state kept per interaction id; `at` is the message that created it (its replay re-emits), `w`
    the wall-clock time it was created (join-state expiry counts from there, so backfilled history is kept)."""
    return {"t": task_type, "o": operator, "a": adapter, "ts": ts, "p": parts, "f": {}, "r": 0, "at": [src, offset],
            "w": time.time()}  # fmt: skip


def replay_first_score(ctx: WorkerContext, out: Outbox, iid: str, state: dict[str, Any]) -> None:
    """Re-emit the revision-0 score and reward exactly as first sent (downstream drops them if they arrived)."""
    src, offset = state["at"]
    first = {**state, "f": {}, "r": 0}
    score(ctx, out, iid, first, state["ts"], src, position(offset))


def score(ctx: WorkerContext, out: Outbox, iid: str, state: dict[str, Any], at: float, src: str, pos: int) -> bool:
    """Compose the reward from rule parts and feedback so far; publish it (revision state["r"]) and hand
    the time-discounted reward to the utility agent. Returns False when no part applies yet."""
    item = ctx.scorer.compose(state["p"], state["f"])
    if item.reward is None:
        return False
    event = ScoreEvent(
        interaction_id=iid,
        ts=datetime.fromtimestamp(at, UTC),
        task_type=state["t"],
        operator=state["o"],
        adapter=state["a"],
        reward=item.reward,
        parts=item.parts,
        revision=state["r"],
    )
    out.add(ctx.topics.scores.get_topic_name(), iid.encode(), event.to_json_bytes())
    state["r"] += 1
    reward = discounted_reward(item.reward, at - state["ts"], ctx.cfg.discount)
    ctx.send_reward(out, f"{state['t']}/{state['o']}", reward, src, pos, iid, at)
    ctx.count("scores")
    return True


def position(offset: int, sub: int = 0) -> int:
    """A total order over the rewards one source message produces (a message may release parked feedback).

    >>> position(7, 2) > position(7, 1) > position(6, 999)
    True
    """
    return offset * 1000 + sub
