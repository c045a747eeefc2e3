"""The lander keeps its input positions in the DuckDB file, written in the same transaction as the rows, and seeks
from them when partitions are assigned (broker-free: the real landing transaction and rebalance listener on a real
DuckDB file, against a consumer that records the seeks)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from streams import store
from streams.lander import Lander, _ResumeFromFile, resume_offsets
from taoflow.settings import Settings


class SeekRecorder:
    def __init__(self) -> None:
        self.seeks: dict[Any, int] = {}
        self.beginning: list[Any] = []

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks[tp] = offset

    async def seek_to_beginning(self, *tps: Any) -> None:
        self.beginning.extend(tps)


def tp(topic: str, partition: int) -> Any:
    from aiokafka import TopicPartition

    return TopicPartition(topic, partition)


@pytest.fixture
def lander(tmp_path: Path) -> Any:
    lander = Lander(Settings(overrides={"core": {"data_dir": tmp_path}}))
    lander.con = store.connect(lander.db_path)
    yield lander
    lander.pool.shutdown(wait=True)
    lander.con.close()


def test_offsets_land_with_the_rows_and_never_move_back(lander: Lander) -> None:
    lander._land({}, {("taoflow.scores", 0): 120, ("taoflow.scores", 1): 7})
    lander._land({}, {("taoflow.scores", 0): 90})  # an older batch landing late (a replay): the file keeps 120
    assert resume_offsets(lander.con, [("taoflow.scores", 0), ("taoflow.scores", 1), ("taoflow.scores", 2)]) == {
        ("taoflow.scores", 0): 120, ("taoflow.scores", 1): 7,
    }  # fmt: skip


def test_a_failed_transaction_moves_no_offset(lander: Lander) -> None:
    bad = {"interactions": {"event_id": ["x"]}}  # required columns missing: the insert fails
    with pytest.raises(Exception):  # noqa: B017 - whatever DuckDB raises, the transaction is rolled back
        lander._land(bad, {("taoflow.interactions", 0): 50})
    assert resume_offsets(lander.con, [("taoflow.interactions", 0)]) == {}


def test_assigned_partitions_resume_where_the_file_says(lander: Lander) -> None:
    lander._land({}, {("taoflow.scores", 0): 120})
    consumer = SeekRecorder()
    listener = _ResumeFromFile(consumer, lander)
    a, b = tp("taoflow.scores", 0), tp("taoflow.scores", 1)
    asyncio.run(listener.on_partitions_assigned({a, b}))
    assert consumer.seeks == {a: 120}  # not Kafka's committed offset: the file owns the position
    assert consumer.beginning == [b]  # never landed: from its beginning
