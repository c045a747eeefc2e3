"""What every stream processor shares: the WorkerContext (settings, scorers, topics, tables, producer, counters)
and how one record is parsed, dead-lettered or isolated. The processors import it; `streams.app` builds it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from learners.rewards import CompositeScorer
from schemas import DeadLetter, EventValidationError, FeedbackEvent, InteractionEvent, Limits, parse_event
from schemas.base import E
from schemas.fast import parse_feedback, parse_interaction
from streams.outbox import BatchProducer, Outbox
from streams.topics import REWARDS_INTERNAL, Topics
from taoflow.settings import Settings, StreamSettings

log = logging.getLogger(__name__)

FAST: dict[type, Any] = {InteractionEvent: parse_interaction, FeedbackEvent: parse_feedback}


@dataclass
class WorkerContext:
    """What every agent needs: settings, scorers, topics, tables, the batch producer and counters."""

    settings: Settings
    cfg: StreamSettings
    limits: Limits
    scorer: CompositeScorer
    topics: Topics
    interactions: Any  # faust Table: interaction id -> join state (task, operator, adapter, ts, parts, feedback)
    pending_feedback: Any  # faust Table: interaction id -> feedback that arrived before its interaction
    utilities: Any  # faust Table: "task_type/operator" -> {u, n, last_reward, src positions}
    sessions: Any  # faust Table: "caller|session_id" -> steps, session feedback, its reward (`streams.sessions`)
    positions: Any  # faust Table: "topic/partition" -> {"next": offset processing resumes at} (`streams.positions`)
    producer: BatchProducer
    partitions: dict[str, int]
    epochs: dict[tuple[str, int], int] = field(default_factory=dict)  # this worker's epoch per changelog partition
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def outbox(self) -> Outbox:
        return Outbox(self.partitions, self.cfg.max_record_bytes, self.epochs)

    def parking_refusal(self, waiting_for: str, events: int, size: int) -> str | None:
        """Why feedback cannot wait for `waiting_for` (an interaction, a session's first step) that has not arrived:
        `events` waiting and `size` bytes, the new one included, past the per-key caps; None if it may wait."""
        cfg = self.cfg
        if events <= cfg.max_parked_feedback and size <= cfg.max_parked_bytes:
            return None
        return (f"too much feedback waiting for {waiting_for}: {events} events, {size} bytes with this one (limits: "
                f"TAOFLOW_STREAM_MAX_PARKED_FEEDBACK={cfg.max_parked_feedback}, "
                f"TAOFLOW_STREAM_MAX_PARKED_BYTES={cfg.max_parked_bytes})")  # fmt: skip

    def dead_letter(self, out: Outbox, message: Any, error: str) -> None:
        """Queue the original bytes of a bad message, with where it came from and why, for the dead-letter topic.

        An original too large to fit a dead-letter record (encoded, within the record size limit) keeps its first
        bytes, and the reason says so: the whole record stays at its topic, partition and offset."""
        original = message.value if isinstance(message.value, bytes) else bytes(message.value or b"")
        keep = (self.cfg.max_record_bytes - 16 * 1024) * 3 // 4  # base64 in JSON, with room for the rest
        if len(original) > keep:
            error = (f"{error[:3000]} [original truncated to its first {keep} of {len(original)} bytes; the whole "
                     f"record is at {message.topic}/{message.partition}@{message.offset}]")  # fmt: skip
            original = original[:keep]
        dl = DeadLetter.of(message.topic, message.partition, message.offset, original, error[:4000])
        out.add(self.topics.dead_letters.get_topic_name(), None, dl.to_json_bytes())
        self.count("dead_letters")

    def isolated(self, out: Outbox, message: Any, process: Any, *args: Any) -> None:
        """Run `process(*args)` for one record; if it raises, its queued outputs are dropped and the record goes to
        the dead letters with the reason, so one record can never crash (or crash-loop) the worker. Processors
        write their tables last for each record, so a failure leaves the tables as they were."""
        mark = out.mark()
        try:
            process(*args)
        except Exception as exc:
            out.rollback(mark)
            log.warning("%s[%s]@%s could not be processed (dead-lettered): %s: %s", message.topic, message.partition,
                        message.offset, type(exc).__name__, exc)  # fmt: skip
            self.dead_letter(out, message, f"processing failed: {type(exc).__name__}: {exc}")
            self.count("processing_failures")

    def parse(self, out: Outbox, model: type[E], message: Any) -> Any:
        """The validated event, or None after the message went to the dead letters with the reason.

        Interactions and feedback take the fast path (`schemas.fast`: a record with the model's attributes)
        when they are plainly valid, and pydantic otherwise."""
        try:
            fast = FAST.get(model)
            return fast(message.value, self.limits) if fast else parse_event(model, message.value, self.limits)
        except EventValidationError as exc:
            self.dead_letter(out, message, str(exc))
        except Exception as exc:
            log.exception("unexpected error validating %s[%s]@%s", message.topic, message.partition, message.offset)
            self.dead_letter(out, message, f"unexpected error: {exc!r}")
        return None

    def send_reward(
        self, out: Outbox, key: str, reward: float, src: str, pos: int, interaction_id: str, ts: float
    ) -> None:
        """Hand a reward to the utility agent, re-keyed by task_type/operator; (src, pos) makes it idempotent."""
        value = orjson.dumps({"r": reward, "src": src, "pos": pos, "iid": interaction_id, "ts": ts})
        out.add(REWARDS_INTERNAL, key.encode(), value)
