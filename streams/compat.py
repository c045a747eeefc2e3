"""Work-arounds for broker quirks, kept in one place and harmless on Apache Kafka.

Tansu (the embedded broker) answers ListOffsets(latest) with a value below the true end of a partition
when records were written in batches (e.g. 1 for one batch of 10 records), while its fetch responses
carry the true high watermark. faust sizes table recovery by ListOffsets, so a restarted worker would
recover only part of its tables. `patch_faust_highwaters` makes faust take the larger of the two; on
Apache Kafka both agree and nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.topics import COMPACTED_TOPICS

log = logging.getLogger(__name__)


PROBE_TRY_S = 3.0  # one try of the probe, start to answers
PROBE_STOP_S = 2.0  # its consumer's stop
PROBE_TRIES = 3  # worst case 15 s, well inside faust's wait for the high watermarks (broker_request_timeout, >= 30 s)


async def fetched_highwaters(
    bootstrap: str,
    partitions: Iterable[Any],
    reported: Mapping[Any, int],
    security: dict[str, Any],
    timeout: float = PROBE_TRY_S,
) -> dict[Any, int]:
    """The high watermark each partition's fetch response reports (never below `reported`).

    A consumer of its own (aiokafka, no group) on the caller's event loop; every step is bounded, and the whole
    stays inside the time faust's recovery gives it (past that, recovery would stop silently). A partition the probe
    got no answer for keeps the broker's offset (with a warning; on Apache Kafka the two agree).
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition as ATP

    tps = list(partitions)
    result = {tp: int(reported.get(tp) or 0) for tp in tps}
    if not tps:
        return result
    pending = {ATP(tp.topic, tp.partition): tp for tp in tps}
    for attempt in range(1, PROBE_TRIES + 1):
        probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                 request_timeout_ms=int(timeout * 1000), **security)  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                await probe.start()
                probe.assign(list(pending))
                for atp, tp in pending.items():
                    probe.seek(atp, max(0, result[tp] - 1))
                while pending:
                    await probe.getmany(*pending, timeout_ms=100, max_records=1)
                    for atp in list(pending):
                        hw = probe.highwater(atp)
                        if hw is not None:
                            tp = pending.pop(atp)
                            result[tp] = max(result[tp], hw)
        except Exception as exc:  # a best-effort correction: any failure keeps the broker's offsets
            log.info("high watermark probe %d/%d: %d partitions unanswered (%r)", attempt, PROBE_TRIES,
                     len(pending), exc)  # fmt: skip
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(PROBE_STOP_S):
                    await probe.stop()
        if not pending:
            break
    if pending:
        log.warning("no fetch answer for %d partitions' high watermarks; using the broker's offsets", len(pending))
    return result


def patch_faust_highwaters(bootstrap: str, security: dict[str, Any]) -> None:
    """Make faust's consumer report fetch-confirmed high watermarks (see module docstring)."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_taoflow_patched", False):
        return

    async def highwaters(self: Any, *partitions: Any) -> Mapping[Any, int]:
        reported = await self.call_thread(self._highwaters, partitions)
        if self.consumer.in_transaction:
            return reported  # type: ignore[no-any-return]
        true = await fetched_highwaters(bootstrap, partitions, reported, security)
        fixed = sum(1 for tp, hw in true.items() if hw != reported.get(tp))
        if fixed:
            log.info("corrected %d high watermarks the broker under-reported", fixed)
        return true

    cls.highwaters = highwaters  # type: ignore[method-assign]
    cls._taoflow_patched = True  # type: ignore[attr-defined]


def patch_faust_fetch_wait(max_wait_ms: int) -> None:
    """faust hard-codes `fetch_max_wait_ms=1500` for its consumer; a fetch that finds no new data then
    parks for up to 1.5 s, which shows up directly as latency on every hop of a pipeline. Use ours."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    original = cls._create_worker_consumer
    if getattr(original, "_taoflow_wait", None) == max_wait_ms:
        return

    def _create_worker_consumer(self: Any, *args: Any, **kwargs: Any) -> Any:
        consumer = original(self, *args, **kwargs)
        consumer._fetch_max_wait_ms = max_wait_ms  # read when the consumer starts its fetcher
        return consumer

    _create_worker_consumer._taoflow_wait = max_wait_ms  # type: ignore[attr-defined]
    cls._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]


def seek_epoch(consumer: Any) -> int:
    """How many times this faust consumer sought every partition back to its committed offset (each rebalance):
    records fetched in an older epoch may be stale, and all of them are read again."""
    return int(consumer.__dict__.get("_taoflow_seek_epoch", 0))


def bump_seek_epoch(consumer: Any) -> None:
    consumer.__dict__["_taoflow_seek_epoch"] = seek_epoch(consumer) + 1


