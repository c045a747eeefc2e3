"""The lander: sole owner of the DuckDB file; lands topics in Arrow micro-batches and answers SQL meanwhile.

DuckDB allows one process per file, so exactly one lander holds it (others wait as standbys and take
over when it dies). Offsets are committed only after the DuckDB transaction commits, and every table is
keyed by event identity, so a crash or redelivery never loses or duplicates a row.
`taoflow sql` asks the running lander over loopback HTTP (the address is in `<data_dir>/lander.json`, the bearer
token in `<data_dir>/sql.token`), and opens the file read-only itself when no lander runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka.abc import ConsumerRebalanceListener
from prometheus_client import CollectorRegistry, Histogram

from schemas import topics as names
from streams import store
from streams.landing import landing_consumer_config, to_rows
from streams.parquet import ParquetLander
from streams.sqlapi import load_httpfs
from streams.sqlguard import lock_down, readable_dir
from streams.sqlserver import SqlEndpoint
from taoflow.metrics import DictCollector
from taoflow.settings import Settings

log = logging.getLogger(__name__)


def resume_offsets(con: Any, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Where landing resumes each partition: the offset after the last record landed, as the file says (absent: never
    landed, read from the beginning)."""
    cur = con.cursor()
    try:
        rows = cur.execute("SELECT topic, kafka_partition, next_offset FROM lander_offsets").fetchall()
    finally:
        cur.close()
    known = {(t, p): o for t, p, o in rows}
    return {tp: known[tp] for tp in partitions if tp in known}


