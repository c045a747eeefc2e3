"""Settling what a dead learner left behind, and announcing a committed adapter (which publishing and recovery
share: announcing is idempotent by key, so a round that committed before a crash is announced again, never twice
in effect)."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime

from learners.records import RecordSink
from learners.state import RoundState, learner_dir, load_rounds, now_iso, staging_dir, write_json_atomic
from schemas import AdapterEvent
from taoflow.settings import Settings

log = logging.getLogger(__name__)

TERMINAL = frozenset({"published", "gated_out", "skipped", "failed"})  # a round in one of these is settled


def recover(settings: Settings, sink: RecordSink) -> list[str]:
    """Settle rounds a dead process left `running` (call with the round lock held). Returns their ids."""
    settled = []
    for doc in load_rounds(settings):
        if doc.get("status") in TERMINAL:
            continue
        state = RoundState(settings, sink, doc)
        name = doc.get("adapter_name")
        if doc.get("committed") and name:
            announce(settings, sink, state)  # committed before the crash: finish recording it (idempotent)
            log.warning("round %s had committed adapter %s; its records are completed now", doc["round_id"], name)
        else:
            if name:
                for leftover in (staging_dir(settings, name), settings.core.adapters_dir / name):
                    shutil.rmtree(leftover, ignore_errors=True)
            stage = doc.get("stage") or "start"
            state.save(
                status="failed",
                finished_at=now_iso(),
                adapter=None,
                error=f"interrupted during {stage}: the process died before the round finished",
            )
            log.warning("round %s was interrupted during %s; marked failed", doc["round_id"], stage)
        shutil.rmtree(learner_dir(settings) / "rounds" / doc["round_id"], ignore_errors=True)
        settled.append(doc["round_id"])
    return settled


def announce(settings: Settings, sink: RecordSink, state: RoundState) -> None:
    """The AdapterEvent, the `adapters` row and the round's final row (all idempotent by key)."""
    d = state.doc
    name = d["adapter_name"]
    write_json_atomic(learner_dir(settings) / "current.json", {"adapter": name, "round_id": d["round_id"]})
    metrics = {k: float(v) for k, v in d.get("metrics", {}).items() if isinstance(v, int | float)}
    event = AdapterEvent(
        adapter=name,
        action="published",
        ts=datetime.fromisoformat(d["committed_at"]),
        base_model=d["base_model"],
        path=str(settings.core.adapters_dir / name),
        round_id=d["round_id"],
        sha256=d["sha256"],
        metrics=metrics,
    )
    sink.adapter_event(event)
    state.save(status="published", adapter=name, finished_at=d.get("finished_at") or now_iso())
