"""What one input batch produces, sent as Kafka record batches and awaited before the input is acknowledged.

faust's `send_soon` moves every message through an asyncio queue and a publish call of its own, and its
table writes do the same for each changelog record; at a few outputs per event that path, not the
parsing, bounded the worker. Here a batch's outputs go out as one record batch per partition, and the
agent awaits their delivery before asking for its next input batch, so faust commits an input offset
only after everything it caused is in Kafka (at-least-once; every consumer downstream is idempotent).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import defaultdict
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

from streams.exceptions import OversizeRecord
from streams.positions import epoch_header, marker_key, position_key


@functools.lru_cache(maxsize=1 << 16)
def _hash(key: bytes) -> int:
    # aiokafka's murmur2 is pure Python (~2 us); an interaction id is hashed for its score and for its join
    # state's changelog, and the utility keys are few, so recent keys are worth remembering
    return murmur2(key) & 0x7FFFFFFF


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), as the Java client, kafka-python and aiokafka all use it."""
    return _hash(key) % partitions


def table_rows(table: Any) -> Any:
    """The dict behind a faust table's in-memory store (reads skip faust's per-key hooks, which these tables
    do not use: no defaults, no windows), or the table itself for another kind of store."""
    return _table_parts(table)[1]


def _table_parts(table: Any) -> tuple[str, Any, Any]:
    store = table.data
    cached = _TABLES.get(id(table))
    if cached is None or cached[0] is not store:
        rows = getattr(store, "data", None)
        if not isinstance(rows, dict):
            rows = store
        cached = _TABLES[id(table)] = (store, table.changelog_topic.get_topic_name(), rows,
                                       getattr(store, "_key_partition", None))  # fmt: skip
    return cached[1], cached[2], cached[3]


_TABLES: dict[int, tuple[Any, str, Any, Any]] = {}


Queued = list[tuple[bytes | None, bytes | None, int | None]]  # (key, value, partition) per topic, in order


