"""taoflow's specialisations of faust, all in this module, all through faust's own seams.

Nothing of faust, mode or aiokafka is replaced process-wide. The worker's App names its brokers `taoflow://host:port`;
faust looks that scheme up in its `faust.transports` entry point group, where pyproject.toml registers `Transport`
below, and builds this module's `Consumer` (and through it `ConsumerThread`) for that App only. Another faust App in
the same process, with `kafka://` brokers, gets faust's own classes. The worker class is a subclass handed to faust
the way faust's own CLI does it. `tests/streams/test_contract.py` checks every faust and aiokafka internal these
classes use, by name and signature, against the exactly pinned versions (pyproject.toml): an upgrade that moves one
fails there, loudly, before anything runs.

What is specialised, and why:
- `Consumer._drain_messages`: faust's fetch loop delivers each record on its own through a conductor, a channel and a
  stream (most of the worker's time, by py-spy). For the lane's topics (`streams.lane`) it hands each fetch's records
  to the lane as one list; other topics (none today) keep faust's path.
- `Consumer.perform_seek`: each input partition resumes at the position recovered with the tables
  (`streams.positions`), not at Kafka's committed offset; the targets are fixed before the seek awaits the broker, and
  each rebalance has a seek epoch (a fetch issued in an older epoch is dropped and read again).
- `Consumer.on_partitions_assigned`: a worker back under a new member id (it was out of the group) drops its tables
  and recovers them whole, so nothing it wrote as a zombie survives in its memory.
- `Consumer._new_offset`: faust would commit past a hole in the acks of a lane topic's head; never past one.
- `Table.apply_changelog_batch`, `Recovery._build_highwaters` (through `TableManager`, the App's class-valued
  `TableManager` and `Table` settings): epochs on the changelogs, so a replaced owner's late writes are never recovered.
- `ConsumerThread.highwaters`: the embedded broker under-reports ListOffsets(latest) after batched writes, and faust
  sizes table recovery by it; the high watermark fetch responses carry is taken instead (the two agree on Kafka).
- `ConsumerThread._create_worker_consumer`: faust hard-codes a 1.5 s fetch wait, seen directly as latency on every
  hop of a pipeline; the App's `fetch_wait_ms` is used.
- `bounded_worker_class`: a stop bounded in time even when the broker is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import faust
from faust.tables.manager import TableManager as FaustTableManager
from faust.tables.recovery import Recovery as FaustRecovery
from faust.transport.drivers import aiokafka as driver

from schemas.topics import COMPACTED_TOPICS
from streams.compat import fetched_highwaters
from streams.exceptions import WorkerError

if TYPE_CHECKING:
    from streams.lane import Lane

log = logging.getLogger(__name__)

SCHEME = "taoflow"  # the broker URL scheme faust resolves to `Transport` (entry point group `faust.transports`)


def check_registered() -> None:
    """The entry point faust finds `Transport` by is installed (it comes with `pip install -e .`)."""
    if not any(ep.name == SCHEME for ep in entry_points(group="faust.transports")):
        raise WorkerError(f"faust transport {SCHEME!r} is not registered: taoflow is not installed in this "
                          "environment (run `make install` or `pip install -e .`)")  # fmt: skip


class StreamApp(faust.App):  # type: ignore[misc]
    """faust's App with what this module's consumer reads: the lane, the fetch wait, the probe's connection."""

    lane: Lane | None = None
    fencing: Any = None  # streams.positions.Fencing
    recovered_positions: Any = None  # (input TPs) -> {tp: offset} recovered with the tables
    fetch_wait_ms: int | None = None
    bootstrap: str = ""
    security: dict[str, Any] = {}  # noqa: RUF012 - replaced per instance, never mutated


