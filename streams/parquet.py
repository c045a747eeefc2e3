"""Landing the event tables as hive-partitioned Parquet, so every worker lands in parallel (scale-out).

Layout under `TAOFLOW_STREAM_PARQUET_URL` (a directory, `file://`, or an object-store URL pyarrow can write:
`s3://`, `gs://`, `hdfs://`):

    <root>/<table>/date=YYYY-MM-DD/task_type=<url-quoted>/<topic>-p<partition>-o<first offset>-<writer>.parquet

`interactions`, `scores` and `utility_history` are split by date and task type; `feedback` and
`dead_letters` (which have no task type) by date. Every worker's lander consumes the outcome topics in one
consumer group (`<app_id>-parquet`), so the partitions, and the writing, are shared.

Exactly once with respect to Kafka offsets: a batch's files are written (atomically: a temporary name, then a
rename; object stores publish a file when it is closed) before its offsets are committed, and a batch never
spans a rebalance (the revoke callback waits for the batch in hand). When a lander is assigned a partition,
it deletes that partition's files whose first offset is at or past the committed offset: they belong to a
batch that died before its commit, and the records come again. Events a producer sent twice (distinct Kafka
records) are dropped by the `lake.*` views, which keep one row per event key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from streams import store
from streams.lake import LAKE_TABLES, open_root
from streams.landing import landing_consumer_config, to_rows
from taoflow.settings import Settings

log = logging.getLogger(__name__)

TOPIC_TABLE = {topic: table for table, (topic, _) in LAKE_TABLES.items()}
_FILE = re.compile(r"^(?P<topic>.+)-p(?P<p>\d+)-o(?P<o>\d+)-(?P<w>[0-9a-f]+)\.parquet(?P<tmp>\.tmp)?$")
_SCHEMAS: dict[str, pa.Schema] = {}


def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema of a table's files: the DuckDB table's own types, less the hive partition columns."""
    if not _SCHEMAS:
        import duckdb

        con = duckdb.connect()
        con.execute(store.DDL)
        for t, (_, hive) in LAKE_TABLES.items():
            schema = con.sql(f"SELECT * FROM {t} LIMIT 0").to_arrow_table().schema
            fields = [f for f in schema if f.name not in hive]
            if "landed_at" not in schema.names:  # every lake table says when it landed (and dedupes by it)
                fields.append(pa.field("landed_at", pa.timestamp("us", tz="UTC")))
            _SCHEMAS[t] = pa.schema(fields)
        con.close()
    return _SCHEMAS[table]


def _hive_dir(table: str, date: str, task_type: str | None) -> str:
    parts = [table, f"date={date}"]
    if task_type is not None:
        parts.append(f"task_type={urllib.parse.quote(task_type, safe='')}")
    return "/".join(parts)


