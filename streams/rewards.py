"""Batches of the internal rewards topic: ACT-R utility per task_type/operator, exactly once per reward."""

from __future__ import annotations

from typing import Any

import orjson

from learners.actr import update_utility
from schemas.fast import utility_json
from streams.app import WorkerContext
from streams.outbox import Outbox, table_rows


def process_batch(ctx: WorkerContext, out: Outbox, messages: list[Any]) -> None:
    """Fold each reward into its operator's utility and publish the new value.

    A redelivered reward (after a crash or rebalance upstream) carries a source position not above
    the highest already folded in for that source partition, so it is skipped: each reward counts once.
    The table value holds those positions, so the check and the update are one changelog write.
    """
    table = table_rows(ctx.utilities)
    touched: dict[str, dict[str, Any]] = {}
    for msg in messages:
        ctx.isolated(out, msg, _one, ctx, out, msg, table, touched)
    for key, state in touched.items():
        out.put_table(ctx.utilities, key, state)  # one changelog record per key per batch


def _one(ctx: WorkerContext, out: Outbox, msg: Any, table: Any, touched: dict[str, dict[str, Any]]) -> None:
    """Fold one reward; everything is computed before the state changes (see `WorkerContext.isolated`)."""
    key = msg.key.decode()
    r = orjson.loads(msg.value)
    reward, src, pos = float(r["r"]), str(r["src"]), int(r["pos"])
    state = touched.get(key) or table.get(key) or {"u": ctx.cfg.initial_utility, "n": 0, "last": None, "src": {}}
    if pos <= state["src"].get(src, -1):
        ctx.count("duplicate_rewards")
        return
    u = update_utility(state["u"], reward, ctx.cfg.alpha)
    task_type, _, operator = key.partition("/")
    value = utility_json(task_type, operator, u, state["n"] + 1, reward, r["ts"])
    out.add(ctx.topics.utilities.get_topic_name(), key.encode(), value)
    touched[key] = {**state, "u": u, "n": state["n"] + 1, "last": reward, "src": {**state["src"], src: pos}}
    ctx.count("utility_updates")
