"""Broker-free unit tests of the pieces every worker batch goes through: the Outbox (what a batch produces, its
partitioning, size checks and rollback) and the lander's row mapping (`streams.landing.to_rows`). Milliseconds each."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from schemas import topics as names
from streams import landing, store
from streams.exceptions import OversizeRecord
from streams.outbox import Outbox, partition_for
from taoflow.settings import Settings
from tests.streams.memory import MemoryTable, Record

NOW = datetime.now(UTC).replace(microsecond=0).isoformat()


def test_partition_for_is_kafkas_default_partitioner() -> None:
    # an independent implementation (kafka-python's) of the Java client's murmur2 partitioner agrees on every key
    for key in [b"", b"a", b"interaction-1", "émoji-☃".encode(), bytes(range(256))]:
        for partitions in (1, 3, 4, 12):
            expected = (kafka_python_murmur2(key) & 0x7FFFFFFF) % partitions
            assert partition_for(key, partitions) == expected


def test_an_oversize_record_is_refused_and_nothing_is_queued() -> None:
    out = Outbox({}, max_record_bytes=100)
    out.add("t", b"k", b"v" * 90)
    with pytest.raises(OversizeRecord, match="record size limit of 100 bytes"):
        out.add("t", b"k", b"v" * 100)  # 101 bytes with its key
    assert out.msgs["t"] == [(b"k", b"v" * 90, None)] and len(out) == 1


def test_put_table_writes_the_row_and_the_changelog_record_faust_reads_back() -> None:
    table = MemoryTable("join")
    out = Outbox({"worker-join-changelog": 4})
    out.put_table(table, "iid-1", {"r": 0.5})
    out.put_table(table, "iid-2", {"r": 1.0})
    out.put_table(table, "iid-1", None)  # deleted: a tombstone
    assert table.data == {"iid-2": {"r": 1.0}}
    assert out.table_msgs["worker-join-changelog"] == [
        (b'"iid-1"', b'{"r":0.5}', partition_for(b"iid-1", 4)),
        (b'"iid-2"', b'{"r":1.0}', partition_for(b"iid-2", 4)),
        (b'"iid-1"', None, partition_for(b"iid-1", 4)),
    ]
    assert not out.msgs  # changelogs are kept apart: they go out after the outputs


def test_a_state_over_the_limit_leaves_the_table_as_it_was() -> None:
    table = MemoryTable("join")
    out = Outbox({"worker-join-changelog": 4}, max_record_bytes=64)
    out.put_table(table, "k", {"v": 1})
    with pytest.raises(OversizeRecord):
        out.put_table(table, "k", {"v": "x" * 100})
    assert table.data == {"k": {"v": 1}} and len(out.table_msgs["worker-join-changelog"]) == 1


def test_rollback_drops_only_what_was_queued_after_the_mark() -> None:
    table = MemoryTable("join")
    out = Outbox({"worker-join-changelog": 2})
    out.add("scores", b"a", b"1")
    out.put_table(table, "a", {"n": 1})
    mark = out.mark()
    out.add("scores", b"b", b"2")
    out.add("utilities", b"u", b"3")
    out.put_table(table, "b", {"n": 2})
    out.rollback(mark)
    assert out.msgs["scores"] == [(b"a", b"1", None)] and out.msgs["utilities"] == []
    assert [k for k, _, _ in out.table_msgs["worker-join-changelog"]] == [b'"a"']


def test_merge_keeps_each_topics_order() -> None:
    first, second = Outbox({}), Outbox({})
    first.add("t", b"1", b"a")
    second.add("t", b"2", b"b")
    second.add("u", b"3", b"c")
    first.add("t", b"4", b"d")
    merged = Outbox.merge([first, second])
    assert [k for k, _, _ in merged.msgs["t"]] == [b"1", b"4", b"2"] and len(merged) == 4


def record(topic: str, doc: dict[str, object] | bytes, offset: int = 0, partition: int = 0) -> Record:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return Record(topic, partition, offset, None, value)


def test_to_rows_maps_each_topic_to_its_table_columns() -> None:
    limits = Settings().limits.limits()
    chat = [{"role": "user", "content": "hi"}]
    records = [
        record(names.INTERACTIONS, {"event_id": "i1", "ts": NOW, "agent_id": "a", "task_type": "qa",
                                    "operator": "o", "prompt": "p", "response": "r"}, offset=7, partition=2),
        record(names.INTERACTIONS, {"event_id": "i2", "ts": NOW, "agent_id": "a", "task_type": "qa",
                                    "operator": "o", "prompt": chat, "response": "r", "tools": [{"type": "function",
                                    "function": {"name": "f"}}]}, offset=8, partition=2),
        record(names.FEEDBACK, {"event_id": "f1", "interaction_id": "i1", "ts": NOW, "kind": "thumbs", "value": 1.0}),
        record(names.UTILITIES, {"task_type": "qa", "operator": "o", "utility": 0.4, "n": 3, "last_reward": 0.5,
                                 "ts": NOW}),
        record(names.INTERACTIONS, b"{not json"),  # the worker dead-lettered it already: skipped here
    ]  # fmt: skip
    rows = landing.to_rows(records, limits)
    assert set(rows) == {"interactions", "feedback", "utilities", "utility_history"}
    for table, cols in rows.items():
        assert list(cols) == list(store.COLUMNS[table])
    inter = rows["interactions"]
    assert inter["event_id"] == ["i1", "i2"]
    assert inter["kafka_partition"] == [2, 2] and inter["kafka_offset"] == [7, 8]
    assert inter["prompt_is_chat"] == [False, True] and orjson.loads(inter["prompt"][1]) == chat
    assert inter["tools"][0] is None and orjson.loads(inter["tools"][1])[0]["function"]["name"] == "f"
    assert rows["feedback"]["interaction_id"] == ["i1"]
    assert rows["utilities"]["n"] == [3] and rows["utility_history"]["utility"] == [0.4]
