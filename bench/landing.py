"""Is the primary-key index on the event tables still worth its cost, now that the lander resumes from offsets kept
in DuckDB (issue 12)?

Kafka redelivery no longer reaches the insert (the lander seeks to the offset after the last batch it committed),
but a producer can still send one event twice with the same `event_id` (an SDK retry, a spool resent after a crash
between send and acknowledgement), in different batches. Three ways to land `interactions` batches, each on a
fresh DuckDB file, in rounds that alternate the variants (a noisy machine hits them alike):

- `pk`: today's table (`event_id PRIMARY KEY`) and `INSERT OR IGNORE` (`streams.store.insert`), first copy wins;
- `no index`: the same table without the key, plain `INSERT`: fastest, but a cross-batch duplicate is a second row;
- `anti-join`: no key, `INSERT ... WHERE NOT EXISTS` against the rows landed so far: correct, no index to keep.

A share of each batch (`--dup-share`) repeats event ids of earlier batches. Reported: rows/s per variant (median
over rounds), the ratio to `pk`, and the duplicate rows each left behind.

    python bench/landing.py [--rows 300000] [--batch 5000] [--rounds 3] [--dup-share 0.001]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from streams import store  # noqa: E402


def batches(rows: int, batch: int, dup_share: float, seed: int) -> list[dict[str, list[Any]]]:
    """Column batches of `interactions` as the lander builds them; `dup_share` of each repeats earlier event ids."""
    rng = random.Random(seed)
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    out, seen = [], []
    for start in range(0, rows, batch):
        cols: dict[str, list[Any]] = {c: [] for c in store.COLUMNS["interactions"]}
        for i in range(start, min(rows, start + batch)):
            eid = rng.choice(seen) if seen and rng.random() < dup_share else f"ev-{i:09d}"
            prompt = f"question {i % 5000}: what is {i % 97} + {i % 89}?"
            row = {"event_id": eid, "ts": t0 + timedelta(seconds=i), "agent_id": "a", "task_type": f"t{i % 8}",
                   "operator": f"o{i % 3}", "prompt": prompt, "prompt_is_chat": False,
                   "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest(), "response": "r" * 40, "adapter": None,
                   "latency_ms": 12.5, "metadata": "{}", "kafka_partition": i % 4, "kafka_offset": i, "caller": None,
                   "forced": False, "session_id": None, "step": None, "finish_reason": "stop", "tools": None,
                   "tool_calls": None, "response_format": None}  # fmt: skip
            for c in cols:
                cols[c].append(row[c])
        seen.extend(cols["event_id"][: max(1, batch // 100)])
        out.append(cols)
    return out


def land(variant: str, data: list[dict[str, list[Any]]], path: Path) -> tuple[float, int]:
    """Seconds to land every batch (one transaction each, as the lander), and the duplicate rows left."""
    con = store.connect(path)
    if variant != "pk":
        ddl = con.execute("SELECT sql FROM duckdb_tables() WHERE table_name = 'interactions'").fetchone()[0]  # type: ignore[index]
        con.execute("DROP TABLE interactions")
        con.execute(ddl.replace("event_id VARCHAR PRIMARY KEY", "event_id VARCHAR"))
    names = ", ".join(store.COLUMNS["interactions"])
    t0 = time.perf_counter()
    for cols in data:
        con.execute("BEGIN TRANSACTION")
        if variant == "pk":
            store.insert(con, "interactions", cols)
        else:
            cols = store.dedupe(cols, ("event_id",))  # within a batch the first copy wins, as the lander does
            con.register("batch", pa.table(cols))
            if variant == "no index":
                con.execute(f"INSERT INTO interactions ({names}) SELECT {names} FROM batch")
            else:
                con.execute(
                    f"INSERT INTO interactions ({names}) SELECT {names} FROM batch b WHERE NOT EXISTS "
                    "(SELECT 1 FROM interactions i WHERE i.event_id = b.event_id)"
                )
            con.unregister("batch")
        con.execute("COMMIT")
    seconds = time.perf_counter() - t0
    dups = con.execute("SELECT count(*) - count(DISTINCT event_id) FROM interactions").fetchone()[0]  # type: ignore[index]
    con.close()
    return seconds, int(dups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dup-share", type=float, default=0.001)
    args = ap.parse_args()
    data = batches(args.rows, args.batch, args.dup_share, seed=1)
    variants = ("pk", "no index", "anti-join")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    dups: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="taoflow-bench-landing-") as tmp:
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else reversed(variants):
                seconds, dups[v] = land(v, data, Path(tmp) / f"{v.replace(' ', '-')}-{r}.duckdb")
                rates[v].append(args.rows / seconds)
                print(f"round {r + 1}: {v}: {args.rows / seconds:,.0f} rows/s", flush=True)
    base = statistics.median(rates["pk"])
    print(f"\n{args.rows:,} interactions in batches of {args.batch:,}, {args.dup_share:.2%} repeated ids, "
          f"{args.rounds} rounds (median)")  # fmt: skip
    print("| variant | rows/s | vs pk | duplicate rows left |")
    print("| --- | --- | --- | --- |")
    for v in variants:
        rate = statistics.median(rates[v])
        print(f"| {v} | {rate:,.0f} | {rate / base:.2f}x | {dups[v]} |")


if __name__ == "__main__":
    main()
