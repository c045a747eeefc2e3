"""Outcome tables on a real DuckDB file: idempotent landing and read-only SQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from streams import store
from streams.exceptions import QueryError
from streams.sqlapi import query, run_query
from taoflow.settings import Settings

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def test_landing_is_idempotent_and_utilities_keep_the_newest(tmp_path: Path) -> None:
    con = store.connect(tmp_path / "t.duckdb")
    rows = {"task_type": ["qa", "qa", "qa"], "operator": ["a", "a", "b"], "utility": [0.1, 0.2, 0.5],
            "n": [1, 2, 1], "last_reward": [0.5, 0.5, 0.5], "ts": [NOW] * 3}  # fmt: skip
    store.insert(con, "utilities", rows)
    store.insert(con, "utilities", {**rows, "utility": [9.0, 9.0, 9.0], "n": [1, 1, 1]})  # older n: ignored
    assert con.execute("SELECT operator, utility, n FROM utilities ORDER BY 1").fetchall() == [
        ("a", 0.2, 2), ("b", 0.5, 1)]  # fmt: skip
    fb = {"event_id": ["f1", "f1", "f2"], "interaction_id": ["i"] * 3, "ts": [NOW] * 3, "kind": ["thumbs"] * 3,
          "value": [1.0, 0.0, 1.0], "metadata": ["{}"] * 3}  # fmt: skip
    store.insert(con, "feedback", fb)
    store.insert(con, "feedback", fb)  # redelivery
    assert con.execute("SELECT count(*) FROM feedback").fetchone() == (2,)
    con.close()


def test_sql_is_read_only_and_errors_are_clear(tmp_path: Path) -> None:
    settings = Settings(overrides={"core": {"data_dir": tmp_path}})
    with pytest.raises(QueryError, match="no outcome database"):
        query("SELECT 1", settings)
    con = store.connect(settings.core.duckdb_path)
    refused = run_query(con, "DROP TABLE interactions")
    assert refused["error"].startswith("DROP statements are not allowed here; send one read-only SELECT")
    con.close()
    assert query("SELECT count(*) AS n FROM interactions", settings).as_dicts() == [{"n": 0}]
    with pytest.raises(QueryError, match="Catalog Error"):
        query("SELECT * FROM nope", settings)