class _ResumeFromFile(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka rebalance listener: each assigned partition is sought to where the DuckDB file says landing resumes
    (the one owner of that fact); partitions the file has never landed start from their beginning."""

    def __init__(self, consumer: Any, lander: Lander) -> None:
        self.consumer, self.lander = consumer, lander

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None  # nothing to hand over: the positions are in the file, written with the rows

    async def on_partitions_assigned(self, assigned: Any) -> None:
        tps = list(assigned)
        loop = asyncio.get_running_loop()
        known = await loop.run_in_executor(self.lander.pool, resume_offsets, self.lander.con,
                                           [(tp.topic, tp.partition) for tp in tps])  # fmt: skip
        fresh = [tp for tp in tps if (tp.topic, tp.partition) not in known]
        for tp in tps:
            offset = known.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)
        if fresh:
            await self.consumer.seek_to_beginning(*fresh)


class Lander:
    """Consumes the outcome topics in group `<app_id>-lander` and lands them; serves SQL on loopback
    (`streams.sqlserver`) while it owns the file."""

    TOPICS = (
        names.INTERACTIONS, names.FEEDBACK, names.SCORES, names.UTILITIES, names.DEAD_LETTERS, names.ADAPTERS,
        names.SESSIONS, names.LEARNER_RECORDS,
    )  # fmt: skip

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.stream
        self.db_path = settings.core.duckdb_path
        self.con: Any = None
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="duckdb")
        self.landed: dict[str, int] = defaultdict(int)
        self.last_land_s = 0.0
        self.lag: dict[str, int] = {}  # topic/partition -> records behind the broker's high-water mark
        # what its SQL endpoint's /metrics shows: rows landed per table, lag per partition, landing batch seconds
        self.registry = CollectorRegistry()
        self.registry.register(DictCollector("taoflow_lander_rows", "Rows landed in DuckDB", "table",
                                             lambda: dict(self.landed)))  # fmt: skip
        self.registry.register(DictCollector("taoflow_lander_lag_records", "Records not landed yet", "partition",
                                             lambda: dict(self.lag), kind="gauge"))  # fmt: skip
        self.batch_seconds = Histogram("taoflow_lander_batch_seconds", "Seconds to land one batch, DuckDB commit "
                                       "included", registry=self.registry,
                                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))  # fmt: skip

    def lag_total(self) -> int:
        return sum(self.lag.values())

    def _acquire(self) -> Any:
        import duckdb

        try:
            return store.connect(self.db_path)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                return None
            raise

    async def run(self, stop: asyncio.Event) -> None:
        while self.con is None:
            self.con = self._acquire()
            if self.con is None:
                log.info("%s is held by another lander; standing by", self.db_path)
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                    return
                except TimeoutError:
                    continue
        endpoint = SqlEndpoint(self.settings, self.con, self.health, self.registry)  # its cursors: before the lock
        # no file or network access but the lake (landing registers its Arrow batches, so it needs none), on top of
        # sqlguard.check and read-only transactions for user SQL
        url = self.cfg.parquet_url
        if url and "://" in url and not url.startswith("file://"):
            load_httpfs(self.con)  # autoloading is off once locked
        lock_down(self.con, readable=[readable_dir(url)] if url else [])
        await endpoint.start(self.db_path)
        try:
            await self._consume(stop)
        finally:
            await endpoint.stop()
            self.con.close()
            self.pool.shutdown(wait=False)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "landed": dict(self.landed), "last_land_s": self.last_land_s, "lag": self.lag_total()}

    async def _consume(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(**landing_consumer_config(self.settings, "lander"))
        consumer.subscribe(topics=self.TOPICS, listener=_ResumeFromFile(consumer, self))
        await consumer.start()
        limits = self.settings.limits.limits()
        loop = asyncio.get_running_loop()
        # two stages overlap: while DuckDB lands one batch (in a pool thread, mostly outside the GIL), the next
        # is fetched and turned into rows here; offsets are committed in batch order, each after its transaction
        landing: tuple[asyncio.Future[None], dict[Any, Any], float] | None = None

        async def finish() -> None:
            nonlocal landing
            if landing is None:
                return
            done, batch, t0 = landing
            landing = None
            await done
            # the file says where landing resumes (same transaction as the rows); Kafka's commit is for lag
            # monitoring and tools, and a failed commit loses nothing
            try:
                await consumer.commit({TopicPartition(tp.topic, tp.partition): recs[-1].offset + 1
                                       for tp, recs in batch.items()})  # fmt: skip
            except Exception as exc:
                log.info("offset commit for monitoring failed (landing resumes from the file): %s", exc)
            self.last_land_s = time.perf_counter() - t0
            self.batch_seconds.observe(self.last_land_s)
            for tp, recs in batch.items():
                high = consumer.highwater(tp)
                if high is not None:
                    self.lag[f"{tp.topic}/{tp.partition}"] = max(0, high - (recs[-1].offset + 1))

        try:
            while not stop.is_set():
                wait_ms = 0 if landing is not None else self.cfg.land_batch_ms
                batch = await consumer.getmany(timeout_ms=wait_ms, max_records=self.cfg.land_batch_size)
                records = [r for recs in batch.values() for r in recs]
                if not records:
                    await finish()
                    continue
                t0 = time.perf_counter()
                rows = to_rows(records, limits)
                offsets = {(tp.topic, tp.partition): recs[-1].offset + 1 for tp, recs in batch.items()}
                await finish()
                landing = (loop.run_in_executor(self.pool, self._land, rows, offsets), batch, t0)
            await finish()
        finally:
            if landing is not None:
                with contextlib.suppress(Exception):
                    await landing[0]  # never leave a transaction running under a closing connection
            await consumer.stop()

    def _land(self, rows: dict[str, dict[str, list[Any]]], offsets: dict[tuple[str, int], int]) -> None:
        cur = self.con.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            for table, cols in rows.items():
                self.landed[table] += store.insert(cur, table, cols)
            cur.executemany(
                "INSERT INTO lander_offsets VALUES (?, ?, ?) ON CONFLICT (topic, kafka_partition) DO UPDATE SET "
                "next_offset = excluded.next_offset WHERE excluded.next_offset > lander_offsets.next_offset",
                [[t, p, o] for (t, p), o in offsets.items()],
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()


def main() -> None:
    """`taoflow lander` (the worker starts one beside itself): run until SIGTERM/SIGINT."""
    logging.basicConfig(level=os.environ.get("TAOFLOW_LOG_LEVEL", "INFO"), format="lander: %(message)s")
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        parent = int(os.environ.get("_TAOFLOW_LANDER_PARENT") or os.getppid())

        async def orphan_watch() -> None:
            # a worker killed with SIGKILL cannot stop us; never outlive it holding the DuckDB file
            while not stop.is_set():
                if os.getppid() != parent:
                    log.warning("worker process %d is gone; lander stopping", parent)
                    stop.set()
                await asyncio.sleep(0.5)

        async def deadline() -> None:
            # asked to stop, a lander finishes the batch in hand and leaves; with the broker unreachable its Kafka
            # calls could wait for minutes while it holds the DuckDB file a standby must take over. Past the bound it
            # exits at once: a batch not committed is rolled back by DuckDB and delivered again (idempotent landing)
            await stop.wait()
            await asyncio.sleep(settings.stream.stop_timeout_s)
            log.warning("lander did not stop within %.0fs (broker unreachable?); exiting now",
                        settings.stream.stop_timeout_s)  # fmt: skip
            logging.shutdown()
            os._exit(3)

        watch = asyncio.create_task(orphan_watch())
        bound = asyncio.create_task(deadline())
        jobs = []
        if settings.stream.land_duckdb:
            jobs.append(Lander(settings).run(stop))
        if settings.stream.parquet_url:
            jobs.append(ParquetLander(settings).run(stop))
        try:
            await asyncio.gather(*jobs)
        finally:
            stop.set()
            watch.cancel()
            bound.cancel()

    asyncio.run(run())