RESYNC_WAIT_S = 5.0  # how long a re-seek may take to bring the expected offset before it is tried again


def patch_faust_offset_jumps() -> None:
    """Keep faust from skipping records after a seek (the cause of events lost across a rebalance).

    faust hands aiokafka fetches across threads. A batch fetched just before a rebalance can arrive after
    faust has sought its partitions back to their committed offsets; its first record then sits past the
    read offset, and faust takes the jump for a legitimate gap (as on compacted or transactional topics):
    it marks the skipped offsets as done, commits past them and drops their re-fetched copies as already
    read. The events in between are never processed.

    On topics where offsets are contiguous (acked, not compacted: the stream's inputs), a record past
    the next expected offset is stale: we drop it and re-seek the partition to the expected offset, so
    the records come again in order. If the jump persists through two re-seeks (`RESYNC_WAIT_S` apart),
    the offsets really do not exist (deleted by retention, say): the jump is accepted, with a warning.
    """
    from faust.transport.consumer import Consumer

    if getattr(Consumer, "_taoflow_jumps", False):
        return
    original_getmany = Consumer.getmany
    original_perform_seek = Consumer.perform_seek
    original_seek = Consumer.seek

    def state(self: Any) -> dict[str, Any]:
        st = self.__dict__.get("_taoflow_offsets")
        if st is None:
            st = self.__dict__["_taoflow_offsets"] = {"expected": {}, "resync": {}, "tries": {}}
        return st  # type: ignore[no-any-return]

    def guarded(self: Any, topic: str) -> bool:
        return bool(self.app.topics.acks_enabled_for(topic)) and topic not in COMPACTED_TOPICS

    async def perform_seek(self: Any) -> None:
        await original_perform_seek(self)
        # Everything that depends on the committed offsets just read is settled before the next await: faust's
        # recovery resumes the flow before this seek, so a fetch can complete inside any await below, and the
        # patched fetch loop would then move `_read_offset` to the last *fetched* offset. Snapshotting the targets
        # after such an await made the lane adopt that fetched offset as "processing resumes at", and everything
        # below it was skipped as already processed when the (dropped) batch was read again.
        #
        # aiokafka's `seek_to_committed` leaves a partition with no committed offset (or 0) where its position
        # is. After a fetch that faust discarded (flow stopped or a new generation mid-fetch, a stale epoch),
        # that position is past records nobody processed: a worker that took such a partition over began after
        # them. Those partitions are read from their beginning (target 0; a log start past 0, from retention, is
        # a real hole the lane's continuity check accepts after its re-reads).
        unset = [tp for tp in self.assignment() if guarded(self, tp.topic) and not self._read_offset.get(tp)]
        for tp in unset:
            self._read_offset[tp] = None
        targets = {tp: o for tp, o in self._read_offset.items() if o is not None}
        targets.update((tp, 0) for tp in unset)
        # where each partition now reads from (its committed offset), for the lane's continuity check
        self.__dict__["_taoflow_seek_targets"] = targets
        bump_seek_epoch(self)  # a fetch completing from here on, issued before the seek, is dropped as stale
        st = state(self)
        for tp, offset in targets.items():
            st["expected"][tp] = offset
            st["resync"].pop(tp, None)
        thread = getattr(self, "_thread", None)
        if unset and thread is not None:
            from faust.transport.drivers.aiokafka import ensure_aiokafka_TP

            await thread.seek_to_beginning(*(ensure_aiokafka_TP(tp) for tp in unset))
            log.info("no committed offset: reading %s from the beginning",
                     ", ".join(f"{tp.topic}/{tp.partition}" for tp in unset))  # fmt: skip

    async def seek(self: Any, partition: Any, offset: int) -> None:
        await original_seek(self, partition, offset)
        state(self)["expected"][partition] = offset

    async def getmany(self: Any, timeout: float) -> Any:
        st = state(self)
        expected, resync, tries = st["expected"], st["resync"], st["tries"]
        async for tp, message in original_getmany(self, timeout):
            off = message.offset
            exp = expected.get(tp)
            if exp is None or off == exp or not guarded(self, message.topic):
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

    # the originals stay reachable (`inspect.unwrap`), so the contract test checks faust's own code, patched or not
    getmany.__wrapped__ = original_getmany  # type: ignore[attr-defined]
    perform_seek.__wrapped__ = original_perform_seek  # type: ignore[attr-defined]
    seek.__wrapped__ = original_seek  # type: ignore[attr-defined]
    Consumer.getmany = getmany  # type: ignore[method-assign]
    Consumer.perform_seek = perform_seek  # type: ignore[method-assign]
    Consumer.seek = seek  # type: ignore[method-assign]
    Consumer._taoflow_jumps = True  # type: ignore[attr-defined]
