"""The high watermarks table recovery is sized by (`streams.compat.fetched_highwaters`): the embedded broker
under-reports ListOffsets(latest) after batched writes, and the probe reads the true end from fetch responses. It
runs on the worker's event loop with every step bounded: recovery waits on it, so it must never hang."""

from __future__ import annotations

import asyncio
import time
from collections import namedtuple
from typing import Any

import pytest
from kafka import KafkaProducer

from streams.compat import fetched_highwaters
from tests.conftest import free_port

pytestmark = pytest.mark.broker

TP = namedtuple("TP", "topic partition")


def test_the_probe_reads_the_true_end_of_each_partition(fresh_broker: Any) -> None:
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=50)
    for i in range(90):  # batched writes: the broker's ListOffsets says 1 for a batch of many
        producer.send("taoflow.scores", partition=i % 3, value=b"x")
    producer.flush()
    producer.close()
    tps = [TP("taoflow.scores", p) for p in range(4)]
    got = asyncio.run(fetched_highwaters(fresh_broker.bootstrap, tps, {tp: 1 for tp in tps}, {}))
    assert got == {tps[0]: 30, tps[1]: 30, tps[2]: 30, tps[3]: 1}  # never below what was reported
    assert asyncio.run(fetched_highwaters(fresh_broker.bootstrap, tps[3:], {}, {})) == {tps[3]: 0}


def test_an_unreachable_broker_costs_bounded_time_and_keeps_the_reported_offsets() -> None:
    tps = [TP("taoflow.scores", 0)]
    started = time.monotonic()
    got = asyncio.run(fetched_highwaters(f"127.0.0.1:{free_port()}", tps, {tps[0]: 7}, {}, timeout=0.5))
    assert got == {tps[0]: 7}
    assert time.monotonic() - started < 10  # three tries of half a second each, and their bounded stops
