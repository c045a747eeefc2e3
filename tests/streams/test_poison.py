"""No poison pills: one record never crashes or crash-loops the worker. Each hostile kind goes to the dead letters
with its reason, the rest of its batch is processed, and the worker's tables stay as they were for it (broker-free:
the real processors on `tests.streams.memory.Worker`)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas import topics as names
from streams import interactions as interactions_module
from streams.topics import REWARDS_INTERNAL
from tests.streams.memory import Worker

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path, max_record_bytes=200_000, max_parked_feedback=8, max_parked_bytes=100_000)
    yield w
    w.con.close()


def interaction(eid: str, ts: str | None = None, response: str = "r", **extra: Any) -> dict[str, Any]:
    return {"event_id": eid, "ts": ts or NOW.isoformat(), "agent_id": "a", "task_type": "qa", "operator": "o",
            "prompt": "p", "response": response, "metadata": {"r": 0.5}, **extra}  # fmt: skip


def feedback(eid: str, iid: str, ts: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"event_id": eid, "interaction_id": iid, "ts": ts or NOW.isoformat(), "kind": "thumbs", "value": 1.0,
            **extra}  # fmt: skip


def dead(worker: Worker) -> list[str]:
    return [e for (e,) in worker.sql("SELECT error FROM dead_letters ORDER BY source_topic, kafka_offset")]


@pytest.mark.parametrize("ts", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "2999-01-01T00:00:00Z",
                                "1970-01-01T00:00:00Z"])  # fmt: skip
def test_timestamps_outside_the_window_are_dead_lettered_and_the_batch_goes_on(worker: Worker, ts: str) -> None:
    worker.send_batch(names.INTERACTIONS, [interaction("bad", ts=ts), interaction("good")])
    worker.send_batch(names.FEEDBACK, [feedback("f-bad", "good", ts=ts), feedback("f-good", "good")])
    errors = dead(worker)
    assert len(errors) == 2 and all("field 'ts'" in e for e in errors), errors
    assert worker.sql("SELECT interaction_id, revision FROM scores ORDER BY 2") == [("good", 0), ("good", 1)]


def test_an_exception_while_processing_one_record_dead_letters_it_and_leaves_no_trace(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = interactions_module.score

    def score(ctx: Any, out: Any, iid: str, *args: Any, **kwargs: Any) -> bool:
        ok = real(ctx, out, iid, *args, **kwargs)  # its outputs are queued, then it fails
        if iid == "boom":
            raise RuntimeError("a bug that only this record meets")
        return ok

    monkeypatch.setattr(interactions_module, "score", score)
    worker.send(names.FEEDBACK, feedback("f-boom", "boom"))  # parked for it
    worker.send_batch(names.INTERACTIONS, [interaction("a"), interaction("boom"), interaction("b")])
    [error] = dead(worker)
    assert error == "processing failed: RuntimeError: a bug that only this record meets"
    assert worker.sql("SELECT interaction_id FROM scores ORDER BY 1") == [("a",), ("b",)]  # its score was dropped
    assert "boom" not in worker.ctx.interactions.data  # no join state written for it
    assert "boom" in worker.ctx.pending_feedback.data  # its parked feedback still waits (for a redelivery)
    assert worker.sql("SELECT n FROM utilities") == [(2,)]


def test_a_malformed_internal_reward_is_dead_lettered_and_the_others_fold_in(worker: Worker) -> None:
    good = orjson.dumps({"r": 1.0, "src": "i:0", "pos": 5, "iid": "x", "ts": NOW.timestamp()})
    records = [worker.produce(REWARDS_INTERNAL, b"qa/o", raw) for raw in (b"{not json", good)]
    out = worker.ctx.outbox()
    worker.processors[REWARDS_INTERNAL](worker.ctx, out, records)
    assert len(out.msgs[names.DEAD_LETTERS]) == 1 and len(out.msgs[names.UTILITIES]) == 1
    assert worker.ctx.utilities.data["qa/o"]["n"] == 1


def test_parked_feedback_is_capped_per_interaction_in_count_and_bytes(worker: Worker) -> None:
    big = {"note": "x" * 30_000}
    worker.send_batch(names.FEEDBACK, [feedback(f"f{i}", "ghost", metadata=big) for i in range(6)])
    errors = dead(worker)
    # 100,000 bytes of parked feedback per id: three fit, the other three are refused with the reason
    assert len(errors) == 3 and all("too much feedback waiting for interaction 'ghost'" in e for e in errors)
    parked = worker.ctx.pending_feedback.data["ghost"]
    assert len(parked["items"]) == 3
    worker.send_batch(names.FEEDBACK, [feedback(f"s{i}", "ghost2") for i in range(10)])
    assert len(worker.ctx.pending_feedback.data["ghost2"]["items"]) == 8  # and 8 events at most
    # no changelog record the worker wrote comes near the record size limit
    changelogs = [msgs for o in worker.outboxes for msgs in o.table_msgs.values()]
    sizes = [len(k or b"") + len(v or b"") for msgs in changelogs for k, v, _ in msgs]
    assert max(sizes) < 200_000


def test_session_feedback_waiting_for_a_first_step_is_capped_in_count_and_bytes(worker: Worker) -> None:
    big = {"note": "x" * 30_000}
    docs = [{"event_id": f"sf{i}", "session_id": "ghost", "ts": NOW.isoformat(), "kind": "thumbs", "value": 1.0,
             "metadata": big} for i in range(6)]  # fmt: skip
    worker.send_batch(names.FEEDBACK, docs)  # type: ignore[arg-type]
    errors = dead(worker)
    assert len(errors) == 3 and all("too much feedback waiting for session 'ghost'" in e for e in errors), errors
    assert all("bytes" in e for e in errors)
    [state] = worker.ctx.sessions.data.values()
    assert len(state["pf"]) == 3
    changelogs = [msgs for o in worker.outboxes for msgs in o.table_msgs.values()]
    assert max(len(k or b"") + len(v or b"") for msgs in changelogs for k, v, _ in msgs) < 200_000


def test_outputs_over_the_record_size_limit_are_dead_lettered_never_sent(worker: Worker) -> None:
    # an event over the size limit is dead-lettered with its bytes: a dead letter that would not fit is cut, and says so
    huge = orjson.dumps(interaction("huge", response="y" * 400_000))
    worker.send_batch(names.INTERACTIONS, [huge, orjson.dumps(interaction("ok"))])
    [error] = dead(worker)
    assert "over the limit" in error and "original truncated" in error
    for out in worker.outboxes:
        for msgs in (*out.msgs.values(), *out.table_msgs.values()):
            assert all(len(k or b"") + len(v or b"") <= 200_000 for k, v, _ in msgs)
    assert worker.sql("SELECT interaction_id FROM scores") == [("ok",)]


def test_a_state_that_would_not_fit_a_record_is_refused_before_the_table_changes(tmp_path: Path) -> None:
    w = Worker(tmp_path, max_record_bytes=65_536)
    parts = {f"part-{i:05d}": 0.5 for i in range(6000)}  # a scorer answering with very many parts
    w.ctx.scorer.rule_parts = lambda responses, **kw: [parts for _ in responses]  # type: ignore[method-assign]
    w.send_batch(names.INTERACTIONS, [interaction("wide"), interaction("narrow")])
    errors = dead(w)
    assert len(errors) >= 1 and all("record size limit" in e for e in errors), errors
    assert "wide" not in w.ctx.interactions.data
    w.con.close()


def test_duplicate_event_ids_with_different_content_keep_the_first_everywhere(worker: Worker) -> None:
    first, second = interaction("dup", response="first", metadata={"r": 0.9}), interaction("dup", response="second")
    worker.send_batch(names.INTERACTIONS, [first, second])  # in one batch
    worker.send_batch(names.INTERACTIONS, [interaction("dup", response="third")])  # and in a later one
    assert worker.sql("SELECT response FROM interactions") == [("first",)]
    assert worker.sql("SELECT reward FROM scores WHERE interaction_id = 'dup'") == [(0.9,)]
    assert worker.ctx.counters["duplicate_interactions"] == 2
