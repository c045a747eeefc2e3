"""Multi-step sessions in the stream worker (issue 15): session feedback joins every step, whenever it comes, and
rewards the operator that ran the session once per session, not once per step.

The worker's real processors run on the broker-free harness (`tests.streams.memory`): each output is handed to the
next processor as Kafka would, and every record is landed with the lander's real row mapping in a real DuckDB file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas import topics as names
from streams import expiry
from streams.topics import REWARDS_INTERNAL, SESSIONS_INTERNAL
from tests.streams.memory import Worker

ALICE, MALLORY = "a" * 32, "b" * 32
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path)
    yield w
    w.con.close()


def step(n: int, sid: str = "s1", caller: str | None = ALICE, operator: str = "plan", r: float = 0.25,
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"event_id": f"{sid}-{n}", "ts": (T0 + timedelta(seconds=10 * n)).isoformat(), "agent_id": "agent",
            "task_type": "ticket", "operator": operator, "prompt": f"step {n}", "response": "ok",
            "metadata": {"r": r}, "caller": caller, "session_id": sid, "step": n, **extra}  # fmt: skip


def session_fb(eid: str, value: float, sid: str = "s1", caller: str | None = ALICE, kind: str = "task_success",
               second: int = 100) -> dict[str, Any]:  # fmt: skip
    return {"event_id": eid, "session_id": sid, "ts": (T0 + timedelta(seconds=second)).isoformat(), "kind": kind,
            "value": value, "caller": caller}  # fmt: skip


def rewards(worker: Worker) -> list[dict[str, Any]]:
    return [orjson.loads(m.value) for m in worker.log[REWARDS_INTERNAL]]


def step_parts(worker: Worker, sid: str = "s1") -> dict[str, dict[str, float]]:
    rows = worker.sql(
        "SELECT interaction_id, parts FROM final_scores WHERE interaction_id LIKE ? ORDER BY 1", f"{sid}-%"
    )
    return {iid: json.loads(parts) for iid, parts in rows}


ORDERS = {
    "before": ["fb", 0, 1, 2],
    "between": [0, 1, "fb", 2],
    "after": [0, 1, 2, "fb"],
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_session_feedback_before_between_or_after_its_steps(worker: Worker, order: str) -> None:
    for item in ORDERS[order]:
        if item == "fb":
            worker.send(names.FEEDBACK, session_fb("done", 1.0))
        else:
            worker.send(names.INTERACTIONS, step(int(item)))
    # every step scored with its own part and the session's outcome joined
    assert step_parts(worker) == {f"s1-{n}": {"planted": 0.25, "feedback.task_success": 1.0} for n in range(3)}
    # one utility update for the session, to the operator that ran it; no per-step rewards
    [reward] = rewards(worker)
    assert reward["iid"] == f"session:{ALICE}|s1" and 0.99 < reward["r"] <= 1.0
    assert worker.sql("SELECT task_type, operator, n FROM utilities") == [("ticket", "plan", 1)]
    # the sessions view, exact
    [row] = worker.sql("SELECT session_id, caller, task_type, operator, adapter, steps, reward, rewarded, duration_s "
                       "FROM session_outcomes")  # fmt: skip
    assert row == ("s1", ALICE, "ticket", "plan", "base", 3, 1.0, True, 20.0)
    assert worker.sql("SELECT session_id, interaction_id, kind FROM feedback") == [("s1", None, "task_success")]
    assert worker.sql("SELECT session_id, step FROM interactions ORDER BY step") == [("s1", 0), ("s1", 1), ("s1", 2)]
    assert worker.sql("SELECT operator, sessions, mean_steps, mean_reward FROM session_leaderboard") == [
        ("plan", 1, 3.0, 1.0)
    ]


def test_feedback_kinds_before_between_and_after_one_update_every_step_joined(worker: Worker) -> None:
    worker.send(names.FEEDBACK, session_fb("f1", 1.0, kind="task_success", second=1))
    worker.send(names.INTERACTIONS, step(0))
    worker.send(names.INTERACTIONS, step(1))
    worker.send(names.FEEDBACK, session_fb("f2", 0.0, kind="thumbs", second=15))
    worker.send(names.INTERACTIONS, step(2))
    worker.send(names.FEEDBACK, session_fb("f3", 0.5, kind="rating", second=100))
    joined = {"planted": 0.25, "feedback.task_success": 1.0, "feedback.thumbs": 0.0, "feedback.rating": 0.5}
    assert step_parts(worker) == {f"s1-{n}": joined for n in range(3)}
    assert len(rewards(worker)) == 1  # once per session: when a step and session feedback were first both known
    [(n,)] = worker.sql("SELECT n FROM utilities WHERE operator = 'plan'")
    assert n == 1
    [(reward, feedback, revisions)] = worker.sql(
        "SELECT o.reward, o.feedback, (SELECT count(*) FROM sessions) FROM session_outcomes o"
    )
    assert reward == pytest.approx(0.5) and json.loads(feedback) == {"task_success": 1.0, "thumbs": 0.0, "rating": 0.5}
    assert revisions == 6  # a revision per step and per feedback


def test_redelivery_duplicates_nothing(worker: Worker) -> None:
    worker.send(names.INTERACTIONS, step(0))
    worker.send(names.FEEDBACK, session_fb("done", 1.0))
    worker.send(names.INTERACTIONS, step(1))
    before = worker.sql("SELECT count(*) FROM sessions")
    # every session record delivered again (a crash before its offsets were committed), then the inputs again
    worker.run(list(worker.log[SESSIONS_INTERNAL]))
    worker.send(names.INTERACTIONS, step(1))
    worker.send(names.FEEDBACK, session_fb("done", 1.0))
    assert worker.sql("SELECT n FROM utilities") == [(1,)]
    assert worker.sql("SELECT count(*) FROM sessions") == before
    assert worker.sql("SELECT count(*), count(DISTINCT interaction_id) FROM final_scores") == [(2, 2)]
    assert (
        worker.ctx.counters["duplicate_session_steps"] >= 2 and worker.ctx.counters["duplicate_session_feedback"] >= 2
    )


def test_sessions_are_kept_per_caller(worker: Worker) -> None:
    worker.send(names.INTERACTIONS, step(0))
    worker.send(names.INTERACTIONS, step(1, caller=MALLORY, operator="sabotage"))  # the same session id, another key
    worker.send(names.FEEDBACK, session_fb("m", 0.0, caller=MALLORY))
    worker.send(names.FEEDBACK, session_fb("a", 1.0, caller=ALICE))
    rows = worker.sql("SELECT caller, operator, steps, reward FROM session_outcomes ORDER BY caller")
    assert rows == [(ALICE, "plan", 1, 1.0), (MALLORY, "sabotage", 1, 0.0)]
    assert step_parts(worker)["s1-0"] == {"planted": 0.25, "feedback.task_success": 1.0}  # Mallory's 0.0 not joined


def test_forced_session_is_landed_but_rewards_no_utility(worker: Worker) -> None:
    worker.send(names.INTERACTIONS, step(0, forced=True))
    worker.send(names.FEEDBACK, session_fb("done", 1.0))
    assert rewards(worker) == [] and worker.sql("SELECT count(*) FROM utilities") == [(0,)]
    assert worker.sql("SELECT steps, reward, rewarded FROM session_outcomes") == [(1, 1.0, False)]


def test_session_feedback_whose_session_never_comes_is_dead_lettered_at_expiry(worker: Worker) -> None:
    sent = session_fb("lonely", 1.0, sid="ghost")
    worker.send(names.FEEDBACK, sent)
    out = worker.ctx.outbox()
    parts = worker.ctx.settings.broker.partitions
    assigned = {(SESSIONS_INTERNAL, p) for p in range(parts)}
    counts = expiry.expire(worker.ctx, out, assigned, now=datetime.now(UTC).timestamp() + 8 * 24 * 3600)
    assert counts["expired_feedback"] == 1 and counts["expired_sessions"] == 1
    [(_, value, _)] = out.msgs[names.DEAD_LETTERS]
    letter = orjson.loads(value)
    assert "no step of it arrived" in letter["error"] and letter["source_topic"] == names.FEEDBACK
    assert worker.ctx.sessions.data == {}


def test_feedback_names_exactly_one_target(worker: Worker) -> None:
    both = {**session_fb("both", 1.0), "interaction_id": "s1-0"}
    worker.send(names.FEEDBACK, both)
    [(error,)] = worker.sql("SELECT error FROM dead_letters")
    assert "exactly one of interaction_id and session_id" in error


def test_report_and_dashboard_show_session_outcomes_per_operator(worker: Worker) -> None:
    from rich.console import Console

    from serving.dashboard import dashboard_data
    from taoflow import report

    for sid, operator, value in (("a", "plan", 1.0), ("b", "plan", 0.0), ("c", "react", 1.0)):
        for n in range(2):
            worker.send(names.INTERACTIONS, step(n, sid=sid, operator=operator))
        worker.send(names.FEEDBACK, session_fb(f"fb-{sid}", value, sid=sid))
    worker.con.close()
    data = report.gather(worker.ctx.settings)
    rows = {r["operator"]: (r["sessions"], r["mean_steps"], r["mean_reward"]) for r in data["sessions"]}
    assert rows == {"plan": (2, 2.0, 0.5), "react": (1, 2.0, 1.0)}
    console = Console(record=True, width=160)
    report.render(data, console)
    text = console.export_text()
    assert "Session outcomes per operator" in text and "0.500 [" in text
    assert {r["operator"] for r in dashboard_data(worker.ctx.settings)["sessions"]} == {"plan", "react"}


@pytest.mark.broker
@pytest.mark.slow
def test_sessions_through_the_real_worker_survive_a_kill(fresh_broker: Any, tmp_path: Path) -> None:
    """240 three-step sessions, session feedback before, between or after the steps, through the embedded broker and
    a real worker killed with SIGKILL midway: one utility update per session, every step joined, the view exact."""
    import random
    import signal
    import threading
    import time

    from kafka import KafkaProducer

    from streams.sqlapi import query
    from tests.streams.harness import settings_for, start_worker, stop, wait_for, worker_env

    rng = random.Random(11)
    sessions = [(f"e2e-{k}", ("plan", "react")[k % 2], rng.choice((0.0, 1.0)), rng.randrange(4)) for k in range(240)]
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=5)

    def produce() -> None:
        for n, (sid, op, value, at) in enumerate(sessions):
            docs = [(names.INTERACTIONS, step(i, sid=sid, caller=None, operator=op)) for i in range(3)]
            docs.insert(at, (names.FEEDBACK, session_fb(f"fb-{sid}", value, sid=sid, caller=None)))
            for topic, doc in docs:
                key = (doc.get("session_id") if topic == names.FEEDBACK else doc["event_id"]).encode()
                producer.send(topic, key=key, value=orjson.dumps(doc))
            if n % 20 == 19:
                time.sleep(0.2)  # about 100 sessions/s, so the kill lands in the middle
        producer.flush()
        producer.close()

    data = tmp_path / "data"
    env = worker_env(fresh_broker.bootstrap, data, "sessions")
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    feeder = threading.Thread(target=produce)
    feeder.start()
    try:
        wait_for(data, "SELECT count(*) FROM sessions", lambda r: r.rows[0][0] >= 120, timeout=180)
        stop(worker, signal.SIGKILL)
        worker = start_worker(env, log)
        feeder.join()
        wait_for(data, "SELECT count(*) FROM session_outcomes WHERE steps = 3 AND reward IS NOT NULL",
                 lambda r: r.rows[0][0] >= len(sessions), timeout=240)  # fmt: skip
        # a session's reward reaches its utility two hops after its outcome (rewards topic, then utilities)
        wait_for(data, "SELECT coalesce(sum(n), 0) FROM utilities", lambda r: r.rows[0][0] >= len(sessions),
                 timeout=120)  # fmt: skip
        time.sleep(3)  # anything extra (a duplicate) would land by now
        settings = settings_for(data)
        per_op = {op: sum(1 for s in sessions if s[1] == op) for op in ("plan", "react")}
        assert dict(query("SELECT operator, n FROM utilities", settings).rows) == per_op  # once per session
        outcomes = {sid: (op, steps, reward, rewarded) for sid, op, steps, reward, rewarded in query(
            "SELECT session_id, operator, steps, reward, rewarded FROM session_outcomes", settings).rows}  # fmt: skip
        assert outcomes == {sid: (op, 3, value, True) for sid, op, value, _ in sessions}
        joined = query("SELECT count(*) FROM final_scores WHERE parts->>'feedback.task_success' IS NOT NULL",
                       settings).rows[0][0]  # fmt: skip
        assert joined == 3 * len(sessions)
        dup = query("SELECT count(*) - count(DISTINCT event_id) FROM interactions", settings).rows[0][0]
        assert dup == 0
    finally:
        feeder.join()
        stop(worker)
