"""Read-only SQL over the outcome tables: through the running lander, or the file when none runs."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from streams.exceptions import QueryError
from taoflow.settings import Settings

_READ_ONLY_TYPES = {"SELECT", "EXPLAIN", "PRAGMA", "SET"}


def run_query(con: Any, sql: str) -> dict[str, Any]:
    """Run read-only statements on a cursor of `con`; the last one's result as {columns, rows} or {error}."""
    import duckdb

    cur = con.cursor()
    try:
        statements = cur.extract_statements(sql)
        if not statements:
            return {"error": "empty query"}
        for st in statements:
            kind = str(st.type).rsplit(".", 1)[-1]
            if kind not in _READ_ONLY_TYPES:
                return {"error": f"only read-only statements are allowed here, not {kind}"}
        for st in statements[:-1]:
            cur.execute(st)
        cur.execute(statements[-1])
        columns = [d[0] for d in cur.description or []]
        return {"columns": columns, "rows": [list(r) for r in cur.fetchall()]}
    except duckdb.Error as exc:
        return {"error": str(exc).splitlines()[0]}
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


def query(sql: str, settings: Settings | None = None, timeout: float = 60.0) -> QueryResult:
    """Run SQL over the outcome tables, also while ingestion runs (no lock errors, worker keeps going)."""
    settings = settings or Settings()
    owner = settings.core.data_dir / "lander.json"
    info: dict[str, Any] | None = None
    try:
        info = json.loads(owner.read_text())
    except (FileNotFoundError, ValueError):
        info = None
    # a lander in this machine's process space is checked by pid; one in another container (shared volume,
    # advertised host) is simply asked
    if info and (not info.get("local", True) or _pid_alive(int(info.get("pid", -1)))):
        req = urllib.request.Request(
            info["url"] + "/sql", data=json.dumps({"sql": sql}).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                result = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            result = json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError):
            # a lander killed without cleaning up leaves its address behind: read the file instead
            return _query_file(settings.core.duckdb_path, sql, settings.stream.parquet_url)
        return _result(result)
    return _query_file(settings.core.duckdb_path, sql, settings.stream.parquet_url)


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
        from streams.parquet import LAKE_TABLES, _has_files, lake_views

        present = tuple(t for t in LAKE_TABLES if _has_files(self.url, t))
        if present != self.present:
            lake_views(con, self.url)
            self.present = present


def _lake_connection(path: Path, url: str) -> Any:
    """An in-memory connection with the `lake.*` views, the DuckDB file's tables (read-only) when it exists,
    and the outcome views. Without a DuckDB file (Parquet-only landing), the event tables *are* the lake."""
    import duckdb

    from streams import store
    from streams.parquet import LAKE_TABLES

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


def _query_file(path: Path, sql: str, parquet_url: str | None = None) -> QueryResult:
    import duckdb

    if parquet_url:
        con = _lake_connection(path, parquet_url)
        try:
            return _result(orjson.loads(orjson.dumps(run_query(con, sql), default=str)))
        finally:
            con.close()
    if not path.exists():
        raise QueryError(f"no outcome database at {path}; start `taoflow worker` (or `taoflow up`) first")
    _ensure_views(path)
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        raise QueryError(f"{path} is held by a process that serves no SQL endpoint: {exc}") from None
    try:
        # the same JSON-safe values the lander's endpoint returns, whichever path answered
        return _result(orjson.loads(orjson.dumps(run_query(con, sql), default=str)))
    finally:
        con.close()


def _result(result: dict[str, Any]) -> QueryResult:
    if "error" in result:
        raise QueryError(result["error"])
    return QueryResult(result["columns"], result["rows"])
