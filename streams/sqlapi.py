"""Read-only SQL over the outcome tables: through the running lander, or the file when none runs."""

from __future__ import annotations

import json
import logging
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from streams.exceptions import QueryError
from streams.sqlguard import QueryLimits, lock_down, read_cursor, readable_dir
from streams.sqlguard import run as guarded_run
from taoflow.settings import Settings

log = logging.getLogger(__name__)

OWNER_FILE = "lander.json"  # the running lander's address and pid, in the data directory
TOKEN_FILE = "sql.token"  # beside lander.json; the lander's SQL endpoint wants it as a bearer token


def write_token(data_dir: Path) -> str:
    """A fresh random token for the SQL endpoint, written readable by this user only."""
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / (TOKEN_FILE + ".tmp")
    tmp.unlink(missing_ok=True)
    # created 0600 from the start: a chmod after writing would leave a moment where others can read it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, data_dir / TOKEN_FILE)
    return token


def read_token(data_dir: Path) -> str | None:
    try:
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def run_query(con: Any, sql: str, limits: QueryLimits | None = None) -> dict[str, Any]:
    """Run one read-only SELECT on a new cursor of `con` (an instance not locked yet) under `sqlguard`'s rules;
    {columns, rows} or {error}."""
    cur = read_cursor(con)
    try:
        return guarded_run(cur, sql, limits or QueryLimits())
    finally:
        cur.close()


@dataclass
class QueryResult:
    """Column names and rows of a query."""

    columns: list[str]
    rows: list[list[Any]]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_WIDTHS = [1, 5, 15, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400]  # time-bucket widths in seconds


def bucket_width(first: Any, last: Any, buckets: int, empty: int = 3600) -> int:
    """A bucket width (seconds) giving at most `buckets` points over the span from `first` to `last`
    (`empty` when there is no span yet).

    >>> bucket_width("2026-01-01T00:00:00", "2026-01-01T01:00:00", 60)
    60
    """
    if not first or not last:
        return empty
    span = (datetime.fromisoformat(str(last)) - datetime.fromisoformat(str(first))).total_seconds()
    return next((w for w in _WIDTHS if span / w <= buckets), _WIDTHS[-1])


