"""SDK emit throughput vs raw kafka-python producer sends, same broker, same run.

Both sides send the same events (JSON of an InteractionEvent, keyed by event id) with the same
producer settings (idempotent, acks=all, linger 5 ms) and are timed from the first send until
Kafka acknowledged the last one. Rounds alternate raw/SDK to spread machine noise; the median
per-event cost of each is reported with their ratio (target: SDK <= 1.5x raw).

    python bench/emit.py [--events 50000] [--rounds 3] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any


def _event(i: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": uuid.uuid4().hex,
        "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "agent_id": "bench",
        "task_type": "qa",
        "operator": f"op{i % 4}",
        "prompt": "What is the capital of France?",
        "response": "Paris.",
        "adapter": None,
        "latency_ms": 12.5,
        "metadata": {"i": i},
    }


def run_raw(bootstrap: str, n: int) -> float:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5)
    producer.send("bench.raw", value=b"warm-up").get(10)
    t0 = time.perf_counter()
    for i in range(n):
        ev = _event(i)
        producer.send("bench.raw", key=ev["event_id"].encode(), value=json.dumps(ev).encode())
    producer.flush()
    elapsed = time.perf_counter() - t0
    producer.close()
    return elapsed


def run_sdk(bootstrap: str, n: int) -> float:
    from taoflow import Emitter
    from taoflow.settings import Settings

    with tempfile.TemporaryDirectory() as spool:
        em = Emitter(Settings(overrides={"kafka": {"bootstrap": bootstrap}}), spool_dir=spool, agent_id="bench")
        em.emit_interaction(task_type="qa", operator="warm", prompt="x", response="y")
        if not em.flush(30):
            raise RuntimeError("SDK could not reach the broker")
        t0 = time.perf_counter()
        for i in range(n):
            em.emit_interaction(
                task_type="qa",
                operator=f"op{i % 4}",
                prompt="What is the capital of France?",
                response="Paris.",
                latency_ms=12.5,
                metadata={"i": i},
            )
        if not em.flush(120):
            raise RuntimeError("SDK did not deliver everything")
        elapsed = time.perf_counter() - t0
        stats = em.stats()
        em.close()
        assert stats.delivered == n + 1 and stats.spooled == 0, stats
        return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bootstrap", default=None, help="use this Kafka instead of an embedded broker")
    ap.add_argument("--port", type=int, default=19292)
    args = ap.parse_args(argv)

    from taoflow.broker import EmbeddedBroker
    from taoflow.settings import Settings

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker(Settings(overrides={"broker": {"port": args.port}})).start()
        bootstrap = broker.bootstrap
    try:
        raw, sdk = [], []
        for r in range(args.rounds):
            raw.append(run_raw(bootstrap, args.events))
            sdk.append(run_sdk(bootstrap, args.events))
            print(f"round {r + 1}: raw {raw[-1]:.3f}s  sdk {sdk[-1]:.3f}s", file=sys.stderr)
    finally:
        if broker is not None:
            broker.stop()
    raw_us = statistics.median(raw) / args.events * 1e6
    sdk_us = statistics.median(sdk) / args.events * 1e6
    result = {
        "events": args.events,
        "rounds": args.rounds,
        "raw_us_per_event": round(raw_us, 2),
        "sdk_us_per_event": round(sdk_us, 2),
        "raw_events_per_s": round(1e6 / raw_us),
        "sdk_events_per_s": round(1e6 / sdk_us),
        "sdk_over_raw": round(sdk_us / raw_us, 3),
        "target": "sdk_over_raw <= 1.5",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
