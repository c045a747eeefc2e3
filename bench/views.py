"""How fast the SQL views answer on one million interactions (target: under 200 ms each).

A DuckDB file is filled through the same insert path the lander uses (`streams.store.insert`) with N
interactions over 30 days, a score for each (plus a feedback revision for 10%), utilities, 100 TAO rounds and
1,000 dead letters. Each view is queried in full, `--runs` times, after one warm-up; medians are reported, and
as a ratio to a baseline measured in the same run: a plain `avg(reward)` scan of `scores`.

    python bench/views.py [--rows 1000000] [--runs 7]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams import store  # noqa: E402

QUERIES = {
    "baseline: SELECT avg(reward) FROM scores": "SELECT avg(reward) FROM scores",
    "improvement": "SELECT * FROM improvement",
    "improvement_by(INTERVAL 1 DAY), one task type": (
        "SELECT * FROM improvement_by(INTERVAL 1 DAY) WHERE task_type = 'task-3'"
    ),
    "operator_leaderboard": "SELECT * FROM operator_leaderboard",
    "round_history": "SELECT * FROM round_history",
    "freshness": "SELECT * FROM freshness",
    "dead_letter_rate": "SELECT * FROM dead_letter_rate",
}


def fill(con: object, n: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    start = datetime.now(UTC) - timedelta(days=30)
    step = 30 * 86400 / n
    batch = 200_000
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        idx = range(lo, hi)
        ts = [start + timedelta(seconds=i * step) for i in idx]
        tasks = [f"task-{i % 8}" for i in idx]
        ops = [f"op-{(i * 7) % 5}" for i in idx]
        adapters = [None if i < n // 2 else f"tao-{i * 4 // n}" for i in idx]
        prompts = [f"prompt {i % 50_000}" for i in idx]
        store.insert(con, "interactions", {
            "event_id": [f"e{i}" for i in idx], "ts": ts, "agent_id": ["bench"] * (hi - lo), "task_type": tasks,
            "operator": ops, "prompt": prompts, "prompt_is_chat": [False] * (hi - lo),
            "prompt_hash": [hashlib.sha256(p.encode()).hexdigest() for p in prompts], "response": ["ok"] * (hi - lo),
            "adapter": adapters, "latency_ms": [1.0] * (hi - lo), "metadata": ["{}"] * (hi - lo),
            "kafka_partition": [0] * (hi - lo), "kafka_offset": list(idx),
        })  # fmt: skip
        rewards = rng.random(hi - lo).tolist()
        store.insert(con, "scores", {
            "interaction_id": [f"e{i}" for i in idx], "revision": [0] * (hi - lo), "ts": ts, "task_type": tasks,
            "operator": ops, "adapter": adapters, "reward": rewards, "parts": ['{"r": 1}'] * (hi - lo),
        })  # fmt: skip
        fb = [i for i in idx if i % 10 == 0]
        store.insert(con, "scores", {
            "interaction_id": [f"e{i}" for i in fb], "revision": [1] * len(fb),
            "ts": [start + timedelta(seconds=i * step + 5) for i in fb], "task_type": [f"task-{i % 8}" for i in fb],
            "operator": [f"op-{(i * 7) % 5}" for i in fb], "adapter": [None] * len(fb), "reward": [1.0] * len(fb),
            "parts": ["{}"] * len(fb),
        })  # fmt: skip
    pairs = [(f"task-{t}", f"op-{o}") for t in range(8) for o in range(5)]
    now = datetime.now(UTC)
    store.insert(con, "utilities", {"task_type": [p[0] for p in pairs], "operator": [p[1] for p in pairs],
                                    "utility": rng.random(len(pairs)).tolist(), "n": [1000] * len(pairs),
                                    "last_reward": [0.5] * len(pairs), "ts": [now] * len(pairs)})  # fmt: skip
    rounds = [store.record_values("tao_rounds", {
        "round_id": f"r{i}", "status": "published", "stage": "publish", "started_at": start + timedelta(hours=i),
        "finished_at": start + timedelta(hours=i, minutes=5), "base_model": "m", "mode": "grpo", "k": 8,
        "prompts": 100, "heldout": 20, "timings": {"train": 60.0}, "metrics": {"gain": 0.01}, "seq": 1,
    }) for i in range(100)]  # fmt: skip
    cols = store.COLUMNS["tao_rounds"]
    store.insert(con, "tao_rounds", {c: [r[i] for r in rounds] for i, c in enumerate(cols)})
    store.insert(con, "dead_letters", {"source_topic": ["taoflow.interactions"] * 1000,
                                       "kafka_partition": [0] * 1000, "kafka_offset": list(range(1000)),
                                       "error": ["bad"] * 1000, "original": [b"x"] * 1000,
                                       "ts": [now] * 1000})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="taoflow-bench-views-") as tmp:
        path = Path(tmp) / "taoflow.duckdb"
        con = store.connect(path)
        t0 = time.perf_counter()
        fill(con, args.rows)
        print(f"filled {args.rows:,} interactions in {time.perf_counter() - t0:.0f}s", flush=True)
        con.close()
        import duckdb

        con = duckdb.connect(str(path), read_only=True)  # as `taoflow sql` reads it
        results = {}
        for label, sql in QUERIES.items():
            con.execute(sql).fetchall()
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                rows = con.execute(sql).fetchall()
                times.append((time.perf_counter() - t) * 1000)
            results[label] = (statistics.median(times), max(times), len(rows))
        con.close()
    base = results[next(iter(QUERIES))][0]
    print("\n| query | rows out | median | max | vs baseline |\n| --- | --- | --- | --- | --- |")
    for label, (med, worst, n) in results.items():
        print(f"| {label} | {n:,} | {med:.1f} ms | {worst:.1f} ms | {med / base:.1f}x |")


if __name__ == "__main__":
    main()
