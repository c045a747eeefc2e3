"""The stream processors end to end through the real embedded broker, a real worker process and DuckDB."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2

from learners.actr import update_utility, utility_after
from streams.sqlapi import query
from taoflow.broker import EmbeddedBroker
from tests.streams.harness import counts, settings_for, start_worker, stop, wait_for, worker_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]
PARTITIONS = 4  # as the `fresh_broker` fixture (tests/conftest.py) creates them
OPERATORS = {"good": 0.9, "mid": 0.55, "bad": 0.2}
ALPHA = 0.2


def interaction(eid: str, op: str, reward: float, i: int) -> dict[str, Any]:
    return {
        "event_id": eid,
        "ts": datetime.now(UTC).isoformat(),
        "agent_id": "sim",
        "task_type": "qa",
        "operator": op,
        "prompt": [{"role": "user", "content": f"question {i}"}] if i % 3 == 0 else f"question {i}",
        "response": f"answer {i}",
        "adapter": None,
        "latency_ms": 10.0,
        "metadata": {"r": reward, "i": i},
    }


def malformed(i: int, base: dict[str, Any]) -> bytes:
    """Seven ways to be wrong."""
    kind = (i // 20) % 7
    if kind == 0:
        return b'{"event_id": "broken'
    if kind == 1:
        return json.dumps({k: v for k, v in base.items() if k != "operator"}).encode()
    if kind == 2:
        return json.dumps({**base, "latency_ms": "fast"}).encode()
    if kind == 3:
        return json.dumps({**base, "surprise": True}).encode()
    if kind == 4:
        return json.dumps({**base, "ts": "last tuesday"}).encode()
    if kind == 5:
        return json.dumps({**base, "response": "x" * 5000}).encode()  # over the 2 KiB limit the worker is given
    return b"\xff\xfe\x00 not utf-8"


def test_twenty_thousand_interactions_exact_rows_and_closed_form_utilities(
    fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    n = 20_000
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=5)
    expected_rewards = dict.fromkeys(OPERATORS, 0)
    valid_ids: list[tuple[str, str]] = []
    bad_interactions = bad_feedback = good_feedback = 0
    for i in range(n):
        op = list(OPERATORS)[i % 3]
        eid = f"i-{i:06d}"
        ev = interaction(eid, op, OPERATORS[op], i)
        if i % 20 == 7:  # 5% malformed
            producer.send("taoflow.interactions", key=eid.encode(), value=malformed(i, ev))
            bad_interactions += 1
            continue
        producer.send("taoflow.interactions", key=eid.encode(), value=json.dumps(ev).encode())
        valid_ids.append((eid, op))
        expected_rewards[op] += 1
    for j, (eid, op) in enumerate(valid_ids):
        if j % 2:
            continue
        fb = {"event_id": f"f-{j}", "interaction_id": eid, "ts": datetime.now(UTC).isoformat(),
              "kind": "task_success", "value": OPERATORS[op], "metadata": {}}  # fmt: skip
        if j % 40 == 0:
            fb["value"] = 1.5  # out of [0, 1]
            bad_feedback += 1
        else:
            good_feedback += 1
            expected_rewards[op] += 1
        producer.send("taoflow.feedback", key=eid.encode(), value=json.dumps(fb).encode())
    producer.flush()
    producer.close()
    produced_at = time.monotonic()

    data = tmp_path / "data"
    env = worker_env(fresh_broker.bootstrap, data, "e2e", TAOFLOW_LIMITS_MAX_RESPONSE_BYTES="2048")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        total_rewards = sum(expected_rewards.values())
        wait_for(data, "SELECT count(*) FROM utility_history", lambda r: r.rows[0][0] >= total_rewards, timeout=300)
        wait_for(data, "SELECT count(*) FROM dead_letters", lambda r: r.rows[0][0] >= bad_interactions + bad_feedback)
        elapsed = time.monotonic() - produced_at
        time.sleep(2)  # anything extra (a duplicate) would land by now
        c = counts(data)
        assert c["interactions"] == len(valid_ids) == n - bad_interactions
        assert c["feedback"] == good_feedback
        assert c["scores"] == len(valid_ids) + good_feedback
        assert c["dead_letters"] == bad_interactions + bad_feedback
        assert c["utility_history"] == total_rewards
        assert c["utilities"] == len(OPERATORS)

        utilities = query("SELECT operator, utility, n FROM utilities", settings_for(data)).rows
        for op, u, count in utilities:
            assert count == expected_rewards[op]
            assert abs(u - utility_after(0.0, OPERATORS[op], ALPHA, count)) < 1e-9, (op, u)

        reasons = query(
            "SELECT source_topic, error, original FROM dead_letters ORDER BY source_topic, kafka_offset",
            settings_for(data),
        ).rows
        text = " | ".join(r[1] for r in reasons)
        for needle in ("Invalid JSON", "field 'operator': missing", "field 'latency_ms'", "field 'surprise'",
                       "field 'ts'", "over the limit of 2048", "field 'value'"):  # fmt: skip
            assert needle in text, needle
        assert any(r[0] == "taoflow.feedback" for r in reasons)
        revisions = query("SELECT max(revision) FROM scores", settings_for(data)).rows[0][0]
        assert revisions == 1
        print(f"\n20k interactions + {good_feedback + bad_feedback} feedback processed and landed in {elapsed:.1f}s")
    finally:
        stop(worker)


def _aligned_ids(op_partition: dict[str, int], per_op: int) -> dict[str, list[str]]:
    """Event ids whose Kafka partition is the operator's own, so each operator's rewards keep one order."""
    ids: dict[str, list[str]] = {op: [] for op in op_partition}
    k = 0
    while any(len(v) < per_op for v in ids.values()):
        eid = f"c-{k:07d}"
        k += 1
        part = (murmur2(eid.encode()) & 0x7FFFFFFF) % PARTITIONS
        for op, p in op_partition.items():
            if p == part and len(ids[op]) < per_op:
                ids[op].append(eid)
    return ids


def test_kill_minus_nine_mid_stream_loses_and_duplicates_nothing(fresh_broker: EmbeddedBroker, tmp_path: Path) -> None:
    per_op = 6_000
    ids = _aligned_ids({"good": 0, "mid": 1, "bad": 2}, per_op)
    rng = random.Random(7)
    plan: list[tuple[str, str, float]] = []
    for i in range(per_op):
        for op, mean in OPERATORS.items():
            plan.append((ids[op][i], op, round(min(1.0, max(0.0, rng.gauss(mean, 0.2))), 4)))
    expected: dict[str, float] = {}
    for _, op, r in plan:  # the uninterrupted result: every reward folded in once, in partition order
        expected[op] = update_utility(expected.get(op, 0.0), r, ALPHA)

    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=5)

    def produce() -> None:
        for i, (eid, op, r) in enumerate(plan):
            value = json.dumps(interaction(eid, op, r, i)).encode()
            producer.send("taoflow.interactions", key=eid.encode(), value=value)
            if i % 100 == 99:
                time.sleep(0.1)  # a steady ~1k events/s, so the kill lands in the middle of the stream
        producer.flush()
        producer.close()

    data = tmp_path / "data"
    env = worker_env(fresh_broker.bootstrap, data, "crash")
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    feeder = threading.Thread(target=produce)
    feeder.start()
    try:
        wait_for(data, "SELECT count(*) FROM utility_history", lambda r: r.rows[0][0] >= 3000, timeout=180)
        stop(worker, signal.SIGKILL)  # worker and its lander die mid-stream, nothing flushed or committed cleanly
        before = counts(data)  # read-only, straight from the file, now that no lander holds it
        assert 0 < before["utility_history"] < len(plan) and before["interactions"] < len(plan)
        worker = start_worker(env, log)
        feeder.join()
        wait_for(data, "SELECT count(*) FROM utility_history", lambda r: r.rows[0][0] >= len(plan), timeout=120)
        time.sleep(3)
        c = counts(data)
        assert c["interactions"] == c["scores"] == c["utility_history"] == len(plan)
        dup = query("SELECT count(*) - count(DISTINCT event_id) FROM interactions", settings_for(data)).rows[0][0]
        assert dup == 0
        rows = query("SELECT operator, utility, n FROM utilities ORDER BY operator", settings_for(data)).rows
        for op, u, count in rows:
            assert count == per_op
            assert abs(u - expected[op]) < 1e-9, (op, u, expected[op])
        gaps = query(
            "SELECT operator, count(*), min(n), max(n) FROM utility_history GROUP BY operator", settings_for(data)
        ).rows
        for _, cnt, lo, hi in gaps:
            assert (cnt, lo, hi) == (per_op, 1, per_op)
        assert "Error in recovery" not in log.read_text(errors="replace")  # tables came back whole
    finally:
        feeder.join()
        stop(worker)


def test_two_workers_share_partitions_and_one_takes_over_when_the_other_dies(
    fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    n = 20_000
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=5)

    def produce() -> None:
        for i in range(n):
            eid = f"t-{i:06d}"
            producer.send("taoflow.interactions", key=eid.encode(),
                          value=json.dumps(interaction(eid, "good", OPERATORS["good"], i)).encode())  # fmt: skip
            if i % 100 == 99:
                time.sleep(0.1)
        producer.flush()
        producer.close()

    data, lake = tmp_path / "data", tmp_path / "lake"
    # both workers' landers also land Parquet, in parallel (each its share of the partitions)
    env = worker_env(fresh_broker.bootstrap, data, "pair", TAOFLOW_STREAM_PARQUET_URL=str(lake))
    first = start_worker(env, tmp_path / "first.log")  # its lander takes the DuckDB file
    wait_for(data, "SELECT count(*) FROM interactions", lambda r: r.rows[0][0] == 0, timeout=60)
    second = start_worker(env, tmp_path / "second.log")  # its lander stands by
    feeder = threading.Thread(target=produce)
    feeder.start()
    try:
        wait_for(data, "SELECT count(*) FROM utility_history", lambda r: r.rows[0][0] >= 2000, timeout=180)
        # the worker whose lander owns the DuckDB file dies: its partitions move to the second worker,
        # and the second worker's standby lander takes the file over
        stop(first, signal.SIGKILL)
        feeder.join()
        wait_for(data, "SELECT count(*) FROM utility_history", lambda r: r.rows[0][0] >= n, timeout=120)
        time.sleep(3)
        c = counts(data)
        assert c["interactions"] == c["scores"] == c["utility_history"] == n
        u, count = query("SELECT utility, n FROM utilities WHERE operator = 'good'", settings_for(data)).rows[0]
        assert count == n and abs(u - utility_after(0.0, OPERATORS["good"], ALPHA, n)) < 1e-9
        assert "Error in recovery" not in (tmp_path / "second.log").read_text(errors="replace")
        # the Parquet lake: every interaction exactly once in the files themselves (the dead lander's uncommitted
        # files were removed by the one that took its partitions over), and the lake views agree with DuckDB
        cfg = settings_for(data, parquet_url=str(lake))
        wait_for(
            data, "SELECT count(*) FROM lake.utility_history", lambda r: r.rows[0][0] == n, timeout=60, settings=cfg
        )
        # the files themselves, read directly (the SQL endpoint reads nothing but the tables and lake views)
        raw = (
            duckdb.connect()
            .execute(f"SELECT count(*), count(DISTINCT event_id) FROM read_parquet('{lake}/interactions/**/*.parquet')")
            .fetchone()
        )
        assert raw == (n, n)
        lake_counts = query("SELECT (SELECT count(*) FROM lake.interactions), (SELECT count(*) FROM lake.scores), "
                            "(SELECT count(DISTINCT task_type) FROM lake.scores)", cfg).rows[0]  # fmt: skip
        assert lake_counts == [n, n, 1]
        writers = {f.name.rsplit("-", 1)[1] for f in (lake / "interactions").rglob("*.parquet")}
        assert len(writers) >= 2  # both landers wrote their share
    finally:
        feeder.join()
        stop(first)
        stop(second)
