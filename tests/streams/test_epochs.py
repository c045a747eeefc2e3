"""Input positions and changelog epochs (`streams.positions`): which changelog records a recovery applies when a
replaced owner (a zombie back from SIGSTOP) writes late, and where each stage of an Outbox goes.

The filter and the table seam run broker-free in milliseconds, on the real `streams.seams.Table` method; one test
writes the records through the worker's real producer to the embedded broker and recovers from what it reads back, so
the epoch travels in real Kafka record headers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
from faust.types import TP

from streams import seams
from streams.outbox import BatchProducer, Outbox
from streams.positions import EpochFilter, Fencing, epoch_header, is_marker, marker_key, resume_offsets
from taoflow.broker import EmbeddedBroker
from tests.streams.memory import MemoryTable

CHANGELOG = "worker-utilities-changelog"
TPX = TP(CHANGELOG, 2)


def _rec(offset: int, key: bytes, epoch: int | None, tp: TP = TPX) -> SimpleNamespace:
    return SimpleNamespace(tp=tp, offset=offset, key=key, headers=epoch_header(epoch))


def _apply(records: list[SimpleNamespace], flt: EpochFilter | None = None) -> dict[bytes, int]:
    """What a reader ends with: last write per key among the records the filter keeps (offset as the value)."""
    flt = flt or EpochFilter()
    state: dict[bytes, int] = {}
    for r in records:
        if flt.keep(r.tp, r.offset, r.key, r.headers):
            state[r.key] = r.offset
    return state


def test_a_zombies_writes_after_the_new_owners_marker_are_not_recovered() -> None:
    # A owns the partition from its marker at 0; it is paused; B takes over (marker at 4); A wakes and writes (6, 7);
    # B writes on (5, 8)
    log = [
        _rec(0, marker_key(), None),
        _rec(1, b"u1", 0), _rec(2, b"u2", 0),  # A, before the takeover: part of what B recovered
        _rec(3, b"u3", 0),  # A's late write landing before B's marker: B recovered it too
        _rec(4, marker_key(), None),  # B's epoch begins
        _rec(5, b"u1", 4),
        _rec(6, b"u2", 0), _rec(7, b"u9", 0),  # A, a zombie: after B's marker
        _rec(8, b"u3", 4),
    ]  # fmt: skip
    flt = EpochFilter()
    assert _apply(log, flt) == {b"u1": 5, b"u2": 2, b"u3": 8}
    assert flt.skipped == 2
    # exactly B's state: what it recovered (everything up to its marker) plus its own writes
    assert _apply(log[:4]) | {b"u1": 5, b"u3": 8} == _apply(log)


def test_records_without_an_epoch_count_until_the_first_marker() -> None:
    # a changelog written before epochs existed is recovered whole; after a marker, an epoch-less write is a zombie's
    log = [_rec(0, b"a", None), _rec(1, b"b", None), _rec(2, marker_key(), None), _rec(3, b"c", None), _rec(4, b"d", 2)]
    assert _apply(log) == {b"a": 0, b"b": 1, b"d": 4}


def test_the_filter_is_per_partition_and_starts_again_when_a_partition_is_read_again() -> None:
    other = TP(CHANGELOG, 3)
    flt = EpochFilter()
    assert not flt.keep(TPX, 10, marker_key(), [])
    assert flt.keep(other, 0, b"x", epoch_header(0))  # another partition's epochs are its own
    assert not flt.keep(TPX, 11, b"x", epoch_header(0))
    # recovery reads the partition again from its beginning (the tables were dropped): its state starts again
    assert flt.keep(TPX, 0, b"x", epoch_header(0))
    flt.forget()
    assert flt.keep(other, 0, b"x", epoch_header(-1))


def test_markers_are_json_no_table_key_can_equal() -> None:
    key = marker_key()
    assert is_marker(key) and orjson.loads(key)[0] == "taoflow-epoch"
    assert marker_key() != key  # unique: compaction keeps every one
    assert not is_marker(orjson.dumps("taoflow-epoch"))  # a table key is a JSON string


def test_the_table_seam_applies_only_what_the_filter_keeps(tmp_path: Path) -> None:
    """The worker's real table (`seams.Table` on faust's in-memory store, as `build_app` makes it), fed changelog events
    as faust's recovery hands them over."""
    from streams.app import build_app
    from taoflow.settings import Settings

    app, ctx = build_app(Settings(overrides={"core": {"data_dir": tmp_path}}))  # nothing connects yet
    table = ctx.utilities
    tp = TP(table.changelog_topic.get_topic_name(), 2)

    def event(offset: int, key: bytes, epoch: int | None, value: Any = None) -> SimpleNamespace:
        return SimpleNamespace(key=orjson.loads(key), value=value, message=SimpleNamespace(
            tp=tp, partition=2, offset=offset, key=key, value=orjson.dumps(value), headers=epoch_header(epoch)))
        # fmt: skip

    batch = [event(0, marker_key(), None, {}), event(1, b'"a"', 0, {"u": 1}), event(2, marker_key(), None, {}),
             event(3, b'"a"', 0, {"u": 2}), event(4, b'"b"', 2, {"u": 3})]  # fmt: skip
    table.apply_changelog_batch(batch)
    assert dict(table.data.data) == {"a": {"u": 1}, "b": {"u": 3}}  # the zombie's a=2 is not applied, nor any marker
    assert app.fencing.filter.skipped == 1


