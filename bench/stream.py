"""Stream pipeline throughput and latency vs a raw aiokafka consumer that only parses JSON, same run.

1. Baseline: N interactions pre-loaded in a topic; a raw aiokafka consumer reads and JSON-parses them all.
2. Pipeline: a running `taoflow worker` (validate, score, ACT-R utility update, land in DuckDB), frozen while the
   same N interactions are pre-loaded, then timed from its resumption until every one is scored, its utility
   updated and its row landed.
3. Latency: interactions produced at a steady rate (default 2,000/s); produce -> utility update (observed on
   `taoflow.utilities`) and produce -> queryable row (`landed_at - ts` in DuckDB), p50/p99.

    python bench/stream.py [--events 20000] [--rate 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCORERS = json.dumps([{"type": "regex", "pattern": r"^\d+$", "name": "digits"}])


def event(i: int, tag: str) -> bytes:
    return json.dumps({
        "event_id": f"{tag}-{i}",
        "ts": datetime.now(UTC).isoformat(),
        "agent_id": "bench",
        "task_type": "math",
        "operator": f"op{i % 4}",
        "prompt": f"what is {i} + 1?",
        "response": str(i + 1) if i % 3 else "no idea",
        "adapter": None,
        "latency_ms": 5.0,
        "metadata": {"i": i},
    }).encode()  # fmt: skip


def produce(bootstrap: str, topic: str, n: int, tag: str, rate: float | None = None) -> float:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024)
    t0 = time.perf_counter()
    for i in range(n):
        p.send(topic, key=f"{tag}-{i}".encode(), value=event(i, tag))
        if rate:
            ahead = (i + 1) / rate - (time.perf_counter() - t0)
            if ahead > 0.002:
                time.sleep(ahead)
    p.flush()
    elapsed = time.perf_counter() - t0
    p.close()
    return elapsed


async def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    import orjson
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"raw-{time.time()}", auto_offset_reset="earliest",
        max_poll_records=10_000, fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
    )  # fmt: skip
    await c.start()
    seen = 0
    t0 = time.perf_counter()  # includes the group join and first fetch, as the pipeline's timing does
    try:
        while seen < n:
            batch = await c.getmany(timeout_ms=1000, max_records=10_000)
            for recs in batch.values():
                for r in recs:
                    orjson.loads(r.value)
                seen += sum(1 for _ in recs)
        return time.perf_counter() - t0
    finally:
        await c.stop()


def land_floor(tmp: Path, n: int, keyed: bool) -> float:
    """Seconds to land, through Arrow in 5,000-event batches, only the three rows every interaction needs
    (`interactions`, `scores`, `utility_history`), with values already built: DuckDB's part of the pipeline
    and nothing else. `keyed`: the real tables (primary keys, what makes landing idempotent); else the same
    columns without keys or constraints, DuckDB's fastest append."""
    import duckdb
    import pyarrow as pa

    from streams import store

    path = tmp / f"floor-{keyed}.duckdb"
    con = store.connect(path)
    if not keyed:
        for t in ("interactions", "scores", "utility_history"):
            con.execute(f"CREATE TABLE {t}_nokey AS SELECT * FROM {t} LIMIT 0")
    now = datetime.now(UTC)
    step = 5000
    t0 = time.perf_counter()
    for start in range(0, n, step):
        k = range(start, min(n, start + step))
        m = len(k)
        ids = [f"floor-{i}" for i in k]
        ops = [f"op{i % 4}" for i in k]
        batches = {
            "interactions": pa.table({
                "event_id": ids, "ts": [now] * m, "agent_id": ["bench"] * m, "task_type": ["math"] * m,
                "operator": ops, "prompt": [f"what is {i} + 1?" for i in k], "prompt_is_chat": [False] * m,
                "prompt_hash": [f"{i:064x}" for i in k], "response": [str(i + 1) for i in k], "adapter": [None] * m,
                "latency_ms": [5.0] * m, "metadata": [f'{{"i":{i}}}' for i in k], "kafka_partition": [0] * m,
                "kafka_offset": list(k),
            }),
            "scores": pa.table({
                "interaction_id": ids, "revision": [0] * m, "ts": [now] * m, "task_type": ["math"] * m,
                "operator": ops, "adapter": [None] * m, "reward": [1.0] * m, "parts": ['{"digits":1.0}'] * m,
            }),
            "utility_history": pa.table({
                "task_type": ["math"] * m, "operator": ops, "n": list(k), "utility": [0.5] * m,
                "last_reward": [1.0] * m, "ts": [now] * m,
            }),
        }  # fmt: skip
        con.execute("BEGIN TRANSACTION")
        for table, batch in batches.items():
            con.register("batch", batch)
            cols = ", ".join(batch.column_names)
            if keyed:
                con.execute(f"INSERT OR IGNORE INTO {table} ({cols}) SELECT {cols} FROM batch")
            else:
                con.execute(f"INSERT INTO {table}_nokey ({cols}) SELECT {cols} FROM batch")
            con.unregister("batch")
        con.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    con.close()
    del duckdb
    return elapsed