class ConsumerThread(driver.AIOKafkaConsumerThread):  # type: ignore[misc]
    """faust's aiokafka consumer thread, with fetch-confirmed high watermarks and the App's fetch wait."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(self.app, "fetch_wait_ms", None)
        if wait is not None:
            consumer._fetch_max_wait_ms = wait  # read when the consumer starts its fetcher
        return consumer

    async def highwaters(self, *partitions: Any) -> Mapping[Any, int]:
        reported = await self.call_thread(self._highwaters, partitions)
        if self.consumer.in_transaction:
            return reported  # type: ignore[no-any-return]
        app = self.app
        true = await fetched_highwaters(getattr(app, "bootstrap", ""), partitions, reported,
                                        getattr(app, "security", {}))  # fmt: skip
        fixed = sum(1 for tp, hw in true.items() if hw != reported.get(tp))
        if fixed:
            log.info("corrected %d high watermarks the broker under-reported", fixed)
        return true


class Consumer(driver.Consumer):  # type: ignore[misc]
    """faust's aiokafka consumer, delivering the lane's topics to the lane whole and never skipping their records.

    Position bookkeeping, all on this object:
    - `seek_epoch` counts the rebalances' seeks; a fetch issued in an older epoch may be stale and is read again.
    - `seek_targets` is where each input partition resumes after the last rebalance: its recovered position. The
      lane's continuity check (`streams.lane.Lane._continuous`) starts there and is the one judge, record by record,
      of what is processed next; nothing here filters the lane's records by offset.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset_positions()

    def _reset_positions(self) -> None:
        self.seek_epoch = 0
        self.seek_targets: dict[Any, int] = {}

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _guarded(self, topic: str) -> bool:
        """Offsets are contiguous on this topic (acked, not compacted: the stream's inputs)."""
        return bool(self.app.topics.acks_enabled_for(topic)) and topic not in COMPACTED_TOPICS

    async def perform_seek(self) -> None:
        """Seek every input partition to its recovered position (`streams.positions`): the one place where a partition
        resumes. faust's own seek (to the committed offsets) runs first; Kafka's committed offset counts only for a
        partition with no position yet (a new deployment), and with neither, the partition is read from its beginning.

        Everything is settled before the first await: faust's recovery resumes the flow before this seek, so a fetch
        can complete inside any await below. A fetch issued before the seek epoch moved is dropped by the fetch loop
        and the lane (and read again from these targets)."""
        await super().perform_seek()
        app = self.app
        guarded = [tp for tp in self.assignment() if self._guarded(tp.topic)]
        recover = getattr(app, "recovered_positions", None)
        recovered = recover(guarded) if recover is not None else {}
        targets: dict[Any, int] = {}
        moves: list[tuple[Any, int]] = []
        fallback: list[str] = []
        for tp in guarded:
            committed = self._read_offset.get(tp)
            target = recovered.get(tp)
            if target is None:
                target = committed or 0
                fallback.append(f"{tp.topic}/{tp.partition}@{target}")
            targets[tp] = target
            if target != committed:
                moves.append((tp, target))
            self._read_offset[tp] = target
            # faust commits a run of acked offsets from its commit point: for an input partition that is the position
            # processing resumes at (Kafka's committed offset only follows it, for lag)
            self._committed_offset[tp] = target
        self.seek_targets = targets  # where each partition now reads from: the lane's continuity starts there
        self.seek_epoch += 1  # a fetch completing from here on, issued before the seek, is dropped as stale
        if fallback:
            log.info("no recovered position (committed offset, or the beginning): %s", ", ".join(sorted(fallback)))
        for tp, offset in moves:
            await self._seek(tp, offset)

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        """A worker that comes back under a new member id was out of the group (paused past the session timeout, cut
        off): what it wrote meanwhile, as a zombie, may be in its tables but not in what the new owners recovered
        (`streams.positions`). It drops its tables and rebuilds them from the changelogs before recovery starts."""
        fencing = getattr(self.app, "fencing", None)
        if fencing is not None:
            coordinator = getattr(getattr(self._thread, "_consumer", None), "_coordinator", None)
            member = getattr(coordinator, "member_id", None)
            if fencing.rejoined(member):
                log.warning("this worker rejoined the group as a new member (it was paused or cut off): its tables "
                            "are dropped and recovered from the changelogs")  # fmt: skip
                fencing.drop_state(self.app)
        await super().on_partitions_assigned(assigned, generation_id)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - runs in the worker
        """faust's fetch loop, handing each fetch's records of a lane topic to the lane as one list, keeping faust's
        read offsets per record. Other topics (and an App without a lane) take faust's own loop."""
        lane: Lane | None = getattr(self.app, "lane", None)
        if lane is None:
            await super()._drain_messages(fetcher)
            return
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        lane_topics = lane.topics
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                batches: dict[str, list[Any]] = {}
                fetched: set[Any] = set()  # the lane's partitions this fetch brought records of
                await self.sleep(0)
                if self.should_stop:
                    break
                epoch = self.seek_epoch
                async for tp, message in getmany(timeout=1.0):
                    if message.topic in lane_topics:
                        # taken whole: which of them are processed is the lane's continuity check's decision alone
                        batches.setdefault(message.topic, []).append(message)
                        fetched.add(tp)
                        continue
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # already read (a re-delivery after a seek)
                    gap = offset - (r_offset or 0)
                    if gap > 1 and r_offset and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
                if epoch != self.seek_epoch:
                    # every input partition was sought to its recovered position (a rebalance) while this fetch was in
                    # flight: its records may be from before that seek, or the first ones after it. Either way the
                    # lane drops them (fetched in an older epoch) and they are read again from that position (the
                    # consumer's position may have moved past them)
                    assigned = self.assignment()
                    for tp in fetched:
                        target = self.seek_targets.get(tp)
                        if tp in assigned and target is not None:
                            log.info("%s/%d: fetch from before seek epoch %d dropped; reading again from %d",
                                     tp.topic, tp.partition, self.seek_epoch, target)  # fmt: skip
                            await self._seek(tp, target)
                    continue
                for topic, messages in batches.items():
                    await self.wait_first(lane.put(topic, messages, epoch), self.suspend_flow.wait())
                if self._n_acked >= (self._commit_every or float("inf")):
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise

    def _new_offset(self, tp: Any) -> int | None:
        """faust commits the first run of consecutive acked offsets, checking the head only loosely (a one-offset
        hole passes, and with no committed offset known, any hole does). For the lane's inputs, never commit while
        the record at the commit point (set to the recovered position by `perform_seek`) is not acked yet, nor before
        that seek. The commit serves lag monitoring: where a partition resumes is its recovered position."""
        lane: Lane | None = getattr(self.app, "lane", None)
        acked = self._acked[tp]
        if lane is not None and acked and tp.topic in lane.topics:
            start = self._committed_offset.get(tp)
            if start is None or min(acked) > start:
                return None  # where the partition starts is unknown (its seek has not run), or not acked yet
        return super()._new_offset(tp)  # type: ignore[no-any-return]


