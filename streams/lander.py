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
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiokafka.abc import ConsumerRebalanceListener

from schemas import topics as names
from streams import store
from streams.landing import landing_consumer_config, to_rows
from streams.parquet import ParquetLander
from streams.sqlapi import OWNER_FILE, TOKEN_FILE, LakeViews, load_httpfs, write_token
from streams.sqlguard import QueryLimits, lock_down, read_cursor, readable_dir
from streams.sqlguard import run as guarded_run
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
    """Consumes the outcome topics in group `<app_id>-lander` and lands them; serves SQL on loopback."""

    TOPICS = (
        names.INTERACTIONS, names.FEEDBACK, names.SCORES, names.UTILITIES, names.DEAD_LETTERS, names.ADAPTERS,
        names.SESSIONS, names.LEARNER_RECORDS,
    )  # fmt: skip

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.stream
        self.db_path = settings.core.duckdb_path
        self.owner_file = settings.core.data_dir / OWNER_FILE
        self.con: Any = None
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="duckdb")
        # user queries get their own threads and connections: a slow query never holds up landing
        self.query_pool = ThreadPoolExecutor(max_workers=self.cfg.sql_max_concurrent, thread_name_prefix="sql")
        self._free: list[Any] = []  # read cursors not running a query; their number bounds concurrent queries
        self._busy: set[Any] = set()
        self._closing = threading.Event()
        self._refresh = threading.Lock()
        self._token = ""
        self.limits = QueryLimits.from_settings(self.cfg)
        self._hist: Any = None
        self.landed: dict[str, int] = defaultdict(int)
        self.last_land_s = 0.0
        self.land_seconds: list[float] = []  # per landed batch, drained by each scrape
        self.lag: dict[str, int] = {}  # topic/partition -> records behind the broker's high-water mark
        self._lake = LakeViews(self.cfg.parquet_url) if self.cfg.parquet_url else None

    def lag_total(self) -> int:
        return sum(self.lag.values())

    def metrics_text(self) -> bytes:
        """Prometheus exposition: rows landed per table, landing batch seconds, consumer lag per partition."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

        reg = CollectorRegistry()
        rows = Counter("taoflow_lander_rows", "Rows landed in DuckDB", ["table"], registry=reg)
        for table, n in self.landed.items():
            rows.labels(table).inc(n)
        lag = Gauge("taoflow_lander_lag_records", "Records not landed yet", ["partition"], registry=reg)
        for tp, n in self.lag.items():
            lag.labels(tp).set(n)
        buckets = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
        doc = "Seconds to land one batch, DuckDB commit included"
        hist = self._hist or Histogram("taoflow_lander_batch_seconds", doc, registry=None, buckets=buckets)
        self._hist = hist
        for sec in self.land_seconds:
            hist.observe(sec)
        self.land_seconds.clear()
        reg.register(hist)
        return bytes(generate_latest(reg))

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
        self._free = [read_cursor(self.con) for _ in range(self.cfg.sql_max_concurrent)]
        # no file or network access but the lake (landing registers its Arrow batches, so it needs none), on top of
        # sqlguard.check and read-only transactions for user SQL
        url = self.cfg.parquet_url
        if url and "://" in url and not url.startswith("file://"):
            load_httpfs(self.con)  # autoloading is off once locked
        lock_down(self.con, readable=[readable_dir(url)] if url else [])
        server = await self._serve_sql()
        try:
            await self._consume(stop)
        finally:
            await self._stop_queries()
            await server.cleanup()
            self.owner_file.unlink(missing_ok=True)
            (self.settings.core.data_dir / TOKEN_FILE).unlink(missing_ok=True)
            self.query_pool.shutdown(wait=True, cancel_futures=True)
            for cur in self._free:
                cur.close()
            self.con.close()
            self.pool.shutdown(wait=False)

    async def _stop_queries(self, within_s: float = 10.0) -> None:
        """Interrupt running queries: a query thread still in DuckDB would keep the process alive after SIGTERM."""
        self._closing.set()
        deadline = time.monotonic() + within_s
        # again until they are done: an interrupt that lands before its query has started is lost
        while self._busy and time.monotonic() < deadline:
            for cur in list(self._busy):
                cur.interrupt()
            await asyncio.sleep(0.05)

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
            self.land_seconds.append(self.last_land_s)
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

    def _query(self, cur: Any, sql: str) -> dict[str, Any]:
        if self._lake is not None:
            with self._refresh:  # concurrent queries would otherwise recreate the same views at once
                try:
                    self._lake.refresh(self.con)
                except Exception as exc:  # a lake that cannot be read must not take the SQL endpoint down
                    log.warning("could not refresh the lake views: %s", exc)
        return guarded_run(cur, sql, self.limits, self._closing)

    def _authorized(self, header: str | None) -> bool:
        expected = f"Bearer {self._token}".encode()
        return bool(self._token) and hmac.compare_digest((header or "").encode(), expected)

    async def _serve_sql(self) -> Any:
        from aiohttp import web

        def refuse(status: int, error: str, headers: dict[str, str] | None = None) -> web.Response:
            return web.json_response({"error": error}, status=status, headers=headers)

        async def sql(request: web.Request) -> web.Response:
            # who is asking and what they send is checked before a byte of the body is read
            if not self._authorized(request.headers.get("Authorization")):
                token = self.settings.core.data_dir / TOKEN_FILE
                why = f"the SQL endpoint wants `Authorization: Bearer <token>` with the token in {token}"
                bearer = {"WWW-Authenticate": "Bearer"}
                return refuse(401, f"{why} (taoflow sql and streams.sqlapi.query send it)", bearer)
            if request.content_type != "application/json":
                return refuse(415, f'send Content-Type: application/json with {{"sql": "SELECT ..."}}, '
                                   f"not {request.content_type}")  # fmt: skip
            if request.content_length is not None and request.content_length > self.cfg.sql_max_body:
                return refuse(413, f"the request body is larger than {self.cfg.sql_max_body} bytes (sql_max_body)")
            try:
                body = await request.json()
                query = body["sql"]
            except web.HTTPRequestEntityTooLarge:
                return refuse(413, f"the request body is larger than {self.cfg.sql_max_body} bytes (sql_max_body)")
            except (ValueError, KeyError, TypeError):
                return refuse(400, 'send JSON {"sql": "SELECT ..."}')
            if not isinstance(query, str):
                return refuse(400, 'send JSON {"sql": "SELECT ..."} with the query as a string')
            if self._closing.is_set():
                return refuse(503, "the lander is shutting down; retry when the next one has taken over")
            if not self._free:
                return refuse(429, f"{self.cfg.sql_max_concurrent} queries are running (sql_max_concurrent); "
                                   "retry when one has finished")  # fmt: skip
            cur = self._free.pop()
            self._busy.add(cur)
            try:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.query_pool, self._query, cur, query)
            finally:
                self._busy.discard(cur)
                self._free.append(cur)
            return web.Response(body=orjson.dumps(result, default=str), content_type="application/json",
                                status=400 if "error" in result else 200)  # fmt: skip

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"ok": True, "landed": dict(self.landed), "last_land_s": self.last_land_s,
                                      "lag": self.lag_total()})  # fmt: skip

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=self.metrics_text(), content_type="text/plain", charset="utf-8")

        app = web.Application(client_max_size=self.cfg.sql_max_body)
        app.router.add_post("/sql", sql)
        app.router.add_get("/healthz", health)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.sql_host, self.cfg.sql_port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        host = self.cfg.sql_advertise or ("127.0.0.1" if self.cfg.sql_host in ("0.0.0.0", "::") else self.cfg.sql_host)
        local = self.cfg.sql_advertise is None  # a remote owner's pid means nothing in another container
        self._token = write_token(self.settings.core.data_dir)  # before lander.json: clients read both
        tmp = self.owner_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "url": f"http://{host}:{port}", "db": str(self.db_path),
                                   "local": local}))  # fmt: skip
        os.replace(tmp, self.owner_file)
        log.info("lander owns %s; SQL on http://%s:%d", self.db_path, host, port)
        return runner


def main() -> None:
    """`taoflow lander` (and `python -m streams.lander`, as the worker starts it): run until SIGTERM/SIGINT."""
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


if __name__ == "__main__":
    main()
