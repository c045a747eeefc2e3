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
    alpha, u0 = ctx.cfg.alpha, ctx.cfg.initial_utility
    touched: dict[str, dict[str, Any]] = {}
    for msg in messages:
        key = msg.key.decode()
        r = orjson.loads(msg.value)
        state = touched.get(key) or table.get(key) or {"u": u0, "n": 0, "last": None, "src": {}}
        if r["pos"] <= state["src"].get(r["src"], -1):
            ctx.count("duplicate_rewards")
            continue
        state["u"] = update_utility(state["u"], r["r"], alpha)
        state["n"] += 1
        state["last"] = r["r"]
        state["src"][r["src"]] = r["pos"]
        task_type, _, operator = key.partition("/")
        value = utility_json(task_type, operator, state["u"], state["n"], r["r"], r["ts"])
        out.add(ctx.topics.utilities.get_topic_name(), key.encode(), value)
        touched[key] = state
        ctx.count("utility_updates")
    for key, state in touched.items():
        out.put_table(ctx.utilities, key, state)  # one changelog record per key per batch