def test_a_worker_back_under_a_new_member_id_drops_its_tables() -> None:
    fencing = Fencing(None)
    assert not fencing.rejoined("m-1")  # the first assignment
    assert not fencing.rejoined("m-1")  # still the same member
    rows: dict[str, Any] = {"k": {"u": 1}}
    store = SimpleNamespace(data=rows, _key_partition={"k": 2})
    table = SimpleNamespace(data=store, changelog_topic=SimpleNamespace(get_topic_name=lambda: CHANGELOG))
    recovery = SimpleNamespace(active_offsets={TPX: 40}, standby_offsets={TP(CHANGELOG, 1): 7})
    app = SimpleNamespace(tables=SimpleNamespace(values=lambda: [table], recovery=recovery))
    fencing.epochs[(CHANGELOG, 2)] = 12
    assert fencing.rejoined("m-2")  # removed from the group meanwhile (a zombie): state written since is suspect
    fencing.drop_state(app)
    assert rows == {} and store._key_partition == {}
    assert recovery.active_offsets == {} and recovery.standby_offsets == {}  # recovery reads from the beginning
    assert fencing.epochs == {}  # a write before the next epoch begins carries none: not recovered


def test_positions_resume_only_for_partitions_with_a_valid_row() -> None:
    rows = {"taoflow.interactions/0": {"next": 120}, "taoflow.interactions/1": {"next": "x"}, "other": 3}
    tps = [TP("taoflow.interactions", p) for p in range(3)]
    assert resume_offsets(rows, tps) == {tps[0]: 120}


def test_an_outbox_has_three_stages_and_positions_go_to_the_input_partition() -> None:
    positions, utilities = MemoryTable("positions"), MemoryTable("utilities")
    out = Outbox({"worker-positions-changelog": 4, "worker-utilities-changelog": 4}, epochs={})
    out.add("taoflow.scores", b"i1", b"{}")
    out.put_table(utilities, "task/op", {"u": 0.5})
    out.put_position(positions, "taoflow.interactions", 3, 101)
    assert list(out.msgs) == ["taoflow.scores"]
    assert list(out.table_msgs) == ["worker-utilities-changelog"]
    assert out.position_msgs["worker-positions-changelog"] == [(b'"taoflow.interactions/3"', b'{"next":101}', 3)]
    assert positions.data["taoflow.interactions/3"] == {"next": 101}
    merged = Outbox.merge([out, out])
    assert len(merged) == 6 and merged.epochs is out.epochs


def test_epochs_travel_in_kafka_headers_and_a_zombies_late_writes_are_not_recovered(broker: EmbeddedBroker) -> None:
    """Two producers as two workers on one changelog partition of the embedded broker: A writes, B takes over (its
    marker), A writes late, B writes. What a recovery reads back from Kafka is B's state."""

    async def run() -> dict[bytes, bytes]:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        topic = f"epochs-{id(object())}-changelog"
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 2, 1)])
        finally:
            await admin.close()
        a, b = BatchProducer(broker.bootstrap, {}), BatchProducer(broker.bootstrap, {})
        fa, fb = Fencing(a), Fencing(b)
        table = MemoryTable("t")
        table.changelog_topic.name = topic

        async def write(fencing: Fencing, producer: BatchProducer, key: str, value: int) -> None:
            out = Outbox({topic: 2}, epochs=fencing.epochs)
            out.put_table(table, key, {"v": value}, partition=1)
            await producer.send(out)

        try:
            await fa.begin_epochs([TP(topic, 1)])
            await write(fa, a, "x", 1)
            await write(fa, a, "y", 1)
            await fb.begin_epochs([TP(topic, 1)])  # B takes over; A does not know yet
            assert fb.epochs[(topic, 1)] > fa.epochs[(topic, 1)]
            await write(fa, a, "y", 2)  # the zombie's late write
            await write(fa, a, "z", 2)
            await write(fb, b, "x", 3)
        finally:
            await a.stop()
            await b.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        flt, state = EpochFilter(), {}
        try:
            from aiokafka.structs import TopicPartition

            consumer.assign([TopicPartition(topic, 1)])
            seen = 0
            for _ in range(50):
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        seen += 1
                        if flt.keep(TPX, r.offset, r.key, r.headers):
                            state[r.key] = r.value
                if seen >= 7:
                    break
        finally:
            await consumer.stop()
        assert seen == 7  # two markers, five writes
        return state

    state = asyncio.run(run())
    assert state == {b'"x"': b'{"v":3}', b'"y"': b'{"v":1}'}  # A's late y=2 and z=2 are not recovered
