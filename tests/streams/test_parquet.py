"""Parquet landing: file layout, exactly-once clean-up of uncommitted batches, and SQL over the lake.

The scale-out run (two workers landing Parquet in parallel while one is killed) is in test_pipeline.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from streams.exceptions import QueryError
from streams.parquet import ParquetSink
from streams.sqlapi import query
from taoflow.settings import Settings

T0 = datetime(2026, 3, 1, 23, 0, tzinfo=UTC)


def interactions(ids: list[str], task_types: list[str], hours: list[int]) -> dict[str, list[Any]]:
    n = len(ids)
    return {
        "event_id": ids, "ts": [T0 + timedelta(hours=h) for h in hours], "agent_id": ["a"] * n,
        "task_type": task_types, "operator": ["op"] * n, "prompt": ["p"] * n, "prompt_is_chat": [False] * n,
        "prompt_hash": ["h"] * n, "response": ["r"] * n, "adapter": [None] * n, "latency_ms": [1.0] * n,
        "metadata": ["{}"] * n, "kafka_partition": [0] * n, "kafka_offset": list(range(n)),
    }  # fmt: skip


def scores(ids: list[str], task_types: list[str], rewards: list[float]) -> dict[str, list[Any]]:
    n = len(ids)
    return {
        "interaction_id": ids, "revision": [0] * n, "ts": [T0] * n, "task_type": task_types, "operator": ["op"] * n,
        "adapter": [None] * n, "reward": rewards, "parts": ["{}"] * n,
    }  # fmt: skip


def lake_settings(tmp_path: Path) -> Settings:
    return Settings(
        overrides={"core": {"data_dir": tmp_path / "data"}, "stream": {"parquet_url": str(tmp_path / "lake")}}
    )


def test_files_are_hive_partitioned_by_date_and_task_type(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path / "lake"))
    written = sink.write(
        "taoflow.interactions", 3, 40, interactions(["a", "b", "c"], ["qa", "qa", "code/py"], [0, 2, 2])
    )
    rel = sorted(str(Path(p).relative_to(tmp_path / "lake").parent) for p in written)
    assert rel == [
        "interactions/date=2026-03-01/task_type=qa",
        "interactions/date=2026-03-02/task_type=code%2Fpy",  # quoted in the path, read back as `code/py`
        "interactions/date=2026-03-02/task_type=qa",
    ]
    assert all(Path(p).name == f"taoflow.interactions-p3-o000000000040-{sink.writer}.parquet" for p in written)
    got = query("SELECT event_id, task_type, date FROM lake.interactions ORDER BY event_id", lake_settings(tmp_path))
    assert got.rows == [["a", "qa", "2026-03-01"], ["b", "qa", "2026-03-02"], ["c", "code/py", "2026-03-02"]]


def test_uncommitted_batches_are_removed_and_producer_duplicates_collapse(tmp_path: Path) -> None:
    cfg = lake_settings(tmp_path)
    first, second = ParquetSink(str(tmp_path / "lake")), ParquetSink(str(tmp_path / "lake"))
    first.write("taoflow.interactions", 0, 0, interactions(["a", "b"], ["qa", "qa"], [0, 0]))
    first.write("taoflow.interactions", 0, 2, interactions(["c", "d"], ["qa", "qa"], [0, 0]))  # never committed
    first.write("taoflow.interactions", 1, 0, interactions(["x"], ["qa"], [0]))
    # the lander that takes partition 0 over, committed at offset 2, clears what came from offset 2 on
    assert second.discard_uncommitted({("taoflow.interactions", 0): 2}) == 1
    assert query("SELECT list(event_id ORDER BY event_id) FROM lake.interactions", cfg).rows == [[["a", "b", "x"]]]
    # the records come again; one of them was also sent twice by its producer (two Kafka records)
    second.write("taoflow.interactions", 0, 2, interactions(["c", "d", "d"], ["qa", "qa", "qa"], [0, 0, 0]))
    # the files themselves, read directly (the SQL endpoint reads nothing but the tables and lake views)
    raw = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{tmp_path}/lake/interactions/**/*.parquet')")
    assert raw.fetchall() == [(6,)]
    assert query("SELECT count(*), count(DISTINCT event_id) FROM lake.interactions", cfg).rows == [[5, 5]]
    # a partition with nothing committed at all loses every file of its own, and only those
    assert second.discard_uncommitted({("taoflow.interactions", 1): 0}) == 1
    assert query("SELECT count(*) FROM lake.interactions", cfg).rows == [[4]]


def test_parquet_only_sql_runs_the_outcome_views_over_the_lake(tmp_path: Path) -> None:
    cfg = lake_settings(tmp_path)
    sink = ParquetSink(str(tmp_path / "lake"))
    ids = [f"i{k}" for k in range(6)]
    kinds = ["qa"] * 3 + ["code"] * 3
    sink.write("taoflow.interactions", 0, 0, interactions(ids, kinds, [0] * 6))
    sink.write("taoflow.scores", 0, 0, scores(ids, kinds, [1.0, 0.0, 0.5, 0.25, 0.25, 0.25]))
    assert not cfg.core.duckdb_path.exists()  # no DuckDB file: the event tables are the lake's
    got = query("SELECT task_type, n, mean_reward FROM improvement ORDER BY task_type", cfg).rows
    assert got == [["code", 3, 0.25], ["qa", 3, 0.5]]
    assert query("SELECT count(*) FROM feedback", cfg).rows == [[0]]  # no files yet: empty, same columns
    with pytest.raises(QueryError, match="read-only"):
        query("DELETE FROM interactions", cfg)
