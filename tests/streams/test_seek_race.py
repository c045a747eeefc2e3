"""Where a partition resumes after a rebalance, against a fetch that completes inside the seek: broker-free,
deterministic, milliseconds.

Each input partition resumes at the position recovered with the tables (`streams.positions`); Kafka's committed offset
counts only for a partition with no position. faust's recovery resumes the flow before `perform_seek`, so a fetch
issued before the seek can complete while the seek awaits the broker. The worker's real `perform_seek` and fetch loop
(`streams.seams.Consumer`, over faust's own `perform_seek`) run on a consumer whose broker side is faked, with the
fetch forced to land inside that await. An earlier version snapshotted the targets after such an await and took the
last *fetched* offset for "processing resumes at"; the lane then skipped everything below it as processed (the
takeover test's lost records: last commit 1704 + a 2000-record fetch - 1 = 3703).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from streams.lane import Lane
from streams.seams import Consumer

INTERACTIONS = "taoflow.interactions"
COMMITTED = TP(INTERACTIONS, 0)  # the killed worker committed 1704 on this partition, and its position is 1704 too
UNSET = TP(INTERACTIONS, 1)  # neither a commit nor a position: the seek sends it to its beginning
AHEAD = TP(INTERACTIONS, 3)  # committed 500 (commits lag), position 900: processing resumes at 900
BOGUS = TP(INTERACTIONS, 4)  # someone committed 10_000 by hand (a wrong commit): position 40 wins, nothing skipped


class _Message(SimpleNamespace):
    pass


def _records(tp: TP, first: int, n: int) -> list[_Message]:
    return [_Message(tp=tp, topic=tp.topic, partition=tp.partition, offset=o, generation_id=1)
            for o in range(first, first + n)]  # fmt: skip


class _Lane:
    """What the fetch loop hands over (the real Lane's continuity check is exercised below)."""

    topics = frozenset({INTERACTIONS})

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[Any], int]] = []

    async def put(self, topic: str, messages: list[Any], epoch: int) -> None:
        self.batches.append((topic, messages, epoch))


class FakeConsumer(Consumer):
    """The worker's consumer with its broker side faked: the attributes its `perform_seek`, `seek` and fetch loop (and
    faust's `perform_seek` under them) use; faust's constructor, its thread and everything else are absent."""

    consumer_stopped_errors = (RuntimeError,)

    def __init__(self, in_flight: list[_Message]) -> None:  # no super().__init__: no faust service, no thread
        self._reset_positions()
        positions = {COMMITTED: 1704, AHEAD: 900, BOGUS: 40}  # as recovered with the tables
        self.app = SimpleNamespace(lane=_Lane(), topics=SimpleNamespace(acks_enabled_for=lambda t: True),
                                   recovered_positions=lambda tps: {tp: positions[tp] for tp in tps if tp in positions})
        self.transport = SimpleNamespace(app=SimpleNamespace(should_stop=False))
        self._read_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._read_offset.update({COMMITTED: 1000, UNSET: None})  # before the rebalance
        self._committed_offset: dict[TP, int | None] = {}
        self._stopped = asyncio.Event()
        self._crashed = asyncio.Event()
        self.suspend_flow = asyncio.Event()
        self._n_acked = 0
        self._commit_every = None
        self.callback = None
        self.log = SimpleNamespace(dev=lambda *a: None)
        self.sought: list[tuple[TP, int]] = []
        self.fetch_ready = asyncio.Event()  # the in-flight fetch completes when this is set
        self.fetch_done = asyncio.Event()  # the fetch loop has handled it
        self.fetching = asyncio.Event()  # the fetch loop waits for the in-flight fetch
        self.in_flight = in_flight

    def assignment(self) -> set[TP]:
        return {COMMITTED, UNSET, AHEAD, BOGUS}

    async def seek_to_committed(self) -> dict[TP, int]:
        return {COMMITTED: 1704, UNSET: -1, AHEAD: 500, BOGUS: 10_000}

    async def _seek(self, tp: TP, offset: int) -> None:
        self.sought.append((tp, offset))
        if not self.fetch_ready.is_set():
            # the first seek's broker round trip: the in-flight fetch completes during it
            self.fetch_ready.set()
            await self.fetch_done.wait()

    async def sleep(self, s: float) -> None:
        await asyncio.sleep(s)

    async def wait_first(self, *coros: Any) -> None:
        await coros[0]
        for c in coros[1:]:
            c.close()

    async def commit(self) -> None:  # pragma: no cover - commit_every is None
        raise AssertionError("no commit expected")

    async def getmany(self, timeout: float) -> Any:
        if self.in_flight:
            self.fetching.set()
            await self.fetch_ready.wait()
            batch, self.in_flight = self.in_flight, []
            for m in batch:
                yield m.tp, m
            return
        self.fetch_done.set()
        self._stopped.set()  # one fetch is all this test needs


async def _rebalance_with_fetch_inside_the_seek(waiting_before_seek: bool) -> FakeConsumer:
    # a 2000-record fetch from the committed offset that lands while perform_seek awaits the broker; the fetch loop
    # is either already waiting for it when the rebalance's seek starts, or starts waiting during the seek
    consumer = FakeConsumer(_records(COMMITTED, 1704, 2000))
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    drain = asyncio.create_task(consumer._drain_messages(fetcher))
    if waiting_before_seek:
        await consumer.fetching.wait()
    await asyncio.wait_for(consumer.perform_seek(), 5)
    await asyncio.wait_for(drain, 5)
    return consumer


