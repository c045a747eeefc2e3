"""Tenants in the stream worker (security issue 13): an API key steers learning only through its own interactions.

Most tests run the worker's real processors (`streams.interactions`, `streams.feedback`, `streams.rewards`) on a real
`WorkerContext` whose faust tables are plain dicts, hand their outputs to the next processor as Kafka would, and land
every record with the lander's real row mapping in a real DuckDB file. One test runs the real worker on the embedded
broker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas import topics as names
from streams import landing, store
from streams.topics import REWARDS_INTERNAL
from taoflow.settings import Settings
from tests.streams.memory import Record, Worker

ALICE, MALLORY = "a" * 32, "b" * 32  # caller hashes, as the gateway stamps them
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)  # events must be recent (EventTime)
REFUSED = "feedback from another caller: refused"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path)
    yield w
    w.con.close()


def interaction(eid: str, operator: str = "o", caller: str | None = ALICE, **extra: Any) -> dict[str, Any]:
    doc = {"event_id": eid, "ts": T0.isoformat(), "agent_id": "agent", "task_type": "qa", "operator": operator,
           "prompt": "p", "response": "r", "metadata": {}, "caller": caller, **extra}  # fmt: skip
    return doc


def fb(eid: str, iid: str, value: float, caller: str | None, kind: str = "thumbs", second: int = 1) -> dict[str, Any]:
    return {"event_id": eid, "interaction_id": iid, "ts": (T0 + timedelta(seconds=second)).isoformat(), "kind": kind,
            "value": value, "caller": caller}  # fmt: skip


def refusals(worker: Worker) -> list[tuple[str, bytes]]:
    return [(e, bytes(o)) for e, o in worker.sql("SELECT error, original FROM dead_letters") if REFUSED in e]


def test_feedback_from_another_caller_is_dead_lettered_and_scores_nothing(worker: Worker) -> None:
    worker.send(names.INTERACTIONS, interaction("i1", metadata={"r": 0.9}))
    bad = fb("f-mallory", "i1", 0.0, MALLORY)
    worker.send(names.FEEDBACK, bad)
    [(error, original)] = refusals(worker)
    assert "'i1'" in error and orjson.loads(original) == bad  # the reason, and the bytes as they came
    assert worker.sql("SELECT revision, reward FROM scores WHERE interaction_id = 'i1'") == [(0, 0.9)]
    assert len(worker.reward_records("i1")) == 1  # the interaction's own score only
    assert worker.sql("SELECT n FROM utilities WHERE operator = 'o'") == [(1,)]


def test_feedback_parked_before_its_interaction_is_checked_when_it_arrives(worker: Worker) -> None:
    worker.send(names.FEEDBACK, fb("f-mallory", "i2", 0.0, MALLORY))  # first: parked, no owner known yet
    worker.send(names.FEEDBACK, fb("f-alice", "i2", 1.0, ALICE, kind="rating"))
    assert refusals(worker) == [] and worker.sql("SELECT count(*) FROM scores") == [(0,)]
    worker.send(names.INTERACTIONS, interaction("i2"))
    [(error, original)] = refusals(worker)
    assert "'i2'" in error and orjson.loads(original)["event_id"] == "f-mallory"
    [(parts,)] = worker.sql("SELECT parts FROM final_scores")
    assert json.loads(parts) == {"feedback.rating": 1.0}  # Mallory's thumbs is not in the score
    assert [r["r"] for r in worker.reward_records("i2")] == [1.0]  # Alice's rating counted, Mallory's thumbs not
    assert worker.ctx.pending_feedback.data == {}


def test_same_caller_and_trusted_feedback_are_accepted(worker: Worker) -> None:
    worker.send(names.INTERACTIONS, interaction("mine", operator="a"))
    worker.send(names.INTERACTIONS, interaction("sdk", operator="b", caller=None))  # a trusted producer's
    worker.send(names.FEEDBACK, fb("f1", "mine", 1.0, ALICE))
    worker.send(names.FEEDBACK, fb("f2", "mine", 0.5, None, kind="rating"))  # trusted: joins any interaction
    worker.send(names.FEEDBACK, fb("f3", "sdk", 1.0, None))
    worker.send(names.FEEDBACK, fb("f4", "sdk", 0.0, ALICE, kind="rating"))  # a key's feedback on the SDK's: no
    assert len(refusals(worker)) == 1
    assert worker.sql("SELECT interaction_id, reward FROM final_scores ORDER BY 1") == [("mine", 0.75), ("sdk", 1.0)]
    assert worker.sql("SELECT operator, n FROM utilities ORDER BY 1") == [("a", 2), ("b", 1)]
    assert worker.sql("SELECT event_id, caller FROM feedback ORDER BY 1") == [
        ("f1", ALICE), ("f2", None), ("f3", None), ("f4", ALICE)]  # fmt: skip


def test_repeated_feedback_of_one_kind_rewards_once_and_the_score_shows_the_latest(worker: Worker) -> None:
    worker.send(names.INTERACTIONS, interaction("i3"))  # no rule part applies: feedback alone scores it
    values = [1.0] * 24 + [0.25]
    for n, value in enumerate(values):
        worker.send(names.FEEDBACK, fb(f"thumb-{n}", "i3", value, ALICE, second=n + 1))
    assert len(worker.reward_records("i3")) == 1
    assert worker.sql("SELECT n, last_reward FROM utilities WHERE operator = 'o'") == [(1, 1.0)]
    assert worker.sql("SELECT count(*) FROM utility_history") == [(1,)]
    assert worker.sql("SELECT count(*), max(revision) FROM scores WHERE interaction_id = 'i3'") == [(25, 24)]
    assert worker.sql("SELECT reward FROM final_scores WHERE interaction_id = 'i3'") == [(0.25,)]
    assert worker.sql("SELECT n FROM improvement") == [(1,)]  # the interaction counts once, at its latest revision
    # the same kinds parked before the interaction came: one reward too
    for n, value in enumerate([0.0, 0.5, 0.25, 0.75, 0.375]):
        worker.send(names.FEEDBACK, fb(f"early-{n}", "i4", value, ALICE))
    worker.send(names.INTERACTIONS, interaction("i4", operator="p"))
    assert len(worker.reward_records("i4")) == 1
    assert worker.sql("SELECT reward FROM final_scores WHERE interaction_id = 'i4'") == [(0.375,)]
    # a new kind is new evidence: one more reward
    worker.send(names.FEEDBACK, fb("rating", "i4", 1.0, ALICE, kind="rating"))
    assert worker.sql("SELECT n FROM utilities WHERE operator = 'p'") == [(2,)]


def test_forced_interactions_are_landed_and_scored_but_never_reach_the_utilities(worker: Worker) -> None:
    worker.send(names.INTERACTIONS, interaction("forced", metadata={"r": 1.0}, forced=True))
    worker.send(names.FEEDBACK, fb("f1", "forced", 1.0, ALICE))
    worker.send(names.FEEDBACK, fb("f0", "parked-forced", 1.0, ALICE))
    worker.send(names.INTERACTIONS, interaction("parked-forced", forced=True))
    assert worker.sql("SELECT interaction_id, count(*) FROM scores GROUP BY 1 ORDER BY 1") == [
        ("forced", 2), ("parked-forced", 1)]  # fmt: skip
    assert worker.sql("SELECT event_id, caller, forced FROM interactions ORDER BY 1") == [
        ("forced", ALICE, True), ("parked-forced", ALICE, True)]  # fmt: skip
    assert worker.log[REWARDS_INTERNAL] == []
    assert worker.sql("SELECT count(*) FROM utilities") == [(0,)]


OLD_INTERACTIONS = """CREATE TABLE interactions (
    event_id VARCHAR PRIMARY KEY, ts TIMESTAMPTZ NOT NULL, agent_id VARCHAR NOT NULL, task_type VARCHAR NOT NULL,
    operator VARCHAR NOT NULL, prompt VARCHAR NOT NULL, prompt_is_chat BOOLEAN NOT NULL, prompt_hash VARCHAR NOT NULL,
    response VARCHAR NOT NULL, adapter VARCHAR, latency_ms DOUBLE NOT NULL, metadata JSON, kafka_partition INTEGER,
    kafka_offset BIGINT, landed_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
)"""  # the table as the first release created it


def test_an_outcome_file_from_before_callers_opens_and_lands_them(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    old = duckdb.connect(str(path))
    old.execute(OLD_INTERACTIONS)
    old.execute("CREATE TABLE feedback (event_id VARCHAR PRIMARY KEY, interaction_id VARCHAR NOT NULL, "
                "ts TIMESTAMPTZ NOT NULL, kind VARCHAR NOT NULL, value DOUBLE NOT NULL, metadata JSON, "
                "landed_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp)")  # fmt: skip
    old.execute(
        "INSERT INTO interactions (event_id, ts, agent_id, task_type, operator, prompt, prompt_is_chat, "
        "prompt_hash, response, latency_ms) VALUES ('old', now(), 'a', 'qa', 'o', 'p', false, 'h', 'r', 1)"
    )
    assert "caller" not in [c[0] for c in old.execute("DESCRIBE interactions").fetchall()]
    old.close()
    con = store.connect(path)
    try:
        recs = [Record(names.INTERACTIONS, 0, 1, b"new", orjson.dumps(interaction("new", forced=True))),
                Record(names.FEEDBACK, 0, 1, b"new", orjson.dumps(fb("f", "new", 1.0, MALLORY)))]  # fmt: skip
        for table, cols in landing.to_rows(recs, Settings().limits.limits()).items():
            store.insert(con, table, cols)
        assert con.execute("SELECT event_id, caller, forced FROM interactions ORDER BY 1").fetchall() == [
            ("new", ALICE, True), ("old", None, False)]  # fmt: skip
        assert con.execute("SELECT caller FROM feedback").fetchall() == [(MALLORY,)]
        # the columns are in the same places as in a file created now (the Parquet schema derives from the DDL)
        fresh = duckdb.connect()
        fresh.execute(store.DDL)
        for table in ("interactions", "feedback"):
            assert con.execute(f"DESCRIBE {table}").fetchall() == fresh.execute(f"DESCRIBE {table}").fetchall()
    finally:
        con.close()


@pytest.mark.broker
@pytest.mark.slow
def test_the_real_worker_keeps_tenants_apart(fresh_broker: Any, tmp_path: Path) -> None:
    """The same rules through the embedded broker, the worker process and its lander."""
    from kafka import KafkaProducer

    from tests.streams.harness import start_worker, stop, wait_for, worker_env

    data = tmp_path / "data"
    worker = start_worker(worker_env(fresh_broker.bootstrap, data, "tenants"), tmp_path / "worker.log")
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap)

    def send(topic: str, doc: dict[str, Any]) -> None:
        producer.send(topic, key=doc.get("interaction_id", doc["event_id"]).encode(), value=orjson.dumps(doc))

    try:
        send(names.FEEDBACK, fb("m-late", "late", 0.0, MALLORY))  # before its interaction: parked, then refused
        send(names.INTERACTIONS, interaction("own", operator="o1", metadata={"r": 0.5}))
        send(names.INTERACTIONS, interaction("forced", operator="o2", metadata={"r": 1.0}, forced=True))
        send(names.INTERACTIONS, interaction("late", operator="o3", metadata={"r": 0.5}))
        producer.flush()
        send(names.FEEDBACK, fb("m-own", "own", 0.0, MALLORY))
        for n in range(25):
            send(names.FEEDBACK, fb(f"a-{n}", "own", 1.0 if n < 24 else 0.0, ALICE, second=n + 1))
        send(names.FEEDBACK, fb("a-forced", "forced", 1.0, ALICE))
        producer.flush()
        errors = wait_for(data, "SELECT error FROM dead_letters", lambda r: len(r.rows) == 2, timeout=120).rows
        assert all(REFUSED in e for (e,) in errors), errors
        wait_for(data, "SELECT count(*) FROM scores", lambda r: r.rows == [[26 + 2 + 1]], timeout=60)
        want = [["o1", 2, 0.75], ["o3", 1, 0.5]]  # o1: its rule score, then one thumbs (the first); o2: forced
        wait_for(data, "SELECT operator, n, last_reward FROM utilities ORDER BY 1", lambda r: r.rows == want,
                 timeout=60)  # fmt: skip
        final = wait_for(data, "SELECT interaction_id, revision, reward FROM final_scores ORDER BY 1",
                         lambda r: len(r.rows) == 3).rows  # fmt: skip
        assert final == [["forced", 1, 1.0], ["late", 0, 0.5], ["own", 25, 0.25]]
        time.sleep(2)  # nothing more arrives
        assert wait_for(data, "SELECT count(*) FROM utility_history", lambda r: True).rows == [[3]]
    finally:
        producer.close()
        stop(worker)
