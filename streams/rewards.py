"""Batches of the internal rewards topic: ACT-R utility per task_type/operator, exactly once per reward."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson

from learners.actr import update_utility, utility_after
from schemas.fast import utility_json
from streams.context import WorkerContext
from streams.outbox import Outbox, table_rows

log = logging.getLogger(__name__)


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
    src, pos = str(r["src"]), int(r["pos"])
    state = touched.get(key) or table.get(key) or {"u": ctx.cfg.initial_utility, "n": 0, "last": None, "src": {}}
    if pos <= state["src"].get(src, -1):
        ctx.count("duplicate_rewards")
        return
    if r.get("seed"):
        _seed(ctx, out, key, r, state, touched)
        return
    reward = float(r["r"])
    u = update_utility(state["u"], reward, ctx.cfg.alpha)
    task_type, _, operator = key.partition("/")
    imported = state.get("imp", 0)  # absent from states written before imports existed
    value = utility_json(task_type, operator, u, state["n"] + 1, reward, r["ts"], imported)
    out.add(ctx.topics.utilities.get_topic_name(), key.encode(), value)
    touched[key] = {**state, "u": u, "n": state["n"] + 1, "last": reward, "src": {**state["src"], src: pos}}
    ctx.count("utility_updates")


def _seed(
    ctx: WorkerContext, out: Outbox, key: str, r: dict[str, Any], state: dict[str, Any],
    touched: dict[str, dict[str, Any]],
) -> None:  # fmt: skip
    """Imported knowledge (`taoflow knowledge import`): `n` pseudo-rewards of value `r`, folded in by the usual rule,
    so fresh rewards outweigh them as they would older rewards, and counted apart as `imp`.

    Only an operator that has learned nothing here yet is seeded: this deployment's own rewards are better evidence
    for it than another model's, so an import never overrides them."""
    value, k = float(r["r"]), r["n"]
    if not math.isfinite(value) or type(k) is not int or k < 1:
        raise ValueError(f"seed record needs a finite r and an integer n >= 1, got r={r['r']!r}, n={k!r}")
    done = {**state["src"], str(r["src"]): int(r["pos"])}
    imported = state.get("imp", 0)
    if state["n"] > imported:
        log.info("%s has %d rewards learned here: import %s not applied to it", key, state["n"] - imported, r["src"])
        touched[key] = {**state, "src": done}
        ctx.count("seeds_skipped")
        return
    u = utility_after(state["u"], value, ctx.cfg.alpha, k)
    n, imported = state["n"] + k, imported + k
    task_type, _, operator = key.partition("/")
    # no last_reward: a seed is no reward, so the gateway's release tests never count it
    event = utility_json(task_type, operator, u, n, None, r["ts"], imported)
    out.add(ctx.topics.utilities.get_topic_name(), key.encode(), event)
    touched[key] = {**state, "u": u, "n": n, "imp": imported, "src": done}
    ctx.count("utility_seeds")