class Outbox:
    """Messages grouped by topic, in order; tables are written through it too (see `put_table`), and the input
    positions the batch processed through (see `put_position`).

    Three stages, sent in this order and each acknowledged before the next (`BatchProducer.send`): outputs, table
    changelogs, positions. If the worker dies in between, the recovered position does not yet cover this batch, so its
    replay recomputes the same outputs and table changes (same source positions, which every reader de-duplicates)
    instead of skipping them."""

    def __init__(self, partitions: dict[str, int], max_record_bytes: int = 1_000_000,
                 epochs: dict[tuple[str, int], int] | None = None) -> None:  # fmt: skip
        self.partitions = partitions  # known partition counts (the tables' changelogs)
        self.max_record_bytes = max_record_bytes
        # this worker's epoch per changelog partition (`streams.positions`); the dict is shared and read at send time
        self.epochs = epochs if epochs is not None else {}
        self.msgs: dict[str, Queued] = defaultdict(list)
        self.table_msgs: dict[str, Queued] = defaultdict(list)
        self.position_msgs: dict[str, Queued] = defaultdict(list)

    def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        """Queue a message; without `partition`, the key's default partition (round robin without a key).
        Raises OversizeRecord (nothing queued) when the broker would refuse it."""
        self._check_size(topic, key, value)
        self.msgs[topic].append((key, value, partition))

    def _check_size(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        size = len(key or b"") + len(value or b"")
        if size > self.max_record_bytes:
            raise OversizeRecord(
                f"a {topic} record of {size} bytes would exceed the record size limit of {self.max_record_bytes} "
                "bytes (TAOFLOW_STREAM_MAX_RECORD_BYTES; the broker refuses larger records)"
            )

    def mark(self) -> tuple[dict[str, int], dict[str, int]]:
        """Where the queued messages end now: `rollback` drops what was queued after it."""
        return {t: len(m) for t, m in self.msgs.items()}, {t: len(m) for t, m in self.table_msgs.items()}

    def rollback(self, mark: tuple[dict[str, int], dict[str, int]]) -> None:
        """Drop the messages queued since `mark` (one record's outputs, when processing it failed). Table rows are
        not restored: processors write their tables last, once everything else about a record succeeded."""
        for queued, at in ((self.msgs, mark[0]), (self.table_msgs, mark[1])):
            for topic, msgs in queued.items():
                del msgs[at.get(topic, 0) :]

    def put_table(self, table: Any, key: str, value: dict[str, Any] | None, partition: int | None = None,
                  _stage: str = "tables") -> None:  # fmt: skip
        """Set (or with None, delete) a faust table key and queue its changelog record in this batch.

        The record has the wire form faust reads back (JSON key, as faust's Table uses for `str` keys; JSON
        value; a tombstone to delete), so faust's changelog recovery rebuilds the table as usual. It goes to
        the partition of the key's *input* topic (murmur2 of the raw key; or `partition`), so a worker that owns
        input partition p recovers exactly the state of p's keys. The in-memory store is updated directly.
        """
        topic, rows, key_partition = _table_parts(table)
        part = partition_for(key.encode(), self.partitions[topic]) if partition is None else partition
        queue = (self.table_msgs if _stage == "tables" else self.position_msgs)[topic]
        if value is None:
            rows.pop(key, None)
            queue.append((orjson.dumps(key), None, part))
        else:
            raw_key, raw = orjson.dumps(key), orjson.dumps(value)
            self._check_size(topic, raw_key, raw)  # before the row changes: a refused state leaves the table as it was
            rows[key] = value
            queue.append((raw_key, raw, part))
        if key_partition is not None:
            key_partition[key] = part

    def put_position(self, table: Any, topic: str, partition: int, next_offset: int) -> None:
        """Record that input partition `topic`/`partition` is processed through `next_offset - 1` (see
        `streams.positions`): the last stage of this Outbox, on the changelog partition of that input partition."""
        self.put_table(table, position_key(topic, partition), {"next": next_offset}, partition, _stage="positions")

    @classmethod
    def merge(cls, outboxes: list[Outbox]) -> Outbox:
        """One Outbox with the messages of several, in their order (per topic, and per changelog topic)."""
        first = outboxes[0]
        merged = cls(first.partitions, first.max_record_bytes, first.epochs)
        for box in outboxes:
            for mine, theirs in ((merged.msgs, box.msgs), (merged.table_msgs, box.table_msgs),
                                 (merged.position_msgs, box.position_msgs)):  # fmt: skip
                for topic, msgs in theirs.items():
                    mine[topic].extend(msgs)
        return merged

    def __len__(self) -> int:
        return sum(len(v) for q in (self.msgs, self.table_msgs, self.position_msgs) for v in q.values())


class BatchProducer:
    """An aiokafka producer that sends an Outbox as record batches and waits for the acks."""

    def __init__(self, bootstrap: str, security: dict[str, Any]) -> None:
        self.bootstrap = bootstrap
        self.security = security
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self._partitions: dict[str, int] = {}
        self._round_robin = itertools.count()

    async def _get(self) -> Any:
        async with self._lock:
            if self._producer is None:
                from aiokafka import AIOKafkaProducer

                self._producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap, acks="all", linger_ms=0, max_batch_size=1024 * 1024,
                    max_request_size=8 * 1024 * 1024, **self.security,
                )  # fmt: skip
                await self._producer.start()
        return self._producer

    async def send(self, outbox: Outbox) -> None:
        """Outputs, then table changelogs, then positions, each acknowledged before the next (see `Outbox`).
        Changelog records carry this worker's epoch on their partition (`streams.positions`)."""
        await self._send(outbox.msgs)
        await self._send(outbox.table_msgs, outbox.epochs)
        await self._send(outbox.position_msgs, outbox.epochs)

    async def write_markers(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Append an epoch marker to each changelog partition; each one's offset is the new epoch there."""
        producer = await self._get()
        futures = []
        for topic, part in partitions:
            batch = producer.create_batch()
            batch.append(key=marker_key(), value=b"{}", timestamp=None)  # valid JSON: faust decodes it before the filter
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=part))
        sent = await asyncio.gather(*futures)
        return {tp: meta.offset for tp, meta in zip(partitions, sent, strict=True)}

    async def _send(self, messages: dict[str, Queued], epochs: dict[tuple[str, int], int] | None = None) -> None:
        if not messages:
            return
        producer = await self._get()
        by_partition: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        for topic, msgs in messages.items():
            n = self._partitions.get(topic)
            if n is None:
                n = self._partitions[topic] = len(await producer.partitions_for(topic))
            for key, value, part in msgs:
                if part is None:
                    part = partition_for(key, n) if key is not None else next(self._round_robin) % n
                by_partition[(topic, part)].append((key, value))
        futures = []
        for (topic, part), records in by_partition.items():
            headers = epoch_header(epochs.get((topic, part))) if epochs is not None else []
            batch = producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    batch.close()
                    futures.append(await producer.send_batch(batch, topic, partition=part))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=part))
        await asyncio.gather(*futures)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
