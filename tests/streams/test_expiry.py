"""Join-state expiry through the real worker: interactions stop waiting for feedback after the TTL, and feedback
whose interaction never arrives goes to the dead letters with its bytes and the reason (nothing kept forever,
nothing dropped silently)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer

from streams.sqlapi import query
from taoflow.broker import EmbeddedBroker
from tests.streams.harness import settings_for, start_worker, stop, wait_for, worker_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_join_state_expires_and_orphan_feedback_is_dead_lettered(fresh_broker: EmbeddedBroker, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = worker_env(fresh_broker.bootstrap, data, "ttl", TAOFLOW_STREAM_JOIN_TTL_S="3",
                     TAOFLOW_STREAM_EXPIRE_EVERY_S="0.5")  # fmt: skip
    worker = start_worker(env, tmp_path / "worker.log")
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap)
    now = datetime.now(UTC).isoformat()

    def send(topic: str, key: str, doc: dict) -> bytes:
        raw = json.dumps(doc).encode()
        producer.send(topic, key=key.encode(), value=raw)
        producer.flush()
        return raw

    def feedback(eid: str, iid: str) -> dict:
        return {"event_id": eid, "interaction_id": iid, "ts": datetime.now(UTC).isoformat(), "kind": "thumbs",
                "value": 1.0, "metadata": {}}  # fmt: skip

    try:
        send("taoflow.interactions", "a", {"event_id": "a", "ts": now, "agent_id": "t", "task_type": "qa",
                                           "operator": "o", "prompt": "p", "response": "r", "adapter": None,
                                           "latency_ms": 1.0, "metadata": {"r": 0.5}})  # fmt: skip
        send("taoflow.feedback", "a", feedback("f-early", "a"))  # joins: revision 1
        orphan = send("taoflow.feedback", "ghost", feedback("f-orphan", "ghost"))  # its interaction never comes
        cfg = settings_for(data)
        wait_for(data, "SELECT count(*) FROM scores WHERE interaction_id = 'a'", lambda r: r.rows[0][0] == 2)
        time.sleep(4)  # past the TTL: `a` no longer waits for feedback
        late = send("taoflow.feedback", "a", feedback("f-late", "a"))
        rows = wait_for(data, "SELECT source_topic, error, decode(original) FROM dead_letters",
                        lambda r: len(r.rows) == 2, timeout=60).rows  # fmt: skip
        for topic, err, _ in rows:
            assert topic == "taoflow.feedback" and "no such interaction arrived within the join TTL (3s)" in err
        assert {o for _, _, o in rows} == {orphan.decode(), late.decode()}, rows  # the original bytes
        # `a` kept its two scores (the late feedback did not re-score it), and its feedback rows landed
        assert query("SELECT revision FROM scores WHERE interaction_id = 'a' ORDER BY 1", cfg).rows == [[0], [1]]
        assert query("SELECT count(*) FROM feedback", cfg).rows == [[3]]
    finally:
        producer.close()
        stop(worker)
