"""The learner selects multi-step sessions by task type: every step, or each session's first prompt (issue 15)."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from learners.records import RecordSink
from learners.tao import Round
from streams import store
from tests.learners.conftest import learner_settings


def land_sessions(settings: Any) -> None:
    """Two task types, each with two 3-step sessions (steps landed out of order) and one single call."""
    con = store.connect(settings.core.duckdb_path)
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    rows: list[dict[str, Any]] = []
    for task in ("ticket", "chat"):
        for s in range(2):
            for step in (2, 0, 1):
                rows.append({"prompt": f"{task} s{s} step {step}", "task_type": task, "session_id": f"{task}-{s}",
                             "step": step, "ts": t0 + timedelta(seconds=10 * s + step)})  # fmt: skip
        rows.append({"prompt": f"{task} single", "task_type": task, "session_id": None, "step": None, "ts": t0})
    cols: dict[str, list[Any]] = {c: [] for c in store.COLUMNS["interactions"]}
    for i, r in enumerate(rows):
        values = {"event_id": str(uuid.uuid4()), "ts": r["ts"], "agent_id": "a", "task_type": r["task_type"],
                  "operator": "o", "prompt": r["prompt"], "prompt_is_chat": False,
                  "prompt_hash": hashlib.sha256(r["prompt"].encode()).hexdigest(), "response": "-", "adapter": None,
                  "latency_ms": 1.0, "metadata": json.dumps({}), "kafka_partition": 0, "kafka_offset": i,
                  "caller": None, "forced": False, "session_id": r["session_id"], "step": r["step"],
                  "finish_reason": "stop", "tools": None, "tool_calls": None, "response_format": None}  # fmt: skip
        for c in cols:
            cols[c].append(values[c])
    store.insert(con, "interactions", cols)
    con.close()


def selected(settings: Any) -> set[str]:
    with RecordSink(settings, prefer_kafka=False) as sink:
        return {p.prompt for p in Round(settings, sink).select()}


def test_every_step_by_default_or_first_prompts_per_task_type(tmp_path: Path, warm_model: Path) -> None:
    every = learner_settings(tmp_path / "a", warm_model)
    land_sessions(every)
    assert len(selected(every)) == 14  # 2 task types x (6 steps + 1 single call)

    first_for_tickets = learner_settings(tmp_path / "b", warm_model, session_prompts={"ticket": "first"})
    land_sessions(first_for_tickets)
    got = selected(first_for_tickets)
    assert {p for p in got if p.startswith("ticket")} == {"ticket s0 step 0", "ticket s1 step 0", "ticket single"}
    assert len([p for p in got if p.startswith("chat")]) == 7

    first_but_chat = learner_settings(tmp_path / "c", warm_model, session_prompts={"default": "first", "chat": "steps"})
    land_sessions(first_but_chat)
    got = selected(first_but_chat)
    assert {p for p in got if p.startswith("ticket")} == {"ticket s0 step 0", "ticket s1 step 0", "ticket single"}
    assert len([p for p in got if p.startswith("chat")]) == 7
