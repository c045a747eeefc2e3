"""The stream tier under randomized faults, checked by an independent oracle.

Each run starts its own embedded broker and up to `--workers` stream workers (each with its lander and Parquet
landing), produces a seeded stream of interactions and feedback whose expected outputs are computed offline
(planted rewards, closed-form utilities), and injects seeded random faults while the stream flows:

- `kill`: SIGKILL a worker (its whole process group: the lander too), restarted after a pause;
- `term`: SIGTERM a worker, restarted after a pause;
- `stop`: SIGSTOP a worker past the consumer-group session timeout, then SIGCONT (a zombie coming back);
- `join` / `leave`: a worker starts, or one leaves for good (SIGTERM), keeping between 1 and `--workers`;
- `lander`: SIGKILL one worker's lander process (its worker restarts it);
- `broker`: SIGSTOP the broker for less than the request timeout, then SIGCONT.

The checker reads every output topic from offset 0 outside any consumer group, the DuckDB file and the raw Parquet
files. A run passes when every interaction is scored and landed exactly once (its score revisions exactly as
planted), every operator's utility equals the closed form `utility_after(0, r, alpha, n)` to 1e-9 with the exact n,
DuckDB and Parquet hold zero duplicate rows, and the online invariant held: sampled while the run went on, a
partition's committed offset of the worker group never passed an interaction whose score was not yet in Kafka.

    python bench/chaos.py [--runs 100] [--seed 0] [--events 3000] [--workers 3]
    python bench/chaos.py --replay SEED            # one run again, with the same events and faults
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learners.actr import utility_after  # noqa: E402
from taoflow.broker import EmbeddedBroker  # noqa: E402
from taoflow.settings import Settings  # noqa: E402

OPERATORS = {"good": 0.9, "mid": 0.55, "bad": 0.2}  # planted reward per operator (rules and feedback agree)
ALPHA = 0.2
PARTITIONS = 4
SESSION_TIMEOUT_S = 6.0
INPUTS = ("taoflow.interactions", "taoflow.feedback")
SCORERS = json.dumps([{"type": "python", "callable": "tests.streams.scorers:reward_from_metadata", "name": "planted"}])
FAULTS = ("kill", "term", "stop", "join", "leave", "lander", "broker")
STALL_S = 40.0  # settling with nothing landed for this long: the workers are asked for their stacks
COMMIT_WAIT_S = 15.0  # after settling, how long the group's commits may take to reach the ends of the interactions
READ_CAP_S = 60.0  # reading a topic back waits at most this long for partitions whose end is not known yet


@dataclass
class Plan:
    """Everything a run does, drawn from its seed alone (a failing seed replays the same events and faults)."""

    seed: int
    events: int
    workers: int
    duration_s: float
    feedback_share: float
    faults: list[tuple[float, str, int, float]]  # (at seconds, kind, worker slot, how long)

    @classmethod
    def draw(cls, seed: int, events: int, workers: int, duration_s: float, faults: int) -> Plan:
        rng = random.Random(seed)
        times = sorted(rng.uniform(1.0, duration_s) for _ in range(faults))
        drawn = [(round(t, 2), rng.choice(FAULTS), rng.randrange(workers), round(rng.uniform(0.5, 3.0), 2))
                 for t in times]  # fmt: skip
        return cls(seed, events, workers, duration_s, round(rng.uniform(0.1, 0.4), 2), drawn)


@dataclass
class Report:
    seed: int
    ok: bool
    faults: Counter[str] = field(default_factory=Counter)
    interactions: int = 0
    rewards: int = 0
    lost: int = 0  # interactions (or score revisions) missing from the scores topic or the tables
    duplicated: int = 0  # rows landed more than once (DuckDB, Parquet)
    invariant_violations: int = 0
    utility_error: float = 0.0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    committed: dict[int, int] = field(default_factory=dict)  # the worker group's, per partition, at the end
    clues: list[str] = field(default_factory=list)  # of a failed run: the telling lines of its workers' logs


# -- the world: broker, workers ------------------------------------------------------------------------------


class Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        fh = open(self.log, "ab")  # noqa: SIM115 - the child writes to it for its lifetime
        self.proc = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "worker"], env=self.env, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int, group: bool = False) -> None:
        if self.running:
            assert self.proc is not None
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.paused:
            self.send(signal.SIGCONT, group=True)
            self.paused = False
        if self.running:
            assert self.proc is not None
            self.send(sig, group=sig == signal.SIGKILL)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def lander_pid(self) -> int | None:
        if not self.running:
            return None
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "taoflow.cli lander$"], capture_output=True,
                             text=True).stdout.split()  # fmt: skip
        return int(out[0]) if out else None


# -- the stream and what it must produce ---------------------------------------------------------------------


def events(plan: Plan) -> tuple[list[tuple[str, str, bytes]], dict[str, str], set[str]]:
    """(topic, key, value) in production order, each interaction's operator, and which ones get feedback."""
    rng = random.Random(plan.seed * 7919 + 1)
    out: list[tuple[str, str, bytes]] = []
    ops: dict[str, str] = {}
    with_feedback: set[str] = set()
    early: list[tuple[str, str, bytes]] = []
    for i in range(plan.events):
        iid = f"c{plan.seed}-{i:06d}"
        op = rng.choice(list(OPERATORS))
        ops[iid] = op
        now = datetime.now(UTC).isoformat()
        doc = {"event_id": iid, "ts": now, "agent_id": "chaos", "task_type": "qa", "operator": op,
               "prompt": f"question {i}", "response": f"answer {i}", "adapter": None, "latency_ms": 1.0,
               "metadata": {"r": OPERATORS[op]}}  # fmt: skip
        fb = None
        if rng.random() < plan.feedback_share:
            with_feedback.add(iid)
            fb = ("taoflow.feedback", iid, json.dumps({"event_id": f"f-{iid}", "interaction_id": iid, "ts": now,
                  "kind": "task_success", "value": OPERATORS[op], "metadata": {}}).encode())  # fmt: skip
        if fb is not None and rng.random() < 0.2:
            out.append(fb)  # feedback first: it waits for its interaction
            fb = None
        out.append(("taoflow.interactions", iid, json.dumps(doc).encode()))
        if fb is not None:
            early.append(fb)
        if len(early) > rng.randint(0, 50):  # feedback some time after its interaction
            out.extend(early)
            early = []
    out.extend(early)
    return out, ops, with_feedback


