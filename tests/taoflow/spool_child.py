"""Helper process for the spool test: emits a range of events with no broker, reports, then waits or flushes."""

from __future__ import annotations

import sys
import time

from taoflow import Emitter
from taoflow.settings import Settings

bootstrap, spool_dir, start, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
em = Emitter(
    Settings(overrides={"kafka": {"bootstrap": bootstrap}, "sdk": {"reconnect_backoff_s": 0.2}}),
    spool_dir=spool_dir,
    agent_id="spool-test",
)
slowest = 0.0
for i in range(start, start + count):
    t = time.perf_counter()
    em.emit_interaction(
        task_type="qa", operator="o", prompt=f"p{i}", response="r", event_id=f"ev-{i:05d}", metadata={"seq": i}
    )
    slowest = max(slowest, time.perf_counter() - t)
print(f"emitted {count} slowest_call_ms={slowest * 1000:.2f}", flush=True)
deadline = time.monotonic() + 30
while em.stats().spooled < count and time.monotonic() < deadline:
    time.sleep(0.01)
print(f"spooled {em.stats().spooled} backlog {em.stats().spool_records}", flush=True)
if mode == "wait":
    time.sleep(3600)  # the test kills this process with SIGKILL
else:
    ok = em.flush(timeout=60)
    print(f"flushed {ok} {em.stats()}", flush=True)
    em.close()