async def produce_floor(bootstrap: str, n: int) -> float:
    """Seconds for aiokafka to send, as record batches with `acks=all`, only the two records every interaction
    must publish (its score and its utility update), values already encoded: the broker's part and the
    producer's, and nothing else."""
    from aiokafka import AIOKafkaProducer

    from schemas.fast import score_json, utility_json

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=1024 * 1024)
    await p.start()
    score = score_json("floor-123456", time.time(), "math", "op1", None, 1.0, {"digits": 1.0}, 0)
    util = utility_json("math", "op1", 0.5, 123456, 1.0, time.time())
    t0 = time.perf_counter()
    try:
        step = 5000
        for start in range(0, n, step):
            futures = []
            for topic, value in (("floor.scores", score), ("floor.utilities", util)):
                batch = p.create_batch()
                for i in range(start, min(n, start + step)):
                    if batch.append(key=b"%d" % i, value=value, timestamp=None) is None:
                        batch.close()
                        futures.append(await p.send_batch(batch, topic, partition=0))
                        batch = p.create_batch()
                        batch.append(key=b"%d" % i, value=value, timestamp=None)
                batch.close()
                futures.append(await p.send_batch(batch, topic, partition=0))
            await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await p.stop()


def sql(data_dir: Path, q: str) -> list[list[Any]]:
    from streams.sqlapi import query
    from taoflow.settings import Settings

    return query(q, Settings(overrides={"core": {"data_dir": data_dir}})).rows


