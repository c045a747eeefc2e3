"""Turning an interaction's join state into a ScoreEvent and a reward for its operator's utility.

Who may score what, and how often it counts (the worker's join rules):

- Feedback stamped with a `caller` (the gateway's hash of the API key it came with) is joined only to an
  interaction captured with the same caller; for another caller's interaction, or one from a trusted producer
  (caller None), it is refused and dead-lettered. Feedback without a caller (a trusted producer) joins any.
- Last write wins per (interaction, feedback kind): the score is recomputed from the latest value of each kind
  and published as a new revision (the `final_scores` view shows the latest), but the operator's utility takes
  a reward only when an interaction is first scored and when a feedback kind it had no value for arrives. An
  ACT-R utility is an exponential average that cannot take a reward back, so a repeated kind cannot replace
  the reward already folded in; it must not add another one either, or one caller repeating one thumbs-up
  would move the utility as many times as it likes. The first value of a kind is the one the utility keeps.
- A `forced` interaction (the client chose its operator or adapter) is scored and landed, but neither it nor
  its feedback rewards the utility: the router did not choose it, so its outcome says nothing of the choice.
- A step of a multi-step session is scored and landed, but its operator's utility is rewarded by the session's
  outcome, once per session (`streams.sessions`), not by each step.
"""

from __future__ import annotations

import time
from typing import Any

from learners.actr import discounted_reward
from schemas.fast import score_json
from streams.context import WorkerContext
from streams.outbox import Outbox


def new_state(
    task_type: str, operator: str, adapter: str | None, ts: float, parts: dict[str, float], src: str, offset: int,
    caller: str | None = None, forced: bool = False, session: str | None = None, step: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The join state kept per interaction id; `at` is the message that created it (its replay re-emits), `w`
    the wall-clock time it was created (join-state expiry counts from there, so backfilled history is kept),
    `c` the caller that captured it, `x` whether its operator was forced (see the module docstring), and `s`/`st`
    its session and step when it is one step of a multi-step session (`streams.sessions`)."""
    state = {"t": task_type, "o": operator, "a": adapter, "ts": ts, "p": parts, "f": {}, "r": 0, "at": [src, offset],
             "w": time.time(), "c": caller, "x": forced}  # fmt: skip
    if session is not None:
        state["s"], state["st"] = session, step
    return state


def refusal(iid: str, feedback_caller: str | None, state: dict[str, Any]) -> str | None:
    """Why feedback from `feedback_caller` may not score this interaction, or None when it may.

    >>> refusal("i", None, {"c": "a" * 32}) is None, refusal("i", "a" * 32, {"c": "a" * 32}) is None
    (True, True)
    >>> refusal("i", "b" * 32, {"c": "a" * 32})[:40]
    'feedback from another caller: refused (t'
    """
    if feedback_caller is None or feedback_caller == state.get("c"):  # state from before callers: `c` absent
        return None
    return (
        f"feedback from another caller: refused (the API key that sent it did not capture interaction {iid!r}; "
        "send feedback with the key that made the request, or from a trusted producer)"
    )


def apply_feedback(
    ctx: WorkerContext, out: Outbox, iid: str, state: dict[str, Any], kind: str, value: float, at: float, src: str,
    pos: int,
) -> bool:  # fmt: skip
    """Set the latest value of `kind` and publish the re-score; the utility gets a reward only for a new kind."""
    new_kind = kind not in state["f"]
    state["f"][kind] = value
    return score(ctx, out, iid, state, at, src, pos, reward=new_kind)


def replay_first_score(ctx: WorkerContext, out: Outbox, iid: str, state: dict[str, Any]) -> None:
    """Re-emit the revision-0 score and reward exactly as first sent (downstream drops them if they arrived)."""
    src, offset = state["at"]
    first = {**state, "f": {}, "r": 0}
    score(ctx, out, iid, first, state["ts"], src, position(offset))


def score(
    ctx: WorkerContext, out: Outbox, iid: str, state: dict[str, Any], at: float, src: str, pos: int,
    reward: bool = True,
) -> bool:  # fmt: skip
    """Compose the reward from rule parts and feedback so far; publish it (revision state["r"]) and, with
    `reward` and unless the interaction was forced, hand the time-discounted reward to the utility agent.
    Returns False when no part applies yet."""
    item = ctx.scorer.compose(state["p"], state["f"])
    if item.reward is None:
        return False
    if not 0.0 <= item.reward <= 1.0:  # NaN too; the composite clamps, so this is a bug, not bad input
        raise ValueError(f"reward {item.reward!r} for {iid} is not in [0, 1]")
    value = score_json(iid, at, state["t"], state["o"], state["a"], item.reward, item.parts, state["r"])
    out.add(ctx.topics.scores.get_topic_name(), iid.encode(), value)
    state["r"] += 1
    ctx.count("scores")
    if not reward:
        ctx.count("repeated_feedback_kinds")
    elif state.get("x"):
        ctx.count("forced_scores")
    elif state.get("s"):
        ctx.count("session_step_scores")  # the session's outcome rewards its operator, once (`streams.sessions`)
    else:
        discounted = discounted_reward(item.reward, at - state["ts"], ctx.cfg.discount)
        ctx.send_reward(out, f"{state['t']}/{state['o']}", discounted, src, pos, iid, at)
    return True


def position(offset: int, sub: int = 0) -> int:
    """A total order over the rewards one source message produces (a message may release parked feedback).

    >>> position(7, 2) > position(7, 1) > position(6, 999)
    True
    """
    return offset * 1000 + sub
