"""What landing does to a batch of records, shared by the DuckDB lander and the Parquet lander: the row mapping (the
outcome topics to the outcome tables' columns) and the landing consumers' configuration."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import orjson

from schemas import AdapterEvent, DeadLetter, InteractionEvent, ScoreEvent, SessionEvent, UtilityEvent
from schemas import topics as names
from schemas.exceptions import EventValidationError
from schemas.fast import FastInteraction, fast_score, fast_utility, parse_feedback, parse_interaction
from streams import store
from taoflow.settings import Settings


def _interaction_row(
    rows: list[tuple[Any, ...]], ev: FastInteraction | InteractionEvent, partition: int, offset: int
) -> None:
    if isinstance(ev.prompt, str):
        prompt, chat = ev.prompt, False
    else:
        prompt, chat = orjson.dumps([m.model_dump(exclude_none=True) for m in ev.prompt]).decode(), True
    values = (
        ev.event_id, ev.ts, ev.agent_id, ev.task_type, ev.operator, prompt, chat,
        hashlib.sha256(prompt.encode()).hexdigest(), ev.response, ev.adapter, ev.latency_ms,
        orjson.dumps(ev.metadata).decode(), partition, offset, ev.caller, ev.forced, ev.session_id, ev.step,
        ev.finish_reason, _json(ev.tools), _json(ev.tool_calls), _json(ev.response_format),
    )  # fmt: skip
    _append(rows, "interactions", values)


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _append(rows: list[tuple[Any, ...]], table: str, values: tuple[Any, ...]) -> None:
    if len(values) != len(store.COLUMNS[table]):
        raise ValueError(f"{table}: {len(values)} values for {len(store.COLUMNS[table])} columns")
    rows.append(values)


def to_rows(records: list[Any], limits: Any) -> dict[str, dict[str, list[Any]]]:
    """Column-oriented rows per table from a batch of Kafka records (invalid input is skipped here:
    the worker already dead-lettered it)."""
    out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)  # rows as tuples, turned into columns at the end
    for rec in records:
        try:
            if rec.topic == names.INTERACTIONS:
                _interaction_row(out["interactions"], parse_interaction(rec.value, limits), rec.partition, rec.offset)
            elif rec.topic == names.FEEDBACK:
                f = parse_feedback(rec.value, limits)
                _append(
                    out["feedback"],
                    "feedback",
                    (f.event_id, f.interaction_id, f.ts, f.kind, f.value, orjson.dumps(f.metadata).decode(), f.caller,
                     f.session_id),
                )  # fmt: skip
            elif rec.topic == names.SESSIONS:
                x = SessionEvent.model_validate_json(rec.value)
                _append(
                    out["sessions"],
                    "sessions",
                    (f"{x.caller or '-'}|{x.session_id}", x.session_id, x.caller, x.revision, x.ts, x.task_type,
                     x.operator, x.adapter, x.steps, x.started, x.ended, x.reward, _json(x.feedback), x.rewarded),
                )  # fmt: skip
            elif rec.topic == names.SCORES:
                s = fast_score(rec.value, limits) or dict(ScoreEvent.model_validate_json(rec.value))
                _append(
                    out["scores"],
                    "scores",
                    (s["interaction_id"], s["revision"], s["ts"], s["task_type"], s["operator"], s["adapter"],
                     s["reward"], orjson.dumps(s["parts"]).decode()),
                )  # fmt: skip
            elif rec.topic == names.UTILITIES:
                u = fast_utility(rec.value, limits) or dict(UtilityEvent.model_validate_json(rec.value))
                tt, op, n, util, last = u["task_type"], u["operator"], u["n"], u["utility"], u["last_reward"]
                _append(out["utility_history"], "utility_history", (tt, op, n, util, last, u["ts"]))
                _append(out["utilities"], "utilities", (tt, op, util, n, last, u["ts"], u["imported"]))
            elif rec.topic == names.DEAD_LETTERS:
                d = DeadLetter.model_validate_json(rec.value)
                _append(
                    out["dead_letters"],
                    "dead_letters",
                    (d.source_topic, d.partition, d.offset, d.error, d.original, d.ts),
                )
            elif rec.topic == names.ADAPTERS:
                a = AdapterEvent.model_validate_json(rec.value)
                _append(out["adapters"], "adapters", store.record_values("adapters", a.model_dump()))
            elif rec.topic == names.LEARNER_RECORDS:
                doc = orjson.loads(rec.value)
                table = doc["table"]
                if table in ("tao_rounds", "tao_candidates"):
                    _append(out[table], table, store.record_values(table, doc["row"]))
        except (EventValidationError, ValueError, KeyError, TypeError):
            continue  # fmt: skip
    return {table: dict(zip(store.COLUMNS[table], map(list, zip(*rows, strict=True)), strict=True))
            for table, rows in out.items()}  # fmt: skip


def landing_consumer_config(settings: Settings, group: str) -> dict[str, Any]:
    """aiokafka consumer settings for a landing group `<app_id>-<group>`: manual commits (after landing), from
    the earliest offset, in fetches as large as a landing batch."""
    return {
        "bootstrap_servers": settings.bootstrap,
        "group_id": f"{settings.stream.app_id}-{group}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.stream.land_batch_size,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        **settings.kafka.security_kwargs(),
    }
