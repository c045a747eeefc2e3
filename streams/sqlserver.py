"""The lander's SQL endpoint: user SQL over the DuckDB file the lander owns, on loopback HTTP with a bearer token.

Each query runs on a read cursor of its own in a pool thread of its own (a slow query never holds up landing),
guarded by `streams.sqlguard` (read-only, no file access, time and row bounds). The endpoint advertises itself in
`<data_dir>/lander.json` (and the token in `sql.token`), which `taoflow sql` and `streams.sqlapi.query` read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from streams.sqlapi import OWNER_FILE, TOKEN_FILE, LakeViews, write_token
from streams.sqlguard import QueryLimits, read_cursor
from streams.sqlguard import run as guarded_run
from taoflow.metrics import exposition
from taoflow.settings import Settings

log = logging.getLogger(__name__)


class SqlEndpoint:
    """Serves `/sql`, `/healthz` and `/metrics` for the lander whose connection it is given."""

    def __init__(self, settings: Settings, con: Any, health: Callable[[], dict[str, Any]],
                 metrics: CollectorRegistry) -> None:  # fmt: skip
        self.settings = settings
        self.cfg = settings.stream
        self.con = con
        self.health, self.metrics = health, metrics
        self.owner_file = settings.core.data_dir / OWNER_FILE
        # user queries get their own threads and connections: a slow query never holds up landing
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.sql_max_concurrent, thread_name_prefix="sql")
        self._free = [read_cursor(con) for _ in range(self.cfg.sql_max_concurrent)]  # idle cursors bound concurrency
        self._busy: set[Any] = set()
        self._closing = threading.Event()
        self._refresh = threading.Lock()
        self._token = ""
        self.limits = QueryLimits.from_settings(self.cfg)
        self._lake = LakeViews(self.cfg.parquet_url) if self.cfg.parquet_url else None
        self._runner: web.AppRunner | None = None

    async def start(self, db_path: Any) -> None:
        app = web.Application(client_max_size=self.cfg.sql_max_body)
        app.router.add_post("/sql", self._sql)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.sql_host, self.cfg.sql_port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        host = self.cfg.sql_advertise or ("127.0.0.1" if self.cfg.sql_host in ("0.0.0.0", "::") else self.cfg.sql_host)
        local = self.cfg.sql_advertise is None  # a remote owner's pid means nothing in another container
        self._token = write_token(self.settings.core.data_dir)  # before lander.json: clients read both
        tmp = self.owner_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "url": f"http://{host}:{port}", "db": str(db_path),
                                   "local": local}))  # fmt: skip
        os.replace(tmp, self.owner_file)
        log.info("lander owns %s; SQL on http://%s:%d", db_path, host, port)

    async def stop(self, within_s: float = 10.0) -> None:
        """Interrupt running queries (a query thread still in DuckDB would keep the process alive after SIGTERM),
        stop serving and withdraw the advertisement."""
        self._closing.set()
        deadline = time.monotonic() + within_s
        # again until they are done: an interrupt that lands before its query has started is lost
        while self._busy and time.monotonic() < deadline:
            for cur in list(self._busy):
                cur.interrupt()
            await asyncio.sleep(0.05)
        if self._runner is not None:
            await self._runner.cleanup()
        self.owner_file.unlink(missing_ok=True)
        (self.settings.core.data_dir / TOKEN_FILE).unlink(missing_ok=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        for cur in self._free:
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

    @staticmethod
    def _refuse(status: int, error: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": error}, status=status, headers=headers)

    async def _sql(self, request: web.Request) -> web.Response:
        refuse = self._refuse
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
            result = await loop.run_in_executor(self.pool, self._query, cur, query)
        finally:
            self._busy.discard(cur)
            self._free.append(cur)
        return web.Response(body=orjson.dumps(result, default=str), content_type="application/json",
                            status=400 if "error" in result else 200)  # fmt: skip

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health())

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = exposition(self.metrics)
        return web.Response(body=body, headers={"Content-Type": content_type})
