"""What user SQL may do: one plain read-only SELECT on a locked-down connection, with a timeout and result caps."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger(__name__)

# Table functions a query may call. Everything else that DuckDB has reads or writes files (read_csv, read_text,
# read_blob, read_parquet, read_duckdb, glob, sniff_csv, parquet_metadata...), runs other SQL (query, query_table,
# json_execute_serialized_sql), changes state (checkpoint, enable_profiling, enable_logging) or shows secrets.
# The outcome tables' own table macros (improvement_by) are added from the catalog.
SAFE_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "json_each", "json_tree", "duckdb_tables", "duckdb_views",
    "duckdb_columns", "duckdb_schemas", "duckdb_types", "duckdb_constraints", "duckdb_indexes", "duckdb_keywords",
    "duckdb_functions", "pragma_table_info", "pragma_version",
})  # fmt: skip
# scalar functions with side effects or that show settings (an S3 key is a setting)
DENIED_FUNCTIONS = frozenset({"nextval", "setval", "currval", "current_setting", "write_log", "getenv"})
# query nodes of a plain SELECT; DELETE/INSERT/UPDATE nodes come from data-modifying CTEs
SAFE_QUERY_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
# a table name with these is a replacement scan of a file or URL (FROM '/etc/passwd', FROM 'x.csv')
_PATH_CHARS = frozenset("/\\.:*?~")
_HINT = "send one read-only SELECT (or WITH ... SELECT) over the outcome tables and lake.* views"


class RefusedQuery(Exception):
    """A query the SQL endpoint does not run; the message says why and what to send instead."""


@dataclass(frozen=True)
class QueryLimits:
    """How long a query may run and how much it may return."""

    timeout_s: float = 30.0
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_settings(cls, stream: Any) -> QueryLimits:
        return cls(stream.sql_timeout_s, stream.sql_max_rows, stream.sql_max_bytes)


def readable_dir(url: str) -> str:
    """The directory (or URL prefix) of a Parquet lake, as DuckDB's `allowed_directories` wants it."""
    if "://" not in url:
        from pathlib import Path

        return Path(url).expanduser().resolve().as_posix().rstrip("/") + "/"
    if url.startswith("file://"):
        url = url[len("file://") :]
    return url.rstrip("/") + "/"


def lock_down(con: Any, readable: Sequence[str] | None) -> None:
    """Lock the whole database instance of `con`: no extension (auto)loading and no setting changes from now on.

    With `readable` given, file and network access is also switched off except below those directories.
    Run every SET a connection of this instance will need before this (see `read_cursor`).
    """
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    if readable is not None:
        if readable:
            con.execute("SET allowed_directories = ?", [list(readable)])
        con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def read_cursor(con: Any) -> Any:
    """A connection to the same database for user queries: no lookup of Python variables by table name."""
    cur = con.cursor()
    # the replacement scan would hand any DataFrame/Arrow object in a Python frame to a query; it is per
    # connection, so the landing connection (which inserts through it) keeps it
    cur.execute("SET python_enable_replacements = false")
    return cur


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def check(cur: Any, sql: str) -> str:
    """The one statement of `sql` if it is a plain read-only SELECT; raises RefusedQuery otherwise.

    DuckDB's own parser says what the statement is: a string check cannot see `EXPLAIN ANALYZE COPY`, a
    data-modifying CTE or `read_csv` in a subquery.
    """
    import duckdb

    try:
        statements = cur.extract_statements(sql)
    except duckdb.Error as exc:
        raise RefusedQuery(str(exc).splitlines()[0]) from None
    if len(statements) != 1:
        raise RefusedQuery(f"{len(statements)} statements sent; {_HINT}")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    if kind != "SELECT":
        raise RefusedQuery(f"{kind} statements are not allowed here; {_HINT}")
    text = statements[0].query
    row = cur.execute("SELECT json_serialize_sql(?)", [text]).fetchone()
    doc = json.loads(row[0])
    if doc.get("error"):
        raise RefusedQuery(f"{doc.get('error_message', 'cannot parse the query')}; {_HINT}")
    own = "SELECT function_name FROM duckdb_functions() WHERE function_type = 'table_macro' AND NOT internal"
    macros = {r[0] for r in cur.execute(own).fetchall()}
    for node in _walk(doc["statements"]):
        node_type = str(node.get("type", ""))
        if node_type.endswith("_NODE") and node_type not in SAFE_QUERY_NODES:
            what = node_type.removesuffix("_NODE").replace("_", " ")
            raise RefusedQuery(f"{what} is not allowed here; {_HINT}")
        if node_type == "TABLE_FUNCTION":
            name = str(node.get("function", {}).get("function_name", "")).lower()
            if name not in SAFE_TABLE_FUNCTIONS and name not in macros:
                raise RefusedQuery(f"table function {name}() is not allowed here; {_HINT}")
        elif node_type in ("BASE_TABLE", "SHOW_REF"):
            name = str(node.get("table_name") or "")
            if _PATH_CHARS & set(name):
                raise RefusedQuery(f"reading {name!r} is not allowed here (no files or URLs); {_HINT}")
        elif node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in DENIED_FUNCTIONS:
            raise RefusedQuery(f"{node['function_name']}() is not allowed here; {_HINT}")
    return str(text)


def run(cur: Any, sql: str, limits: QueryLimits, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Check and run `sql` on `cur` (a `read_cursor`) in a read-only transaction, interrupted after
    `limits.timeout_s`; {columns, rows} with JSON-safe values, or {error}. `cancel` set means shut down."""
    import duckdb

    try:
        statement = check(cur, sql)
    except RefusedQuery as exc:
        return {"error": str(exc)}
    except duckdb.Error as exc:
        return {"error": str(exc).splitlines()[0]}
    if cancel is not None and cancel.is_set():
        return {"error": "the query was not run: the SQL endpoint is shutting down"}
    timed_out = threading.Event()

    def interrupt() -> None:
        timed_out.set()
        cur.interrupt()

    timer = threading.Timer(limits.timeout_s, interrupt)
    timer.daemon = True
    try:
        # read-only: even a write the checks above missed fails inside DuckDB
        cur.execute("BEGIN TRANSACTION READ ONLY")
        timer.start()
        try:
            cur.execute(statement)
            columns = [d[0] for d in cur.description or []]
            rows: list[list[Any]] = []
            size = 0
            while True:
                chunk = cur.fetchmany(10_000)
                if not chunk:
                    break
                if len(rows) + len(chunk) > limits.max_rows:
                    return {"error": f"the result has more than {limits.max_rows} rows (sql_max_rows); "
                                     "add a LIMIT or aggregate"}  # fmt: skip
                safe = orjson.loads(orjson.dumps([list(r) for r in chunk], default=str))
                size += len(orjson.dumps(safe))
                if size > limits.max_bytes:
                    return {"error": f"the result is larger than {limits.max_bytes} bytes (sql_max_bytes); "
                                     "select fewer columns or rows"}  # fmt: skip
                rows.extend(safe)
            return {"columns": columns, "rows": rows}
        finally:
            timer.cancel()
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
    except duckdb.InterruptException:
        if cancel is not None and cancel.is_set():
            return {"error": "the query was interrupted: the SQL endpoint is shutting down"}
        if timed_out.is_set():
            return {"error": f"the query ran longer than {limits.timeout_s:g}s (sql_timeout_s) and was stopped; "
                             "narrow it with WHERE or LIMIT"}  # fmt: skip
        return {"error": "the query was interrupted"}
    except duckdb.Error as exc:
        return {"error": str(exc).splitlines()[0]}