def _lane_from(consumer: FakeConsumer) -> Lane:
    lane = Lane.__new__(Lane)  # only its continuity check, from the targets the seek left
    lane._next = dict(consumer.seek_targets)
    lane._holes, lane._reseek, lane._gaps, lane._unseeked = {}, [], [], set()
    return lane


@pytest.mark.parametrize("waiting_before_seek", [True, False], ids=["fetch-issued-before-seek", "fetch-during-seek"])
def test_partitions_resume_at_their_recovered_positions_even_when_a_fetch_lands_inside_the_seek(
    waiting_before_seek: bool,
) -> None:
    consumer = asyncio.run(_rebalance_with_fetch_inside_the_seek(waiting_before_seek))
    targets = consumer.seek_targets
    # processing resumes at each recovered position, whatever Kafka's committed offset says; a partition with neither
    # a position nor a commit from its beginning
    assert targets == {COMMITTED: 1704, UNSET: 0, AHEAD: 900, BOGUS: 40}
    assert consumer.seek_epoch == 1
    # faust's commit point follows: a run of acks from the position is committable, nothing below it
    assert {tp: consumer._committed_offset[tp] for tp in targets} == targets
    moved = {(UNSET, 0), (AHEAD, 900), (BOGUS, 40)}  # faust's own seek left the rest where the commit is
    batches = consumer.app.lane.batches
    if waiting_before_seek:
        # the fetch was waited for before the seek: stale, nothing of it reached the lane, and its partition is
        # read again from its position
        assert batches == []
        assert set(consumer.sought) == moved | {(COMMITTED, 1704)}
    else:
        # waited for after the seek: it is current, and the lane takes every record of it from the target on
        assert set(consumer.sought) == moved
        [(_topic, messages, epoch)] = batches
        assert epoch == 1
        assert [m.offset for m in _lane_from(consumer)._continuous(messages)] == list(range(1704, 3704))


def test_the_lane_reads_every_record_from_the_targets_after_such_a_seek() -> None:
    consumer = asyncio.run(_rebalance_with_fetch_inside_the_seek(True))
    lane = _lane_from(consumer)
    # the same 2000 records read again after the seek, and partition 1 from its beginning: none is skipped
    kept = lane._continuous(_records(COMMITTED, 1704, 2000) + _records(UNSET, 0, 50))
    assert [m.offset for m in kept if m.tp == COMMITTED] == list(range(1704, 3704))
    assert [m.offset for m in kept if m.tp == UNSET] == list(range(50))
    # a stale fetch from past the beginning of the partition with no commit is a hole, read again from 0
    lane._next[UNSET] = 0
    assert lane._continuous(_records(UNSET, 2000, 10)) == []
    assert lane._reseek == [(UNSET, 0)]


NEW = TP(INTERACTIONS, 2)  # assigned by the rebalance whose seek has not run yet


def test_records_of_a_partition_the_last_seek_did_not_cover_are_not_processed() -> None:
    """Seed 320 of the default-size campaign: faust resumed fetching for a newly assigned partition before that
    rebalance's seek; the lane took its records from offset 721 (no expected offset), their acks let faust commit
    past 368..720, and a later owner resumed from that commit: records lost. Now they wait for the seek."""
    consumer = asyncio.run(_rebalance_with_fetch_inside_the_seek(True))
    lane = _lane_from(consumer)
    assert NEW not in lane._next
    assert lane._continuous(_records(NEW, 721, 20)) == []  # dropped: read again from the seek's target
    assert lane._continuous(_records(NEW, 741, 5)) == []
    lane._next[NEW] = 368  # the next epoch's target (the committed offset)
    assert [m.offset for m in lane._continuous(_records(NEW, 368, 400))] == list(range(368, 768))


def test_a_wrong_commit_cannot_skip_records() -> None:
    """A committed offset past the recovered position (set by hand, or by a bug) no longer decides anything: the
    partition is read from its position, every record once."""
    consumer = asyncio.run(_rebalance_with_fetch_inside_the_seek(False))
    lane = _lane_from(consumer)
    assert [m.offset for m in lane._continuous(_records(BOGUS, 40, 100))] == list(range(40, 140))


def test_no_commit_of_a_lane_partition_whose_start_is_unknown() -> None:
    """faust's own rule would commit the first run of acks (721..740) with no committed offset or seek target
    known; the commit point could then pass records never processed."""
    consumer = FakeConsumer([])
    consumer.app.lane.topics = frozenset({INTERACTIONS})
    consumer._acked = defaultdict(list, {NEW: list(range(721, 741))})
    consumer._acked_index = defaultdict(set, {NEW: set(range(721, 741))})
    consumer._gap = defaultdict(list)
    consumer._committed_offset = defaultdict(lambda: None)  # as faust keeps it: no commit known for NEW
    assert Consumer._new_offset(consumer, NEW) is None
    consumer._committed_offset[NEW] = 721  # the seek ran and the partition resumes there: the run is committable
    assert Consumer._new_offset(consumer, NEW) == 741
