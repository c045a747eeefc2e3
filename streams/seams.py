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
- `Consumer.perform_seek` / `seek` / `getmany`: the targets a rebalance seeks to are fixed before the seek awaits the
  broker, each rebalance has a seek epoch (a fetch issued in an older epoch is dropped and read again), a partition
  with no committed offset is read from its beginning, and a record past the next expected offset of a contiguous
  input (a stale fetch after a seek) is not taken as a gap: the partition is read again from where it should be.
- `Consumer._new_offset`: faust would commit past a hole in the acks of a lane topic's head; never past one.
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
import time
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import faust
from faust.transport.drivers import aiokafka as driver

from schemas.topics import COMPACTED_TOPICS
from streams.compat import fetched_highwaters
from streams.exceptions import WorkerError

if TYPE_CHECKING:
    from streams.lane import Lane

log = logging.getLogger(__name__)

SCHEME = "taoflow"  # the broker URL scheme faust resolves to `Transport` (entry point group `faust.transports`)
RESYNC_WAIT_S = 5.0  # how long a re-seek may take to bring the expected offset before it is tried again


def check_registered() -> None:
    """The entry point faust finds `Transport` by is installed (it comes with `pip install -e .`)."""
    if not any(ep.name == SCHEME for ep in entry_points(group="faust.transports")):
        raise WorkerError(f"faust transport {SCHEME!r} is not registered: taoflow is not installed in this "
                          "environment (run `make install` or `pip install -e .`)")  # fmt: skip


