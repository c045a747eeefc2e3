"""The agent SDK: `Emitter` sends events without blocking the agent and spools to disk while Kafka is away."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.base import EventModel, Limits, new_event_id, parse_event
from schemas.feedback import FeedbackEvent, FeedbackKind
from schemas.interactions import ChatMessage, InteractionEvent
from taoflow.broker import reachable
from taoflow.exceptions import SpoolError, SpoolFullError
from taoflow.settings import Settings
from taoflow.spool import Record, Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmitterStats:
    """Counters since this Emitter started (spooled/backlog include what an earlier process left)."""

    emitted: int
    delivered: int
    spooled: int
    dropped: int
    failed_sends: int
    pending: int
    spool_records: int
    spool_bytes: int
    connected: bool


class Emitter:
    """Emit InteractionEvents and FeedbackEvents to Kafka from an agent process.

    `emit_*` validates the event in the caller's thread (so a bad event raises at once with the field
    named), queues it and returns its event id; a background thread does all network and disk work.
    While the broker is unreachable, events are appended to a crash-safe spool on disk and delivered,
    in order, once it is back. The spool is bounded (`spool_max_bytes`); what does not fit is handled
    by `on_full`: `drop_newest` / `drop_oldest` (counted in `stats().dropped` and logged) or `error`
    (`emit_*` raises SpoolFullError).

    Durability: an event is on disk or acknowledged by Kafka within `linger_ms` of `emit_*` returning;
    `close()` guarantees it for everything emitted.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        bootstrap: str | None = None,
        spool_dir: str | Path | None = None,
        agent_id: str = "default",
        **sdk_overrides: Any,
    ) -> None:
        self.settings = settings or Settings()
        cfg = self.settings.sdk.model_copy(update=sdk_overrides) if sdk_overrides else self.settings.sdk
        self.cfg = cfg
        self.agent_id = agent_id
        self.bootstrap = bootstrap or self.settings.bootstrap
        self.limits: Limits = self.settings.limits.limits()
        self._ctx = {"limits": self.limits}
        directory = Path(spool_dir or cfg.spool_dir or self.settings.core.data_dir / "spool" / agent_id)
        self._spool = Spool(directory, cfg.spool_max_bytes, cfg.spool_segment_bytes)
        self._queue: deque[Record] = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._lock = threading.Lock()
        self._inflight = 0
        self._emitted = self._delivered = self._spooled = self._dropped = self._failed_sends = 0
        self._spool_records = len(self._spool)
        self._producer: Any = None
        self._next_connect = 0.0
        self._closing = False
        self._closed = False
        self._spool_full = False  # set when the spool refused a record; cleared once it shrinks
        self._count_lost_in_spool()
        if self._spool_records:
            log.info("spool %s holds %d undelivered events; delivering them first", directory, self._spool_records)
        self._thread = threading.Thread(target=self._run, name="taoflow-emitter", daemon=True)
        self._thread.start()

    # public API

    def emit_interaction(
        self,
        *,
        task_type: str,
        operator: str,
        prompt: str | list[dict[str, Any]] | list[ChatMessage],
        response: str,
        adapter: str | None = None,
        latency_ms: float = 0.0,
        metadata: dict[str, Any] | None = None,
        agent_id: str | None = None,
        event_id: str | None = None,
        ts: Any = None,
        tools: list[dict[str, Any]] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        response_format: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        session_id: str | None = None,
        step: int | None = None,
    ) -> str:
        """Queue an InteractionEvent and return its event id (pass `event_id` to make retries idempotent).

        A tool-using call passes the `tools` offered, the `tool_calls` made, the `response_format` asked for and
        the `finish_reason`; a step of a multi-step task its `session_id` and `step` (or use `session()`)."""
        data: dict[str, Any] = {
            "agent_id": agent_id or self.agent_id,
            "task_type": task_type,
            "operator": operator,
            "prompt": prompt,
            "response": response,
            "adapter": adapter,
            "latency_ms": latency_ms,
            "metadata": metadata or {},
        }
        optional = {"tools": tools, "tool_calls": tool_calls, "response_format": response_format,
                    "finish_reason": finish_reason, "session_id": session_id, "step": step}  # fmt: skip
        data.update({k: v for k, v in optional.items() if v is not None})
        if event_id is not None:
            data["event_id"] = event_id
        if ts is not None:
            data["ts"] = ts
        return self.emit(self._validate(InteractionEvent, data))

    def emit_feedback(
        self,
        *,
        interaction_id: str | None = None,
        kind: FeedbackKind,
        value: float,
        metadata: dict[str, Any] | None = None,
        event_id: str | None = None,
        ts: Any = None,
        session_id: str | None = None,
    ) -> str:
        """Queue a FeedbackEvent about `interaction_id`, or about a whole multi-step session with `session_id`
        (value in [0, 1]), and return its event id."""
        data: dict[str, Any] = {
            "interaction_id": interaction_id,
            "session_id": session_id,
            "kind": kind,
            "value": value,
            "metadata": metadata or {},
        }
        if event_id is not None:
            data["event_id"] = event_id
        if ts is not None:
            data["ts"] = ts
        return self.emit(self._validate(FeedbackEvent, data))

    def session(
        self, session_id: str | None = None, *, task_type: str | None = None, operator: str | None = None
    ) -> Session:
        """A multi-step task, as a context manager: every interaction emitted through it carries its session id and
        the next step (0, 1, ...), and the task type and operator of its first step unless given; `feedback()`
        scores the session as a whole (the stream joins it to every step and rewards the operator once).

            with emitter.session(task_type="ticket", operator="plan-then-act") as s:
                s.emit_interaction(prompt=..., response=...)  # step 0
                s.emit_interaction(prompt=..., response=...)  # step 1
                s.feedback("task_success", 1.0)
        """
        return Session(self, session_id or new_event_id(), task_type=task_type, operator=operator)

    def emit(self, event: InteractionEvent | FeedbackEvent) -> str:
        """Queue an already-built event; returns its event id."""
        if self._closing:
            raise RuntimeError("Emitter is closed")
        policy = self.cfg.on_full
        if policy == "error" and self._spool_full:
            raise SpoolFullError(
                f"spool {self._spool.dir} is full ({self.cfg.spool_max_bytes} bytes) and Kafka at {self.bootstrap} is "
                "unreachable; raise TAOFLOW_SDK_SPOOL_MAX_BYTES or restore the broker"
            )
        if len(self._queue) >= self.cfg.max_pending:
            # the sender is far behind (very slow disk or broker): the same policy as a full spool
            if policy == "error":
                raise SpoolFullError(
                    f"{len(self._queue)} events wait in memory (TAOFLOW_SDK_MAX_PENDING); the sender cannot keep up"
                )
            if policy == "drop_oldest":
                self._queue.popleft()
            self._count_dropped(1, f"in-memory queue full ({policy})")
            if policy == "drop_newest":
                with self._lock:
                    self._emitted += 1
                return event.event_id
        with self._lock:
            self._emitted += 1
        rec = Record(event.topic, event.key(), event.to_json_bytes())
        self._queue.append(rec)
        if len(self._queue) == 1:
            self._wake.set()
        return event.event_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything emitted (and any spooled backlog) is acknowledged by Kafka; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.set()
        with self._idle:
            while not self._drained():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(0.05 if remaining is None else min(remaining, 0.05))
                self._wake.set()
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within `timeout`, spool the rest to disk, stop. Idempotent."""
        if self._closed:
            return
        self.flush(timeout)
        self._closing = True
        self._wake.set()
        self._thread.join(timeout + 5)
        self._closed = True

    def stats(self) -> EmitterStats:
        with self._lock:
            return EmitterStats(
                emitted=self._emitted,
                delivered=self._delivered,
                spooled=self._spooled,
                dropped=self._dropped,
                failed_sends=self._failed_sends,
                pending=len(self._queue) + self._inflight,
                spool_records=self._spool_records,
                spool_bytes=self._spool.bytes,
                connected=self._producer is not None,
            )

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # internals

    def _validate(self, model: type[EventModel], data: dict[str, Any]) -> Any:
        return parse_event(model, data, self.limits)  # EventValidationError naming each bad field

    def _drained(self) -> bool:
        return not self._queue and self._inflight == 0 and self._spool_records == 0

    def _count_dropped(self, n: int, why: str) -> None:
        with self._lock:
            self._dropped += n
            total = self._dropped
        log.warning("dropped %d events: %s (dropped so far: %d)", n, why, total)

    def _count_lost_in_spool(self) -> None:
        lost = self._spool.take_lost()
        if lost:
            self._count_dropped(lost, f"damaged records in spool {self._spool.dir} (kept in its *.corrupt files)")

    def _connect(self) -> bool:
        if self._producer is not None:
            return True
        if time.monotonic() < self._next_connect:
            return False
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        if not reachable(self.bootstrap):
            # constructing a producer against a dead cluster blocks for its bootstrap timeout; a socket probe is cheap
            self._next_connect = time.monotonic() + self.cfg.reconnect_backoff_s
            return False
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=f"{self.settings.kafka.client_id}-sdk-{self.agent_id}",
                enable_idempotence=True,
                acks="all",
                linger_ms=self.cfg.linger_ms,
                delivery_timeout_ms=self.cfg.delivery_timeout_ms,
                request_timeout_ms=min(10_000, self.cfg.delivery_timeout_ms - self.cfg.linger_ms - 1),
                max_block_ms=2_000,
                bootstrap_timeout_ms=2_000,
                **self.settings.kafka.security_kwargs(),
            )
            log.info("connected to Kafka at %s", self.bootstrap)
            return True
        except (KafkaError, OSError) as exc:
            self._next_connect = time.monotonic() + self.cfg.reconnect_backoff_s
            log.debug("Kafka at %s unreachable (%s); spooling", self.bootstrap, exc)
            return False

    def _disconnect(self) -> None:
        producer, self._producer = self._producer, None
        self._next_connect = time.monotonic() + self.cfg.reconnect_backoff_s
        if producer is not None:
            try:
                producer.close(timeout=0)
            except Exception:
                log.debug("error closing producer", exc_info=True)

    def _send(self, records: list[Record]) -> tuple[int, list[Record]]:
        """Send and wait for acks; returns the length of the delivered prefix and the records not delivered."""
        from kafka.errors import KafkaError

        futures = []
        try:
            for rec in records:
                futures.append(self._producer.send(rec.topic, key=rec.key, value=rec.value))
            self._producer.flush(timeout=self.cfg.delivery_timeout_ms / 1000 + 1)
        except KafkaError as exc:
            log.warning("send to %s failed (%s); spooling", self.bootstrap, exc)
        ok = [f.is_done and f.succeeded() for f in futures]
        ok += [False] * (len(records) - len(ok))
        prefix = ok.index(False) if False in ok else len(ok)
        failed = [rec for rec, good in zip(records, ok, strict=True) if not good]
        with self._lock:
            self._delivered += len(records) - len(failed)
            self._failed_sends += len(failed)
        if failed:
            first = next((f.exception for f in futures if f.is_done and f.failed()), None)
            log.warning("%d events not delivered to %s (%s); spooling", len(failed), self.bootstrap, first)
            self._disconnect()
        return prefix, failed

    def _spool_batch(self, records: list[Record]) -> None:
        if not records:
            return
        written = 0
        try:
            written = self._spool.append(records)
            while written < len(records) and self.cfg.on_full == "drop_oldest" and len(self._spool):
                lost = self._spool.drop_oldest()
                with self._lock:
                    self._spool_records -= lost
                self._count_dropped(lost, "spool full, oldest segment discarded (drop_oldest)")
                written += self._spool.append(records[written:])
        except SpoolError as exc:
            # disk full or failing: the spool cut the partial write back out, so what it holds stays readable;
            # this batch is lost, and the next one tries again (space may be back by then)
            with self._lock:
                self._spooled += written
                self._spool_records += written
            self._count_dropped(len(records) - written, str(exc))
            return
        with self._lock:
            self._spooled += written
            self._spool_records += written
        self._spool_full = written < len(records)
        if written < len(records):
            # with `error`, emit_* refuses new events once full; these were accepted just before
            self._count_dropped(len(records) - written, f"spool {self._spool.dir} full ({self.cfg.on_full})")

    def _replay(self) -> bool:
        """Deliver the spool's oldest segment; True when the spool is now empty."""
        head = self._spool.head()
        if head is None:
            return True
        seg, records = head
        self._count_lost_in_spool()  # damage found on this read
        if not records:  # fully acknowledged already; only the file is left
            self._spool.drop_oldest()
            with self._lock:
                self._spool_records = len(self._spool)  # damage found on this read may have emptied it
            return self._spool_records == 0
        with self._lock:
            self._inflight += len(records)
        prefix, failed = self._send(records)
        with self._lock:
            self._inflight -= len(records)
        # on failure only the delivered prefix is acknowledged; the rest (even if some went through) is resent
        self._spool.ack(seg, prefix if failed else len(records))
        if not failed:
            self._spool_full = False
        with self._lock:
            self._spool_records = len(self._spool)
        return not failed and self._spool_records == 0

    def _take_batch(self, limit: int = 5000) -> list[Record]:
        batch: list[Record] = []
        q = self._queue
        while q and len(batch) < limit:
            batch.append(q.popleft())
        return batch

    def _run(self) -> None:
        linger = max(self.cfg.linger_ms, 1) / 1000
        while True:
            self._wake.wait(linger if (self._queue or self._spool_records) else 0.2)
            self._wake.clear()
            closing = self._closing
            try:
                self._cycle(closing)
            except Exception:
                log.exception("emitter cycle failed; retrying")
                self._disconnect()
                time.sleep(0.1)
            with self._idle:
                self._idle.notify_all()
            if closing and not self._queue:
                break
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None
        self._spool.close()

    def _cycle(self, closing: bool) -> None:
        connected = self._connect() if not closing or self._producer is not None else False
        if self._spool_records and connected:
            connected = self._replay()
        while self._queue:
            batch = self._take_batch()
            with self._lock:
                self._inflight += len(batch)
            try:
                if connected and not self._spool_records:
                    _, failed = self._send(batch)
                    connected = not failed
                    self._spool_batch(failed)
                else:
                    self._spool_batch(batch)
            except Exception:
                log.exception("unexpected error sending %d events; spooling them", len(batch))
                self._disconnect()
                connected = False
                self._spool_batch(batch)
            finally:
                with self._lock:
                    self._inflight -= len(batch)