class Table(faust.Table):  # type: ignore[misc]
    """faust's Table, applying from its changelog only the records of the partition's current epoch and later
    (`streams.positions.EpochFilter`): in recovery and in standby replication alike."""

    def apply_changelog_batch(self, batch: Any) -> None:
        fencing = getattr(self.app, "fencing", None)
        if fencing is not None:
            keep = fencing.filter.keep
            batch = [e for e in batch
                     if keep(e.message.tp, e.message.offset, e.message.key, e.message.headers)]  # fmt: skip
        super().apply_changelog_batch(batch)


class Recovery(FaustRecovery):  # type: ignore[misc]
    """faust's table recovery; before it sizes the active changelog partitions to read, this worker appends its epoch
    marker to each, so what it recovers includes everything written before its epoch began (`streams.positions`)."""

    async def _build_highwaters(self, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        fencing = getattr(self.app, "fencing", None)
        if fencing is not None and title == "active":
            await fencing.begin_epochs(tps)
        await super()._build_highwaters(consumer, tps, destination, title)


class TableManager(FaustTableManager):  # type: ignore[misc]
    """faust's table manager with this module's `Recovery`."""

    @property
    def recovery(self) -> FaustRecovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


class Transport(driver.Transport):  # type: ignore[misc]
    """faust's aiokafka transport with this module's consumer; registered as `taoflow` (pyproject.toml)."""

    Consumer = Consumer


def bounded_worker_class(stop_timeout_s: float) -> type:
    """faust's Worker (through its own signal hooks) that exits at most `stop_timeout_s` after SIGTERM or SIGINT:
    faust's shutdown waits on Kafka (a last commit, the producer flush), which can take minutes when the broker is
    unreachable. What was not committed by then is read again by the partitions' next owner (nothing is lost)."""

    class BoundedWorker(faust.Worker):  # type: ignore[misc]
        def _arm(self) -> None:
            def exit_now() -> None:
                log.warning("worker did not stop within %.0fs (broker unreachable?); exiting now", stop_timeout_s)
                logging.shutdown()
                os._exit(3)

            timer = threading.Timer(stop_timeout_s, exit_now)
            timer.daemon = True
            timer.start()

        def _on_sigterm(self) -> None:
            self._arm()
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            self._arm()
            super()._on_sigint()

    return BoundedWorker