class StreamApp(faust.App):  # type: ignore[misc]
    """faust's App with what this module's consumer reads: the lane, the fetch wait, the probe's connection."""

    lane: Lane | None = None
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
    - `seek_targets` is where each partition reads from after the last rebalance (the lane's continuity starts there).
    - `_expected` is the next offset the fetch loop expects per partition (a record past it is a stale fetch).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset_positions()

    def _reset_positions(self) -> None:
        self.seek_epoch = 0
        self.seek_targets: dict[Any, int] = {}
        self._expected: dict[Any, int] = {}
        self._resync: dict[Any, float] = {}
        self._tries: dict[tuple[Any, int], int] = {}

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _guarded(self, topic: str) -> bool:
        """Offsets are contiguous on this topic (acked, not compacted: the stream's inputs)."""
        return bool(self.app.topics.acks_enabled_for(topic)) and topic not in COMPACTED_TOPICS

    async def perform_seek(self) -> None:
        await super().perform_seek()
        # Everything that depends on the committed offsets just read is settled before the next await: faust's
        # recovery resumes the flow before this seek, so a fetch can complete inside any await below, and the fetch
        # loop would then move `_read_offset` to the last *fetched* offset. Snapshotting the targets after such an
        # await made the lane adopt that fetched offset as "processing resumes at", and everything below it was
        # skipped as already processed when the (dropped) batch was read again.
        #
        # aiokafka's `seek_to_committed` leaves a partition with no committed offset (or 0) where its position is.
        # After a fetch that faust discarded (flow stopped or a new generation mid-fetch, a stale epoch), that
        # position is past records nobody processed: a worker that took such a partition over began after them.
        # Those partitions are read from their beginning (target 0; a log start past 0, from retention, is a real
        # hole the lane's continuity check accepts after its re-reads).
        unset = [tp for tp in self.assignment() if self._guarded(tp.topic) and not self._read_offset.get(tp)]
        for tp in unset:
            self._read_offset[tp] = None
        targets = {tp: o for tp, o in self._read_offset.items() if o is not None}
        targets.update((tp, 0) for tp in unset)
        self.seek_targets = targets  # where each partition now reads from, for the lane's continuity check
        self.seek_epoch += 1  # a fetch completing from here on, issued before the seek, is dropped as stale
        for tp, offset in targets.items():
            self._expected[tp] = offset
            self._resync.pop(tp, None)
        if unset:
            await self._thread.seek_to_beginning(*(driver.ensure_aiokafka_TP(tp) for tp in unset))
            log.info("no committed offset: reading %s from the beginning",
                     ", ".join(f"{tp.topic}/{tp.partition}" for tp in unset))  # fmt: skip

    async def seek(self, partition: Any, offset: int) -> None:
        await super().seek(partition, offset)
        self._expected[partition] = offset

    async def getmany(self, timeout: float) -> Any:
        """faust's fetch, keeping each contiguous input partition in order.

        faust hands aiokafka fetches across threads. A batch fetched just before a rebalance can arrive after faust
        has sought its partitions back to their committed offsets; its first record then sits past the read offset,
        and faust would take the jump for a legitimate gap (as on compacted or transactional topics), commit past it
        and drop the re-fetched copies as already read. Here a record past the next expected offset is stale: it is
        dropped and the partition re-sought to the expected offset, so the records come again in order. If the jump
        persists through two re-seeks (`RESYNC_WAIT_S` apart), the offsets really do not exist (deleted by
        retention, say): the jump is accepted, with a warning.
        """
        expected, resync, tries = self._expected, self._resync, self._tries
        async for tp, message in super().getmany(timeout):
            off = message.offset
            exp = expected.get(tp)
            if exp is None or off == exp or not self._guarded(message.topic):
                expected[tp] = off + 1
                resync.pop(tp, None)
                tries.pop((tp, off), None)
                yield tp, message
                continue
            if off < exp:
                yield tp, message  # a re-delivery faust already read: it drops it itself
                continue
            now = time.monotonic()
            started = resync.get(tp)
            if started is not None and now - started < RESYNC_WAIT_S:
                continue  # the rest of a stale batch; the re-seek brings these again
            n = tries.get((tp, exp), 0)
            if n >= 2:
                log.warning("%s: offsets %d..%d do not exist (re-read twice); going on from %d", tp, exp, off - 1, off)
                expected[tp] = off + 1
                resync.pop(tp, None)
                tries.pop((tp, exp), None)
                yield tp, message
                continue
            tries[(tp, exp)] = n + 1
            resync[tp] = now
            log.warning("%s: got offset %d where %d was next (a stale fetch); re-reading from %d", tp, off, exp, exp)
            await self.seek(tp, exp)

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
                read: dict[Any, int] = {}  # lane records' read offsets, applied once the fetch proves current
                await self.sleep(0)
                if self.should_stop:
                    break
                epoch = self.seek_epoch
                async for tp, message in getmany(timeout=1.0):
                    offset = message.offset
                    r_offset = read.get(tp, get_read_offset(tp))
                    if r_offset is not None and offset < r_offset:
                        continue  # already read (a re-delivery after a seek)
                    gap = offset - (r_offset or 0)
                    if message.topic in lane_topics:
                        # no gap accounting here: the lane's inputs have contiguous offsets, so a jump is a hole the
                        # lane's continuity check re-reads (faust's gap would let the commit pass over it)
                        if gap > 1 and r_offset:
                            log.warning("%s: fetch jumped from %d to %d", tp, r_offset, offset)
                        batches.setdefault(message.topic, []).append(message)
                        read[tp] = offset
                        continue
                    if gap > 1 and r_offset and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
                if epoch != self.seek_epoch:
                    # every partition was sought back to its committed offset (a rebalance) while this fetch was in
                    # flight: its records may be from before that seek, or the first ones after it. Either way they
                    # are read again from that committed offset (the consumer's position has moved past them)
                    assigned = self.assignment()
                    for tp in read:
                        if tp in assigned:
                            log.info("%s/%d: fetch from before seek epoch %d dropped; reading again from %s",
                                     tp.topic, tp.partition, self.seek_epoch, get_read_offset(tp))  # fmt: skip
                            await self.seek(tp, get_read_offset(tp) or 0)
                    continue
                for tp, offset in read.items():
                    set_read_offset(tp, offset)
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
        the record at the commit point (or the seek target) is not acked yet, nor while neither is known."""
        lane: Lane | None = getattr(self.app, "lane", None)
        acked = self._acked[tp]
        if lane is not None and acked and tp.topic in lane.topics:
            start = self._committed_offset.get(tp)
            if start is None:
                start = self.seek_targets.get(tp)
            if start is None or min(acked) > start:
                return None  # where the partition starts is unknown (its seek has not run), or not acked yet
        return super()._new_offset(tp)  # type: ignore[no-any-return]


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