class Session:
    """One multi-step task of an agent (see `Emitter.session`)."""

    def __init__(self, emitter: Emitter, session_id: str, *, task_type: str | None, operator: str | None) -> None:
        self.emitter = emitter
        self.session_id = session_id
        self.task_type = task_type
        self.operator = operator
        self.step = 0  # the next step's number
        self.closed = False

    def emit_interaction(self, **fields: Any) -> str:
        """`Emitter.emit_interaction` with the session's id and next step; task type and operator default to the
        session's (the first step's, when the session was opened without them)."""
        if self.closed:
            raise RuntimeError(f"session {self.session_id!r} is closed")
        fields.setdefault("task_type", self.task_type)
        fields.setdefault("operator", self.operator)
        missing = [k for k in ("task_type", "operator") if fields[k] is None]
        if missing:
            raise ValueError(f"the session's first step needs {' and '.join(missing)} (or pass them to session())")
        fields.setdefault("step", self.step)
        eid = self.emitter.emit_interaction(session_id=self.session_id, **fields)
        self.task_type, self.operator = self.task_type or fields["task_type"], self.operator or fields["operator"]
        self.step = max(self.step, int(fields["step"])) + 1
        return eid

    def feedback(self, kind: FeedbackKind, value: float, **fields: Any) -> str:
        """Feedback on the session as a whole (its outcome); allowed after the session closed, as outcomes come late."""
        return self.emitter.emit_feedback(session_id=self.session_id, kind=kind, value=value, **fields)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True
