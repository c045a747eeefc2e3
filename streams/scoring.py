"""Turning an interaction's join state into a ScoreEvent and a reward for its operator's utility."""

from __future__ import annotations

import time
from typing import Any

from learners.actr import discounted_reward
from schemas.fast import score_json
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
    if not 0.0 <= item.reward <= 1.0:  # NaN too; the composite clamps, so this is a bug, not bad input
        raise ValueError(f"reward {item.reward!r} for {iid} is not in [0, 1]")
    value = score_json(iid, at, state["t"], state["o"], state["a"], item.reward, item.parts, state["r"])
    out.add(ctx.topics.scores.get_topic_name(), iid.encode(), value)
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
