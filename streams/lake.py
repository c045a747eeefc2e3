"""The Parquet lake as the SQL client sees it: which tables it holds, where their files are, and the DuckDB views
that read them (one row per event key). The Parquet lander (`streams.parquet`) writes these files."""

from __future__ import annotations

from typing import Any

from schemas import topics as names
from streams import store

# table -> (source topic, hive partition columns)
LAKE_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "interactions": (names.INTERACTIONS, ("date", "task_type")),
    "scores": (names.SCORES, ("date", "task_type")),
    "utility_history": (names.UTILITIES, ("date", "task_type")),
    "feedback": (names.FEEDBACK, ("date",)),
    "dead_letters": (names.DEAD_LETTERS, ("date",)),
}


def open_root(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, root path inside it) for a directory or URL."""
    from pathlib import Path

    from pyarrow import fs

    if "://" not in url:
        path = Path(url).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return fs.LocalFileSystem(), path.as_posix()
    filesystem, root = fs.FileSystem.from_uri(url)
    if isinstance(filesystem, fs.LocalFileSystem):
        filesystem.create_dir(root, recursive=True)
    return filesystem, root.rstrip("/")


def glob_url(url: str, table: str) -> str:
    """What DuckDB's read_parquet reads for a table (local paths resolved; URLs as given)."""
    if "://" not in url:
        from pathlib import Path

        return f"{Path(url).expanduser().resolve().as_posix()}/{table}/**/*.parquet"
    if url.startswith("file://"):
        url = url[len("file://") :]
    return f"{url.rstrip('/')}/{table}/**/*.parquet"


_DEDUPE_KEYS = {t: store.KEYS[t] for t in LAKE_TABLES}


_PRESENT: set[tuple[str, str]] = set()  # (url, table) known to have files (files are never all removed)


def has_files(url: str, table: str) -> bool:
    if (url, table) in _PRESENT:
        return True
    if "://" not in url or url.startswith("file://"):
        import glob

        found = next(glob.iglob(glob_url(url, table), recursive=True), None) is not None
    else:
        from pyarrow import fs

        filesystem, root = open_root(url)
        selector = fs.FileSelector(f"{root}/{table}", recursive=True, allow_not_found=True)
        found = any(i.base_name.endswith(".parquet") for i in filesystem.get_file_info(selector))
    if found:
        _PRESENT.add((url, table))
    return found


def lake_views(con: Any, url: str, schema: str = "lake") -> list[str]:
    """(Re)create `<schema>.<table>` views over the Parquet files, one row per event key (a producer may have
    sent an event twice), with the hive `date` column; a table with no file yet gets an empty view of the same
    columns (needs `main.<table>`). Returns the tables that have files."""
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    present = []
    for table, (_, hive) in LAKE_TABLES.items():
        if has_files(url, table):
            present.append(table)
            types = ", ".join(f"'{c}': {'DATE' if c == 'date' else 'VARCHAR'}" for c in hive)
            src = (
                f"read_parquet('{glob_url(url, table)}', hive_partitioning = true, union_by_name = true, "
                f"hive_types = {{{types}}})"
            )
            keys = ", ".join(_DEDUPE_KEYS[table])
            con.execute(
                f"CREATE OR REPLACE VIEW {schema}.{table} AS SELECT * FROM {src} "
                f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY landed_at) = 1"
            )
        else:
            con.execute(f"CREATE TABLE IF NOT EXISTS {schema}._empty_{table} AS SELECT * FROM main.{table} LIMIT 0")
            con.execute(f"ALTER TABLE {schema}._empty_{table} ADD COLUMN IF NOT EXISTS landed_at TIMESTAMPTZ")
            con.execute(
                f"CREATE OR REPLACE VIEW {schema}.{table} AS SELECT *, NULL::DATE AS date FROM {schema}._empty_{table}"
            )
    return present