def running_lander(settings: Settings) -> dict[str, Any] | None:
    """What the lander that owns the file wrote about itself (`url`, `pid`, `local`), if one runs. A lander in this
    machine's process space is checked by pid; one in another container (shared volume, advertised host) is taken
    at its word (it is asked; a dead one's address fails the request)."""
    try:
        info = json.loads((settings.core.data_dir / OWNER_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(info, dict) or "url" not in info:
        return None
    if info.get("local", True) and not _pid_alive(int(info.get("pid", -1))):
        return None
    return info


def query(sql: str, settings: Settings | None = None, timeout: float = 60.0) -> QueryResult:
    """Run SQL over the outcome tables, also while ingestion runs (no lock errors, worker keeps going)."""
    settings = settings or Settings()
    limits = QueryLimits.from_settings(settings.stream)
    info = running_lander(settings)
    if info is not None:
        headers = {"Content-Type": "application/json"}
        token = read_token(settings.core.data_dir)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(info["url"] + "/sql", data=json.dumps({"sql": sql}).encode(), headers=headers)
        try:
            # the server stops a query at sql_timeout_s; wait a little longer to read its answer
            with urllib.request.urlopen(req, timeout=max(timeout, settings.stream.sql_timeout_s + 5)) as resp:
                result = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            result = json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError):
            # a lander killed without cleaning up leaves its address behind: read the file instead
            return _query_file(settings.core.duckdb_path, sql, settings.stream.parquet_url, limits)
        return _result(result)
    return _query_file(settings.core.duckdb_path, sql, settings.stream.parquet_url, limits)


def _ensure_views(path: Path) -> None:
    """A file written by an older version lacks the views: add them while nobody holds it (cheap, idempotent)."""
    import duckdb

    from streams import store

    try:
        con = duckdb.connect(str(path))
    except duckdb.Error:
        return  # held by another process: it created them when it opened the file
    try:
        has = con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'round_history'").fetchone()
        if not has or not has[0]:
            con.execute(store.DDL)
            con.execute(store.VIEWS)
    finally:
        con.close()


class LakeViews:
    """Keeps a connection's `lake.*` views (Parquet landing) in step with which tables have files yet."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.present: tuple[str, ...] | None = None

    def refresh(self, con: Any) -> None:
        from streams.lake import LAKE_TABLES, has_files, lake_views

        present = tuple(t for t in LAKE_TABLES if has_files(self.url, t))
        if present != self.present:
            lake_views(con, self.url)
            self.present = present


def _lake_connection(path: Path, url: str) -> Any:
    """An in-memory connection with the `lake.*` views, the DuckDB file's tables (read-only) when it exists,
    and the outcome views. Without a DuckDB file (Parquet-only landing), the event tables *are* the lake."""
    import duckdb

    from streams import store
    from streams.lake import LAKE_TABLES

    con = duckdb.connect()
    con.execute(store.DDL)
    if path.exists():
        try:
            con.execute(f"ATTACH '{path}' AS outcomes (READ_ONLY)")
        except duckdb.IOException as exc:
            con.close()
            raise QueryError(f"{path} is held by a process that serves no SQL endpoint: {exc}") from None
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'outcomes' "
                                            "AND schema_name = 'main'").fetchall()]  # fmt: skip
        LakeViews(url).refresh(con)
        for t in tables:
            con.execute(f"DROP TABLE IF EXISTS main.{t}")
            con.execute(f"CREATE VIEW main.{t} AS SELECT * FROM outcomes.main.{t}")
    else:
        LakeViews(url).refresh(con)
        for t in LAKE_TABLES:
            con.execute(f"DROP TABLE main.{t}")
            con.execute(f"CREATE VIEW main.{t} AS SELECT * EXCLUDE (date) FROM lake.{t}")
    con.execute(store.VIEWS)
    return con


def _query_file(path: Path, sql: str, parquet_url: str | None = None, limits: QueryLimits | None = None) -> QueryResult:
    """Answer from the file (no lander runs) on a connection locked down like the lander's: one read-only
    SELECT, no file or network access except the lake, no setting changes, a timeout."""
    import duckdb

    limits = limits or QueryLimits()
    if parquet_url:
        con = _lake_connection(path, parquet_url)
        readable = [readable_dir(parquet_url)]
        if "://" in parquet_url and not parquet_url.startswith("file://"):
            load_httpfs(con)  # autoloading is off once locked
    else:
        if not path.exists():
            raise QueryError(f"no outcome database at {path}; start `taoflow worker` (or `taoflow up`) first")
        _ensure_views(path)
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.IOException as exc:
            raise QueryError(f"{path} is held by a process that serves no SQL endpoint: {exc}") from None
        readable = []
    try:
        cur = read_cursor(con)
        lock_down(con, readable)
        # the same JSON-safe values the lander's endpoint returns, whichever path answered
        return _result(guarded_run(cur, sql, limits))
    finally:
        con.close()


def load_httpfs(con: Any) -> None:
    """Load the object-store reader now: once the connection is locked, DuckDB no longer loads it on demand."""
    import duckdb

    try:
        con.execute("LOAD httpfs")
    except duckdb.Error:
        try:
            con.execute("INSTALL httpfs")
            con.execute("LOAD httpfs")
        except duckdb.Error as exc:
            log.warning("cannot load DuckDB's httpfs extension, so the lake views cannot be read: %s", exc)


def _result(result: dict[str, Any]) -> QueryResult:
    if "error" in result:
        raise QueryError(result["error"])
    return QueryResult(result["columns"], result["rows"])