class Producer(threading.Thread):
    """Sends the stream at an even rate over the run's duration; records where each interaction landed."""

    def __init__(self, bootstrap: str, stream: list[tuple[str, str, bytes]], duration_s: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.stream, self.duration_s = bootstrap, stream, duration_s
        self.positions: dict[str, tuple[int, int]] = {}  # interaction id -> (partition, offset)
        self.error: BaseException | None = None

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = None
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks="all", retries=20,
                                     max_in_flight_requests_per_connection=1, request_timeout_ms=30_000)  # fmt: skip
            futures = []
            start = time.monotonic()
            for n, (topic, key, value) in enumerate(self.stream):
                wait = start + self.duration_s * n / len(self.stream) - time.monotonic()
                if wait > 0:  # read once: a second reading could be past `due` already (a negative sleep raises)
                    time.sleep(wait)
                fut = producer.send(topic, key=key.encode(), value=value)
                if topic == "taoflow.interactions":
                    futures.append((key, fut))
            producer.flush(120)
            for key, fut in futures:
                md = fut.get(60)
                self.positions[key] = (md.partition, md.offset)
        except BaseException as exc:  # reported by the run, never lost in a thread
            self.error = exc
        finally:
            if producer is not None:
                producer.close()


class CommitWatch(threading.Thread):
    """Samples the worker group's committed offsets of the interactions topic while the run goes on. A read that
    fails is remembered (`last_error`) and a run that saw none fails: a watch that fails quietly checks nothing
    (it did, for a while, when kafka-python 3 renamed its group APIs)."""

    def __init__(self, bootstrap: str, group: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.group = bootstrap, group
        self.samples: list[tuple[float, int, int]] = []  # (epoch ms when seen, partition, committed offset)
        self.halt = threading.Event()
        self.last_error = ""
        self.reads_ok = 0  # answers from the broker (an empty one too: the group may not have committed yet)
        self._admin: Any = None

    def run(self) -> None:
        while not self.halt.wait(0.5):
            offsets = self.read()
            if offsets is not None:
                seen = time.time() * 1000
                self.samples.extend((seen, p, off) for p, off in offsets.items())
        self.close()

    def read(self) -> dict[int, int] | None:
        """The committed offset per interactions partition now (None when the broker did not answer)."""
        from kafka import KafkaAdminClient

        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
            offsets = self._admin.list_group_offsets({self.group: None}).get(self.group, {})
        except Exception as exc:
            # the broker may be paused: try again with a new client, and close this one (an abandoned client
            # keeps reconnecting in the background, and logging, long after its broker is gone)
            self.last_error = repr(exc)
            self.close()
            return None
        self.reads_ok += 1
        return {tp.partition: meta.offset for tp, meta in offsets.items()
                if tp.topic == "taoflow.interactions" and meta.offset >= 0}  # fmt: skip

    def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
        self._admin = None

    def final(self, tries: int = 5) -> dict[int, int] | None:
        """The group's committed offsets once the run has settled (call after the thread ended; None: unreadable)."""
        for _ in range(tries):
            if (offsets := self.read()) is not None:
                self.close()
                return offsets
            time.sleep(1)
        return None


def read_topic(bootstrap: str, topic: str, quiet_s: float = 1.0) -> list[Any]:
    """Every record of a topic from offset 0, outside any group, until nothing new arrives for `quiet_s` and every
    partition's position reached the high watermark its fetch responses report."""
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        return _read_all(c, topic, quiet_s)
    finally:
        c.close()


def _read_all(c: Any, topic: str, quiet_s: float) -> list[Any]:
    from kafka import TopicPartition

    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out: list[Any] = []
    last = started = time.monotonic()
    while time.monotonic() - last < quiet_s:
        got = c.poll(timeout_ms=300)
        for recs in got.values():
            out.extend(recs)
        # quiet counts only once every partition's fetch answered with its end, and the position reached it
        behind = any(c.highwater(tp) is None or c.highwater(tp) > c.position(tp) for tp in tps)
        if got or (behind and time.monotonic() - started < READ_CAP_S):
            last = time.monotonic()
    return out


# -- one run -------------------------------------------------------------------------------------------------


def run_once(plan: Plan, workdir: Path, settle_s: float = 180.0) -> Report:
    import duckdb

    from streams.sqlapi import query

    t0 = time.monotonic()
    report = Report(seed=plan.seed, ok=False)
    stream, ops, with_feedback = events(plan)
    expected_rewards = Counter(ops.values())
    for iid in with_feedback:
        expected_rewards[ops[iid]] += 1
    report.interactions, report.rewards = len(ops), sum(expected_rewards.values())

    from tests.conftest import free_port

    broker = EmbeddedBroker(Settings(overrides={"broker": {"port": free_port(), "partitions": PARTITIONS}}),
                            log_file=workdir / "broker.log")  # fmt: skip
    broker.start()
    data, lake = workdir / "data", workdir / "lake"
    app_id = f"chaos{plan.seed}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(PYTHONPATH=str(ROOT), TAOFLOW_KAFKA_BOOTSTRAP=broker.bootstrap, TAOFLOW_DATA_DIR=str(data),
               TAOFLOW_STREAM_APP_ID=app_id, TAOFLOW_STREAM_SCORERS=SCORERS, TAOFLOW_STREAM_PARQUET_URL=str(lake),
               TAOFLOW_STREAM_SESSION_TIMEOUT_S=str(SESSION_TIMEOUT_S),
               TAOFLOW_LOG_LEVEL=os.environ.get("TAOFLOW_TEST_WORKER_LOG_LEVEL", "INFO"))  # fmt: skip
    slots: list[Worker | None] = [None] * plan.workers
    retired: list[Worker] = []

    def spawn(slot: int) -> None:
        w = Worker(env, workdir / f"worker{slot}-{len(retired)}.log")
        w.start()
        slots[slot] = w

    spawn(0)
    for slot in range(1, plan.workers):
        if random.Random(plan.seed + slot).random() < 0.5:
            spawn(slot)
    watch = CommitWatch(broker.bootstrap, app_id)
    watch.start()
    producer = Producer(broker.bootstrap, stream, plan.duration_s)
    producer.start()
    pending: list[tuple[float, str, int]] = []  # (due, action, slot): restarts and resumes
    start = time.monotonic()
    try:
        queue = list(plan.faults)
        while queue or pending:
            now = time.monotonic() - start
            for item in sorted(pending):
                due, action, slot = item
                if due > now:
                    continue
                pending.remove(item)
                w = slots[slot]
                if action == "restart" and (w is None or not w.running):
                    spawn(slot)
                elif action == "cont" and w is not None and w.paused:
                    w.send(signal.SIGCONT, group=True)
                    w.paused = False
                elif action == "broker-cont" and broker.proc is not None:
                    os.kill(broker.proc.pid, signal.SIGCONT)
            if queue and queue[0][0] <= now:
                _at, kind, drawn, how_long = queue.pop(0)
                live = [s for s, x in enumerate(slots) if x is not None and x.running and not x.paused]
                empty = [s for s, x in enumerate(slots) if x is None or not x.running]
                # the drawn slot index picks among the workers the fault applies to now
                pool = empty if kind == "join" else live if kind != "broker" else [0]
                slot = pool[drawn % len(pool)] if pool else drawn
                w = slots[slot]
                if kind in ("kill", "term") and w is not None and w.running and not w.paused:
                    w.stop(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
                    retired.append(w)
                    pending.append((now + how_long, "restart", slot))
                elif kind == "stop" and w is not None and w.running and not w.paused:
                    w.send(signal.SIGSTOP, group=True)
                    w.paused = True
                    pending.append((now + SESSION_TIMEOUT_S + 2 + how_long, "cont", slot))
                elif kind == "join" and (w is None or not w.running):
                    spawn(slot)
                elif kind == "leave" and w is not None and w.running and not w.paused and len(live) > 1:
                    w.stop(signal.SIGTERM)
                    retired.append(w)
                    slots[slot] = None
                elif kind == "lander" and w is not None and (pid := w.lander_pid()) is not None:
                    os.kill(pid, signal.SIGKILL)
                elif kind == "broker" and broker.proc is not None:
                    os.kill(broker.proc.pid, signal.SIGSTOP)
                    pending.append((now + min(how_long, 3.0), "broker-cont", 0))
                else:
                    continue  # nothing to do in the world as it is: not counted
                report.faults[kind] += 1
            time.sleep(0.05)
        producer.join(300)
        if producer.error is not None:
            raise RuntimeError(f"the producer failed: {producer.error!r}")
        if not any(w is not None and w.running for w in slots):
            spawn(0)
        # settle: everything landed (or the settle time is up, and the checker says what is missing). Every table
        # the checker reads is waited for: the lander's group may still be waiting out a killed lander's session,
        # with some partitions landed and others not yet assigned to anyone alive
        cfg = Settings(overrides={"core": {"data_dir": data}})
        deadline = time.monotonic() + settle_s
        want = (report.rewards, len(ops), len(ops) + len(with_feedback), len(with_feedback))
        last: tuple[Any, ...] = ()
        moved = time.monotonic()
        dumped = False
        while time.monotonic() < deadline:
            if not dumped and time.monotonic() - moved > STALL_S:
                # nothing moved for a while: every live worker writes its threads' and tasks' stacks to its log
                # (mode's SIGUSR1 handler), for the clues of a failed run
                dumped = True
                for w in slots:
                    # a worker younger than this may not have mode's handler yet: SIGUSR1 would kill it
                    if w is not None and w.running and not w.paused and time.monotonic() - w.started > 30:
                        w.send(signal.SIGUSR1)
            try:
                got = query("SELECT (SELECT count(*) FROM utility_history), (SELECT count(*) FROM interactions), "
                            "(SELECT count(*) FROM scores), (SELECT count(*) FROM feedback)", cfg).rows[0]  # fmt: skip
                files = f"{lake}/interactions/**/*.parquet"
                landed = duckdb.connect().execute(f"SELECT count(DISTINCT event_id) FROM read_parquet('{files}')"
                                                  ).fetchone()  # fmt: skip
                if all(g >= w for g, w in zip(got, want, strict=True)) and landed and landed[0] >= len(ops):
                    break
                if (*got, landed) != last:
                    last, moved = (*got, landed), time.monotonic()
            except Exception:
                pass
            time.sleep(1)
        time.sleep(3)  # anything still in flight
        # the group commits what it processed about once a second: give its commits time to reach the ends, so the
        # watch samples the final positions too (not reaching them is no failure: the invariant is about passing)
        ends: dict[int, int] = {}
        for part, off in producer.positions.values():
            ends[part] = max(ends.get(part, 0), off + 1)
        probe = CommitWatch(broker.bootstrap, app_id)
        commit_deadline = time.monotonic() + COMMIT_WAIT_S
        while time.monotonic() < commit_deadline:
            now_committed = probe.read() or {}
            if all(now_committed.get(part, 0) >= end for part, end in ends.items()):
                break
            time.sleep(1)
        probe.close()
        watch.halt.set()
        watch.join(10)
        if not watch.reads_ok:
            report.problems.append(f"the commit watch never got an answer during the run (the online invariant "
                                   f"went unchecked): {watch.last_error or 'no error recorded'}")  # fmt: skip
        final = watch.final()
        if final is None:
            report.problems.append(
                f"the worker group's committed offsets could not be read at the end: {watch.last_error}"
            )
        else:
            watch.samples.extend((time.time() * 1000, p, off) for p, off in final.items())
        report.committed = final or {}
        check(report, plan, broker.bootstrap, cfg, lake, ops, with_feedback, expected_rewards, producer.positions,
              watch.samples)  # fmt: skip
    finally:
        watch.halt.set()
        for w in [*slots, *retired]:
            if w is not None:
                w.stop(signal.SIGKILL)  # the outputs are checked: nothing is left to stop gracefully for
        broker.stop()
    report.seconds = time.monotonic() - t0
    if not report.ok:
        report.clues = clues(workdir)
    return report


CLUES = ("resumes at", "dropped", "re-read", "jumped", "no progress", "never arrived", "do not exist", "ERROR",
         "CRITICAL", "Traceback", "Error", "rebalanc", "Heartbeat", "standing by", "owns", "stopped after",
         "Signal received", "from the beginning", "first record")  # fmt: skip


def clues(workdir: Path, limit: int = 80, stack_lines: int = 300) -> list[str]:
    """The lines of the workers' logs (in the order they were last written) that say where partitions resumed and
    what went wrong: a failed run in CI, whose directory is gone, is diagnosed from these."""
    out: list[str] = []
    for log_file in sorted(workdir.glob("worker*.log"), key=lambda f: f.stat().st_mtime):
        text = log_file.read_text(errors="replace")
        lines = [ln.rstrip() for ln in text[: text.find("THREAD ") if "THREAD " in text else None].splitlines()]
        stamp = ""
        for n, line in enumerate(lines):
            if line.startswith("[") and "]" in line[:12]:
                stamp = line[1:9]
            if any(c in line for c in CLUES):
                tail = " ".join(x.strip() for x in lines[n + 1 : n + 4] if x.startswith(" " * 20))
                out.append(f"{log_file.name} {stamp} {line.strip()} {tail}".strip()[:400])
    out = out[-limit:]
    for log_file in sorted(workdir.glob("worker*.log"), key=lambda f: f.stat().st_mtime):
        text = log_file.read_text(errors="replace")
        if "THREAD " in text:  # the stacks a stalled worker wrote when asked (see `run_once`)
            lines = text[text.index("THREAD ") :].splitlines()
            keep = [ln[:300] for n, ln in enumerate(lines) if ln.startswith(("THREAD ", "Stack for", '  File "'))
                    or (n and lines[n - 1].startswith('  File "'))]  # fmt: skip
            out += [f"{log_file.name} stacks:", *keep[:stack_lines]]
    return out


def check(report: Report, plan: Plan, bootstrap: str, cfg: Settings, lake: Path, ops: dict[str, str],
          with_feedback: set[str], expected_rewards: Counter[str], positions: dict[str, tuple[int, int]],
          samples: list[tuple[float, int, int]]) -> None:  # fmt: skip
    """The oracle: the outputs against what the planted stream must produce."""
    import duckdb

    from streams.sqlapi import query

    problems = report.problems
    want = {(iid, 0) for iid in ops} | {(iid, 1) for iid in with_feedback}
    # 1. the scores topic, read from offset 0: every planted revision, with the planted reward
    first_sent: dict[str, float] = {}
    got: set[tuple[str, int]] = set()
    for rec in read_topic(bootstrap, "taoflow.scores"):
        doc = json.loads(rec.value)
        key = (doc["interaction_id"], doc["revision"])
        got.add(key)
        if abs(doc["reward"] - OPERATORS[ops.get(doc["interaction_id"], "good")]) > 1e-12:
            problems.append(f"score {key} has reward {doc['reward']}")
        if doc["revision"] == 0:
            first_sent[doc["interaction_id"]] = min(first_sent.get(doc["interaction_id"], 1e18), rec.timestamp)
    missing = want - got
    if missing:
        problems.append(f"{len(missing)} score revisions missing from taoflow.scores, e.g. {sorted(missing)[:5]}")
    if got - want:
        problems.append(f"{len(got - want)} unexpected score revisions, e.g. {sorted(got - want)[:5]}")
    report.lost += len(missing)
    # 2. utilities: the latest update per operator equals the closed form with the exact count
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_topic(bootstrap, "taoflow.utilities"):
        doc = json.loads(rec.value)
        if doc["operator"] not in latest or doc["n"] >= latest[doc["operator"]]["n"]:
            latest[doc["operator"]] = doc
    for op, n in expected_rewards.items():
        doc = latest.get(op)
        if doc is None or doc["n"] != n:
            problems.append(f"utility of {op}: n={doc and doc['n']}, expected {n}")
            continue
        err = abs(doc["utility"] - utility_after(0.0, OPERATORS[op], ALPHA, n))
        report.utility_error = max(report.utility_error, err)
        if err > 1e-9:
            problems.append(f"utility of {op} off the closed form by {err:.3g}")
    # 3. DuckDB: each row exactly once
    rows = query("SELECT (SELECT count(*) FROM interactions), (SELECT count(DISTINCT event_id) FROM interactions), "
                 "(SELECT count(*) FROM scores), (SELECT count(DISTINCT (interaction_id, revision)) FROM scores), "
                 "(SELECT count(*) FROM feedback), (SELECT count(*) FROM dead_letters)", cfg).rows[0]  # fmt: skip
    n_i, d_i, n_s, d_s, n_f, n_dead = rows
    if (n_i, d_i) != (len(ops), len(ops)):
        problems.append(f"DuckDB interactions: {n_i} rows, {d_i} distinct, expected {len(ops)}")
    if (n_s, d_s) != (len(want), len(want)):
        problems.append(f"DuckDB scores: {n_s} rows, {d_s} distinct, expected {len(want)}")
    if n_f != len(with_feedback) or n_dead:
        problems.append(f"DuckDB feedback {n_f} (expected {len(with_feedback)}), dead letters {n_dead} (expected 0)")
    report.lost += max(0, len(ops) - d_i) + max(0, len(want) - d_s)
    report.duplicated += (n_i - d_i) + (n_s - d_s)
    # 4. the raw Parquet files: every interaction exactly once
    files = f"{lake}/interactions/**/*.parquet"
    n_p, d_p = duckdb.connect().execute(f"SELECT count(*), count(DISTINCT event_id) FROM read_parquet('{files}')"
                                        ).fetchone() or (0, 0)  # fmt: skip
    if (n_p, d_p) != (len(ops), len(ops)):
        problems.append(f"Parquet interactions: {n_p} rows, {d_p} distinct, expected {len(ops)}")
    report.duplicated += n_p - d_p
    # 5. the online invariant: a committed offset never passed an interaction whose score was not yet in Kafka
    by_partition: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for iid, (p, off) in positions.items():
        by_partition[p].append((off, iid))
    for offs in by_partition.values():
        offs.sort()
    bad: set[str] = set()
    for seen_ms, p, committed in samples:
        for off, iid in by_partition.get(p, []):
            if off >= committed:
                break
            if first_sent.get(iid, 1e18) > seen_ms + 5:  # Kafka timestamps are in ms
                bad.add(iid)
    if bad:
        problems.append(f"commit passed {len(bad)} interactions not yet scored, e.g. {sorted(bad)[:5]}")
    if missing:
        # where the group stands against where each partition's first unscored interaction is: a commit past it is
        # a loss (reported above); a commit behind it is a stall (nothing processed it)
        first_missing = {p: next((off for off, iid in offs if (iid, 0) in missing), None)
                         for p, offs in by_partition.items()}  # fmt: skip
        problems.append(f"committed offsets at the end {dict(sorted(report.committed.items()))}; first unscored "
                        f"interaction per partition {dict(sorted(first_missing.items()))}")  # fmt: skip
    report.invariant_violations = len(bad)
    report.ok = not problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="first run's seed; run i uses seed + i")
    ap.add_argument("--replay", type=int, help="run this one seed again")
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds over which the stream is produced")
    ap.add_argument("--faults", type=int, default=4, help="faults drawn per run")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (logs, DuckDB, lake)")
    args = ap.parse_args()
    seeds = [args.replay] if args.replay is not None else [args.seed + i for i in range(args.runs)]
    totals: Counter[str] = Counter()
    failed: list[int] = []
    lost = duplicated = violations = 0
    t0 = time.monotonic()
    for n, seed in enumerate(seeds, 1):
        plan = Plan.draw(seed, args.events, args.workers, args.duration, args.faults)
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-"))
        try:
            report = run_once(plan, workdir)
        except Exception as exc:
            report = Report(seed=seed, ok=False, problems=[f"run failed: {exc!r}"])
        totals.update(report.faults)
        lost += report.lost
        duplicated += report.duplicated
        violations += report.invariant_violations
        status = "ok" if report.ok else "FAILED"
        print(f"[{n}/{len(seeds)}] seed {seed}: {status} in {report.seconds:.0f}s; faults {dict(report.faults)}; "
              f"{report.interactions} interactions, {report.rewards} rewards; lost {report.lost}, duplicated "
              f"{report.duplicated}, invariant violations {report.invariant_violations}", flush=True)  # fmt: skip
        if not report.ok:
            failed.append(seed)
            print("    " + "\n    ".join(report.problems + report.clues), flush=True)
            print(f"    plan: {json.dumps(asdict(plan))}\n    logs: {workdir}  (replay: --replay {seed})", flush=True)
        elif not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{len(seeds)} runs in {time.monotonic() - t0:.0f}s: {len(seeds) - len(failed)} passed, "
          f"{len(failed)} failed {failed}; faults injected {sum(totals.values())} {dict(totals)}; "
          f"records lost {lost}, duplicated {duplicated}, invariant violations {violations}")  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