def wait_rows(data_dir: Path, q: str, target: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sql(data_dir, q)[0][0] >= target:
                return time.perf_counter()
        except Exception:
            pass
        time.sleep(0.02)
    raise TimeoutError(q)


class UtilityWatcher(threading.Thread):
    """Records, for each UtilityEvent, now - its ts (the interaction's produce time)."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap = bootstrap
        self.lat: list[float] = []
        self.active = False
        self.stop_flag = False

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        import orjson
        from aiokafka import AIOKafkaConsumer, TopicPartition

        # a short fetch wait: the watcher's own long-poll (aiokafka's default 500 ms) must not add to the latency;
        # partitions assigned directly (no group join to wait for), so every update made while active is seen
        c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, fetch_max_wait_ms=5)
        await c.start()
        await c.topics()  # fetches the cluster metadata
        parts = c.partitions_for_topic("taoflow.utilities")
        assert parts, "taoflow.utilities has no partitions"
        c.assign([TopicPartition("taoflow.utilities", p) for p in parts])
        await c.seek_to_end()
        try:
            while not self.stop_flag:
                batch = await c.getmany(timeout_ms=100)
                now = time.time()
                if not self.active:
                    continue
                for recs in batch.values():
                    for r in recs:
                        ts = datetime.fromisoformat(orjson.loads(r.value)["ts"].replace("Z", "+00:00")).timestamp()
                        self.lat.append(now - ts)
        finally:
            await c.stop()


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process and of each of its descendants, by command name."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        name = "lander" if cmd.split()[-1:] == ["lander"] else "broker" if "tansu" in cmd else "worker"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        pending.extend(int(c) for c in children)
    return out


def cpu_of(pids: list[int]) -> dict[str, float]:
    total: dict[str, float] = {}
    for pid in pids:
        for k, v in cpu_seconds(pid).items():
            total[k] = total.get(k, 0.0) + v
    return total


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=19393)
    ap.add_argument("--workers", type=int, default=1, help="worker processes in the consumer group")
    args = ap.parse_args(argv)

    from taoflow.broker import EmbeddedBroker
    from taoflow.settings import Settings

    broker = EmbeddedBroker(Settings(overrides={"broker": {"port": args.port, "partitions": 4}})).start()
    bs = broker.bootstrap
    tmp = Path(tempfile.mkdtemp(prefix="taoflow-bench-"))
    workers: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"events": args.events, "workers": args.workers}
    try:
        # 1. raw baseline
        produce(bs, "bench.raw", args.events, "raw")
        raw_s = asyncio.run(raw_consume(bs, "bench.raw", args.events))
        result["raw_consumer_events_per_s"] = round(args.events / raw_s)

        # what a pipeline cannot avoid, each part alone with nothing else running: reading and parsing the events
        # (the baseline itself), landing the 3 rows and producing the 2 records each interaction needs. Their CPU
        # per event (this process's, all threads, plus the broker's), summed and spread perfectly over every core,
        # bounds the rate of any pipeline doing that work on this machine, before any validation or scoring
        broker_pid = broker.proc.pid if broker.proc else os.getpid()

        def cpu_us(run: Any) -> float:
            c0 = time.process_time() + cpu_of([broker_pid]).get("broker", 0.0)
            run()
            return (time.process_time() + cpu_of([broker_pid]).get("broker", 0.0) - c0) / args.events * 1e6

        floor_us = {
            "read + parse (raw)": cpu_us(lambda: asyncio.run(raw_consume(bs, "bench.raw", args.events))),
            "land 3 rows (keyed)": cpu_us(lambda: land_floor(tmp, args.events, keyed=True)),
            "land 3 rows (no keys)": cpu_us(lambda: land_floor(tmp, args.events, keyed=False)),
            "produce 2 records": cpu_us(lambda: asyncio.run(produce_floor(bs, args.events))),
        }
        result["floor_cpu_us_per_event"] = {k: round(v, 2) for k, v in floor_us.items()}
        cores = os.cpu_count() or 1
        for keyed in (True, False):
            land = floor_us["land 3 rows (keyed)" if keyed else "land 3 rows (no keys)"]
            need = floor_us["read + parse (raw)"] + land + floor_us["produce 2 records"]
            name = "keyed" if keyed else "no_keys"
            result[f"bound_events_per_s_{name}"] = round(cores / need * 1e6)
            result[f"bound_over_raw_{name}"] = round(cores / need * 1e6 / result["raw_consumer_events_per_s"], 3)

        # 2. pipeline throughput
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TAOFLOW_KAFKA_BOOTSTRAP": bs, "TAOFLOW_DATA_DIR": str(tmp),
               "TAOFLOW_STREAM_SCORERS": SCORERS, "TAOFLOW_LOG_LEVEL": "WARNING"}  # fmt: skip
        for k in range(args.workers):  # the first also runs the lander; the others only process
            cmd = [sys.executable, "-m", "taoflow.cli", "worker"] + (["--no-lander"] if k else [])
            with open(tmp / f"worker{k}.log", "wb") as log_file:  # the child keeps its own descriptor
                workers.append(subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log_file,
                                                stderr=subprocess.STDOUT))  # fmt: skip
        produce(bs, "taoflow.interactions", 100, "warm")
        wait_rows(tmp, "SELECT count(*) FROM utility_history", 100, timeout=120)
        wait_rows(tmp, "SELECT count(*) FROM interactions", 100, timeout=120)
        # the same pre-loaded backlog the raw consumer read: the workers (and their landers) are frozen with
        # SIGSTOP while the events are produced, and timed from SIGCONT until every one is scored, its utility
        # updated and its row landed (producing takes a few seconds, well inside the group session timeout)
        for w in workers:
            os.killpg(w.pid, signal.SIGSTOP)
        produce(bs, "taoflow.interactions", args.events, "tput")
        pids = [w.pid for w in workers] + ([broker.proc.pid] if broker.proc else [])
        cpu0 = cpu_of(pids)
        t0 = time.perf_counter()
        for w in workers:
            os.killpg(w.pid, signal.SIGCONT)
        t_util = wait_rows(tmp, "SELECT count(*) FROM utility_history", 100 + args.events)
        t_land = wait_rows(tmp, "SELECT count(*) FROM interactions", 100 + args.events)
        pipe_s = max(t_util, t_land) - t0
        result["pipeline_events_per_s"] = round(args.events / pipe_s)
        result["pipeline_over_raw"] = round(raw_s / pipe_s, 3)
        cpu1 = cpu_of(pids)  # CPU per interaction of each part while the backlog was processed
        result["cpu_us_per_event"] = {k: round((cpu1[k] - cpu0.get(k, 0.0)) / args.events * 1e6, 1) for k in cpu1}

        # 3. latency at a steady rate
        watcher = UtilityWatcher(bs)
        watcher.start()
        time.sleep(2)
        watcher.active = True
        n = int(args.rate * args.seconds)
        elapsed = produce(bs, "taoflow.interactions", n, "lat", rate=args.rate)
        wait_rows(tmp, "SELECT count(*) FROM interactions WHERE event_id LIKE 'lat-%'", n)
        time.sleep(1)
        watcher.stop_flag = True
        watcher.join(5)
        land = [r[0] for r in sql(tmp, "SELECT epoch(landed_at) - epoch(ts) FROM interactions "
                                       "WHERE event_id LIKE 'lat-%'")]  # fmt: skip
        result.update(
            latency_rate_events_per_s=round(n / elapsed),
            utility_latency_ms_p50=round(pct(watcher.lat, 0.5) * 1000, 1),
            utility_latency_ms_p99=round(pct(watcher.lat, 0.99) * 1000, 1),
            utility_updates_observed=len(watcher.lat),
            queryable_latency_ms_p50=round(statistics.median(land) * 1000, 1),
            queryable_latency_ms_p99=round(pct(land, 0.99) * 1000, 1),
        )
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(30)
        broker.stop()
    result["targets"] = "pipeline_over_raw >= 0.5; utility p99 < 100 ms @2k/s; queryable p99 < 2000 ms"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
