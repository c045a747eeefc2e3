"""Work-arounds for broker quirks, kept in one place and harmless on Apache Kafka.

Tansu (the embedded broker) answers ListOffsets(latest) with a value below the true end of a partition
when records were written in batches (e.g. 1 for one batch of 10 records), while its fetch responses
carry the true high watermark. faust sizes table recovery by ListOffsets, so a restarted worker would
recover only part of its tables. The worker's consumer thread (`streams.seams.ConsumerThread.highwaters`) takes
the larger of the two; on Apache Kafka both agree and nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

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