class ParquetSink:
    """Writes a batch's rows as one file per (table, date, task type) and cleans up uncommitted batches."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = open_root(url)
        self.writer = uuid.uuid4().hex[:12]
        self.files_written = 0

    def write(self, topic: str, partition: int, first_offset: int, cols: dict[str, list[Any]]) -> list[str]:
        """Write one source partition's rows of one table; returns the files written."""
        table = TOPIC_TABLE[topic]
        hive = LAKE_TABLES[table][1]
        n = len(next(iter(cols.values()), []))
        if not n:
            return []
        cols = dict(cols)
        cols["landed_at"] = [datetime.now(UTC)] * n
        groups: dict[tuple[str, str | None], list[int]] = defaultdict(list)
        task_types = cols["task_type"] if "task_type" in hive else None
        for i, ts in enumerate(cols["ts"]):
            groups[(ts.astimezone(UTC).date().isoformat(), task_types[i] if task_types is not None else None)].append(i)
        schema = arrow_schema(table)
        name = f"{topic}-p{partition}-o{first_offset:012d}-{self.writer}.parquet"
        written = []
        import pyarrow.parquet as pq

        for (date, task_type), idx in groups.items():
            data = {f.name: [cols[f.name][i] for i in idx] if f.name in cols else [None] * len(idx) for f in schema}
            arrow = pa.table(data, schema=schema)
            directory = f"{self.root}/{_hive_dir(table, date, task_type)}"
            self.fs.create_dir(directory, recursive=True)
            path = f"{directory}/{name}"
            if self._local:
                pq.write_table(arrow, path + ".tmp", filesystem=self.fs, compression="zstd")
                self.fs.move(path + ".tmp", path)
            else:
                pq.write_table(arrow, path, filesystem=self.fs, compression="zstd")  # published on close
            written.append(path)
        self.files_written += len(written)
        return written

    @property
    def _local(self) -> bool:
        from pyarrow import fs

        return isinstance(self.fs, fs.LocalFileSystem)

    def delete(self, paths: list[str]) -> int:
        """Delete files this sink wrote (a batch whose commit was refused); returns how many were there."""
        removed = 0
        for path in paths:
            try:
                self.fs.delete_file(path)
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def discard_uncommitted(self, committed: dict[tuple[str, int], int]) -> int:
        """Delete files (and temporaries) of these partitions from offsets at or past their commit point."""
        from pyarrow import fs

        removed = 0
        by_table: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)
        for (topic, part), offset in committed.items():
            if topic in TOPIC_TABLE:
                by_table[TOPIC_TABLE[topic]][(topic, part)] = offset
        for table, marks in by_table.items():
            selector = fs.FileSelector(f"{self.root}/{table}", recursive=True, allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                if info.type != fs.FileType.File:
                    continue
                m = _FILE.match(info.base_name)
                if not m:
                    continue
                mark = marks.get((m["topic"], int(m["p"])))
                if mark is not None and int(m["o"]) >= mark:
                    self.fs.delete_file(info.path)
                    removed += 1
        if removed:
            log.info("removed %d Parquet files of batches that were never committed", removed)
        return removed


class ParquetLander:
    """Consumes the event topics in group `<app_id>-parquet` and lands them through a ParquetSink."""

    TOPICS = tuple(topic for topic, _ in LAKE_TABLES.values())

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.stream
        assert self.cfg.parquet_url, "ParquetLander needs TAOFLOW_STREAM_PARQUET_URL"
        self.sink = ParquetSink(self.cfg.parquet_url)
        self.landed: dict[str, int] = defaultdict(int)
        self._lock = asyncio.Lock()
        self._generation = 0

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

        lander = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                async with lander._lock:  # the batch in hand finishes (files and commit) first
                    lander._generation += 1

            async def on_partitions_assigned(self, assigned: Any) -> None:
                async with lander._lock:
                    lander._generation += 1
                    marks = {}
                    for tp in assigned:
                        committed = await consumer.committed(tp)
                        marks[(tp.topic, tp.partition)] = committed or 0
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(None, lander.sink.discard_uncommitted, marks)

        consumer = AIOKafkaConsumer(
            **landing_consumer_config(self.settings, "parquet"),
            session_timeout_ms=int(self.cfg.session_timeout_s * 1000),
            heartbeat_interval_ms=int(max(0.5, self.cfg.session_timeout_s / 10) * 1000),
        )
        consumer.subscribe(list(self.TOPICS), listener=Listener())
        await consumer.start()
        limits = self.settings.limits.limits()
        loop = asyncio.get_running_loop()
        log.info("landing Parquet under %s", self.cfg.parquet_url)
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=self.cfg.land_batch_ms, max_records=self.cfg.land_batch_size)
                if not batch:
                    continue
                generation = self._generation
                async with self._lock:
                    if generation != self._generation:
                        continue  # a rebalance came between fetch and here; the records come again
                    assignment = consumer.assignment()
                    parts = {tp: recs for tp, recs in batch.items() if recs and tp in assignment}
                    written = await loop.run_in_executor(None, self._write, parts, to_rows, limits)
                    try:
                        await consumer.commit({TopicPartition(tp.topic, tp.partition): recs[-1].offset + 1
                                               for tp, recs in parts.items()})  # fmt: skip
                    except Exception as exc:
                        # the partitions moved while this batch was written (a lander paused past the session
                        # timeout, then resumed: a zombie): the new owner reads these records again, so the late
                        # files must not stay beside its own
                        removed = await loop.run_in_executor(None, self.sink.delete, written)
                        log.warning("commit refused (%s: %s); removed the batch's %d Parquet files, its "
                                    "records are landed by the partitions' new owner", type(exc).__name__, exc,
                                    removed)  # fmt: skip
        finally:
            await consumer.stop()

    def _write(self, parts: dict[Any, list[Any]], to_rows: Any, limits: Any) -> list[str]:
        t0 = time.perf_counter()
        written: list[str] = []
        for tp, recs in parts.items():
            rows = to_rows(recs, limits)
            table = TOPIC_TABLE[tp.topic]
            cols = rows.get(table)
            if cols:
                written += self.sink.write(tp.topic, tp.partition, recs[0].offset, cols)
                self.landed[table] += len(next(iter(cols.values())))
        log.debug("landed %d partitions' records as Parquet in %.3fs", len(parts), time.perf_counter() - t0)
        return written


# -- reading it back -------------------------------------------------------------------------------------
