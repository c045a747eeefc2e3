"""The agent SDK against the real embedded broker: exactly-once arrival, spool across restarts, bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas import EventValidationError, InteractionEvent, parse_event
from schemas.topics import FEEDBACK, INTERACTIONS
from taoflow import Emitter
from taoflow.broker import EmbeddedBroker
from taoflow.exceptions import SpoolError, SpoolFullError
from taoflow.settings import Settings
from taoflow.spool import Record, Spool
from tests.conftest import free_port, read_topic

pytestmark = pytest.mark.broker
CHILD = Path(__file__).with_name("spool_child.py")


def test_ten_thousand_interactions_arrive_exactly_once(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    topic_before = len(read_topic(broker.bootstrap, INTERACTIONS, 0, timeout=1))
    em = Emitter(make_settings(broker.bootstrap), spool_dir=tmp_path / "spool", agent_id="a1")
    ids = [
        em.emit_interaction(task_type="qa", operator=f"op{i % 3}", prompt=f"q{i}", response=f"a{i}", latency_ms=i)
        for i in range(10_000)
    ]
    fid = em.emit_feedback(interaction_id=ids[0], kind="thumbs", value=1.0)
    assert em.flush(timeout=60)
    stats = em.stats()
    em.close()
    assert stats.delivered == 10_001 and stats.spooled == 0 and stats.dropped == 0
    assert len(set(ids)) == 10_000

    records = read_topic(broker.bootstrap, INTERACTIONS, topic_before + 10_000)
    mine = [r for r in records if r.key.decode() in set(ids)]
    counts = Counter(r.key.decode() for r in mine)
    assert len(counts) == 10_000 and max(counts.values()) == 1  # every event once, none twice
    for r in mine[:200] + mine[-200:]:
        ev = parse_event(InteractionEvent, r.value)
        assert ev.event_id == r.key.decode() and ev.agent_id == "a1"
    fb = [r for r in read_topic(broker.bootstrap, FEEDBACK, 1) if json.loads(r.value)["event_id"] == fid]
    assert len(fb) == 1 and fb[0].key == ids[0].encode()  # feedback is keyed by interaction id


def test_invalid_event_raises_in_caller_and_nothing_is_queued(make_settings: Callable[..., Settings]) -> None:
    em = Emitter(make_settings("127.0.0.1:1"), agent_id="bad")
    with pytest.raises(EventValidationError, match="field 'value'"):
        em.emit_feedback(interaction_id="x", kind="thumbs", value=3)
    with pytest.raises(EventValidationError, match="field 'task_type'"):
        em.emit_interaction(task_type="", operator="o", prompt="p", response="r")
    assert em.stats().emitted == 0
    em.close(timeout=0.1)


def _spawn(bootstrap: str, spool: Path, start: int, count: int, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.Popen(
        [sys.executable, str(CHILD), bootstrap, str(spool), str(start), str(count), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(prefix), f"child said {line!r}"
    return line


def test_spool_survives_kill_and_delivers_all_once_when_broker_returns(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    spool = tmp_path / "spool"

    first = _spawn(bootstrap, spool, 0, 500, "wait")  # broker is down: everything goes to disk
    line = _expect(first, "emitted 500")
    assert float(line.split("slowest_call_ms=")[1]) < 50, line  # the calls return at once
    assert _expect(first, "spooled").startswith("spooled 500")
    first.send_signal(signal.SIGKILL)  # the agent process dies without closing anything
    first.wait()

    second = _spawn(bootstrap, spool, 500, 500, "flush")  # restarted agent; the broker is still down
    _expect(second, "emitted 500")
    assert "backlog 1000" in _expect(second, "spooled")

    with EmbeddedBroker(Settings(overrides={"broker": {"port": port}})):
        line = _expect(second, "flushed")
        assert line.startswith("flushed True"), line
        second.wait(30)
        records = read_topic(bootstrap, INTERACTIONS, 1000)
    ids = Counter(r.key.decode() for r in records)
    assert len(ids) == 1000 and max(ids.values()) == 1
    assert set(ids) == {f"ev-{i:05d}" for i in range(1000)}
    by_partition: dict[int, list[int]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(json.loads(r.value)["metadata"]["seq"])
    for seqs in by_partition.values():
        assert seqs == sorted(seqs)  # delivered in emission order
    assert not list(spool.glob("*.spool"))  # the spool is empty once delivered


def test_close_spools_what_it_cannot_deliver(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(f"127.0.0.1:{free_port()}")
    em = Emitter(settings, spool_dir=tmp_path / "s", reconnect_backoff_s=0.1)
    for i in range(20):
        em.emit_interaction(task_type="t", operator="o", prompt=str(i), response="r")
    t0 = time.monotonic()
    em.close(timeout=0.5)
    assert time.monotonic() - t0 < 10
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    assert len(spool) == 20
    spool.close()


def test_spool_bound_drop_newest_is_counted(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    em = Emitter(make_settings(f"127.0.0.1:{free_port()}"), spool_dir=tmp_path / "s", spool_max_bytes=4000)
    for i in range(50):
        em.emit_interaction(task_type="t", operator="o", prompt=str(i), response="r")
    em.close(timeout=0.2)
    s = em.stats()
    assert s.dropped > 0 and s.spooled + s.dropped == 50 and s.spool_bytes <= 4000


def test_spool_bound_error_policy_raises(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    em = Emitter(
        make_settings(f"127.0.0.1:{free_port()}"), spool_dir=tmp_path / "s", spool_max_bytes=2000, on_full="error"
    )
    with pytest.raises(SpoolFullError, match="TAOFLOW_SDK_SPOOL_MAX_BYTES"):
        for i in range(1000):
            em.emit_interaction(task_type="t", operator="o", prompt=str(i), response="r")
            time.sleep(0.002)
    em.close(timeout=0.2)


def test_spool_drop_oldest_keeps_newest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=5_000, segment_bytes=1000)
    for _ in range(12):
        spool.append([Record("t", b"k", b"x" * 100) for _ in range(5)])
    assert len(spool) < 60 and spool.bytes <= 5_000  # the bound held
    kept = len(spool)
    lost = spool.drop_oldest()
    assert lost > 0 and len(spool) == kept - lost
    spool.close()


def test_spool_cuts_a_torn_tail_and_is_exclusive(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    spool.append([Record("t", None, b"a"), Record("t", b"k2", b"b")])
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(tmp_path / "s", max_bytes=1 << 20)
    spool.close()
    seg = next((tmp_path / "s").glob("*.spool"))
    with open(seg, "ab") as fh:
        fh.write(b"\x10\x00\x00\x00garbage")  # a crash in the middle of a write
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    head = spool.head()
    assert head is not None
    assert head[1] == [Record("t", None, b"a"), Record("t", b"k2", b"b")]
    spool.ack(head[0], 1)
    spool.close()
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)  # progress inside a segment survives a restart
    head = spool.head()
    assert head is not None and head[1] == [Record("t", b"k2", b"b")]
    spool.ack(head[0], 1)
    assert len(spool) == 0 and spool.head() is None
    spool.close()


def test_session_stamps_every_step_and_sends_session_feedback(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    em = Emitter(make_settings(broker.bootstrap), spool_dir=tmp_path / "spool", agent_id="agent-s")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with em.session(task_type="ticket") as s:
        first = s.emit_interaction(operator="plan", prompt="open the ticket", response="calling lookup",
                                   tools=tools, finish_reason="tool_calls")  # fmt: skip
        ids = [first, *(s.emit_interaction(prompt=f"step {n}", response="ok") for n in (1, 2))]
        early = s.feedback("thumbs", 1.0)
    late = s.feedback("task_success", 1.0)  # outcomes come after the task: allowed once closed
    with pytest.raises(RuntimeError, match="closed"):
        s.emit_interaction(prompt="more", response="no")
    with pytest.raises(ValueError, match="needs operator"):
        em.session(task_type="t").emit_interaction(prompt="p", response="r")
    assert em.flush(timeout=30)
    em.close()
    steps = {json.loads(r.value)["event_id"]: json.loads(r.value) for r in _records(broker, INTERACTIONS, ids)
             if json.loads(r.value).get("session_id") == s.session_id}  # fmt: skip
    assert [(steps[i]["step"], steps[i]["operator"], steps[i]["task_type"]) for i in ids] == [
        (0, "plan", "ticket"), (1, "plan", "ticket"), (2, "plan", "ticket")]  # fmt: skip
    assert steps[first]["tools"] == tools and steps[first]["finish_reason"] == "tool_calls"
    fb = {json.loads(r.value)["event_id"]: r for r in _records(broker, FEEDBACK, [early, late])}
    for eid in (early, late):
        doc = json.loads(fb[eid].value)
        assert doc["session_id"] == s.session_id and doc["interaction_id"] is None
        assert fb[eid].key == s.session_id.encode()  # keyed by session, as the stream joins it


def _records(broker: EmbeddedBroker, topic: str, ids: list[str], timeout: float = 30.0) -> list[Any]:
    """The topic's records from its start, read again (expecting more each time) until all of `ids` are in."""
    deadline, expected = time.monotonic() + timeout, 1
    while True:
        records = read_topic(broker.bootstrap, topic, expected, timeout=5)
        if {json.loads(r.value)["event_id"] for r in records} >= set(ids) or time.monotonic() > deadline:
            return records
        expected = len(records) + 1
