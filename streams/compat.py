"""Work-arounds for broker quirks, kept in one place and harmless on Apache Kafka.

Tansu (the embedded broker) answers ListOffsets(latest) with a value below the true end of a partition
when records were written in batches (e.g. 1 for one batch of 10 records), while its fetch responses
carry the true high watermark. faust sizes table recovery by ListOffsets, so a restarted worker would
recover only part of its tables. `patch_faust_highwaters` makes faust take the larger of the two; on
Apache Kafka both agree and nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)


def fetched_highwaters(
    bootstrap: str,
    partitions: Iterable[Any],
    reported: Mapping[Any, int],
    security: dict[str, Any],
    timeout: float = 5.0,
) -> dict[Any, int]:
    """The high watermark each partition's fetch response reports (never below `reported`).

    Blocking (kafka-python, no consumer group): run it in an executor.
    """
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    tps = list(partitions)
    result = {tp: int(reported.get(tp) or 0) for tp in tps}
    if not tps:
        return result
    probe = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, **security)
    try:
        ktps = {KTP(tp.topic, tp.partition): tp for tp in tps}
        probe.assign(list(ktps))
        for ktp, tp in ktps.items():
            probe.seek(ktp, max(0, result[tp] - 1))
        pending = set(ktps)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            probe.poll(timeout_ms=100, max_records=1)
            for ktp in list(pending):
                hw = probe.highwater(ktp)
                if hw is not None:
                    result[ktps[ktp]] = max(result[ktps[ktp]], hw)
                    pending.discard(ktp)
        if pending:
            log.warning("no fetch answer for %d partitions' high watermarks; using the broker's offsets", len(pending))
    finally:
        probe.close()
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
        loop = asyncio.get_running_loop()
        true = await loop.run_in_executor(None, fetched_highwaters, bootstrap, partitions, reported, security)
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
