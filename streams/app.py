"""The single faust App of the stream worker, its tables, and the context its agents share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson

from learners.rewards import CompositeScorer, build_scorer
from schemas import DeadLetter, EventValidationError, FeedbackEvent, InteractionEvent, Limits, parse_event
from schemas.base import E
from schemas.fast import parse_feedback, parse_interaction
from streams.outbox import BatchProducer, Outbox
from streams.topics import REWARDS_INTERNAL, Topics, declare
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
    producer: BatchProducer
    partitions: dict[str, int]
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def outbox(self) -> Outbox:
        return Outbox(self.partitions, self.cfg.max_record_bytes)

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


def build_app(settings: Settings) -> tuple[faust.App, WorkerContext]:
    """Create the faust App for these settings, with its topics, tables and agents."""
    cfg = settings.stream
    parts = settings.broker.partitions
    kafka = settings.kafka
    credentials: Any = None
    if kafka.sasl_mechanism:
        credentials = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism,
            ssl_context=kafka.security_kwargs().get("ssl_context"),
        )
    elif kafka.security_protocol in ("SSL", "SASL_SSL"):
        credentials = faust.SSLCredentials(kafka.security_kwargs()["ssl_context"])
    app = faust.App(
        cfg.app_id,
        broker=[f"kafka://{b.strip()}" for b in settings.bootstrap.split(",")],
        broker_credentials=credentials,
        store="memory://",
        topic_partitions=parts,
        topic_replication_factor=1,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=cfg.web_port != 0,
        web_port=cfg.web_port or 6066,
        web_host="127.0.0.1",
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=cfg.batch_size,
        stream_buffer_maxsize=max(4 * cfg.batch_size, 4096),
        broker_commit_interval=1.0,
        # short group timeouts: a replacement worker takes over a dead one's partitions within seconds
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=max(0.5, cfg.session_timeout_s / 10),
        broker_rebalance_timeout=cfg.session_timeout_s,
        broker_request_timeout=max(30.0, cfg.session_timeout_s + 5),
        producer_linger=0.005,
        producer_max_batch_size=1024 * 1024,
        autodiscover=False,
        datadir=str(settings.core.data_dir / "faust"),
    )
    from streams.compat import patch_faust_fetch_wait, patch_faust_highwaters, patch_faust_offset_jumps

    patch_faust_highwaters(settings.bootstrap, kafka.security_kwargs())
    patch_faust_fetch_wait(cfg.fetch_wait_ms)
    patch_faust_offset_jumps()
    topics = declare(app, parts)
    schema: Any = faust.Schema(key_type=str, key_serializer="raw", value_serializer="json")
    table: dict[str, Any] = {"partitions": parts, "schema": schema}
    # use_partitioner: table keys go to the partition their topic key goes to, so batches may mix partitions
    ctx = WorkerContext(
        settings=settings,
        cfg=cfg,
        limits=settings.limits.limits(),
        scorer=CompositeScorer([build_scorer(s) for s in cfg.scorers], cfg.feedback_weights),
        topics=topics,
        interactions=app.Table("interaction-join", use_partitioner=True, **table),  # type: ignore[arg-type]
        pending_feedback=app.Table("pending-feedback", use_partitioner=True, **table),  # type: ignore[arg-type]
        utilities=app.Table("utilities", use_partitioner=True, **table),  # type: ignore[arg-type]
        sessions=app.Table("sessions", use_partitioner=True, **table),  # type: ignore[arg-type]
        producer=BatchProducer(settings.bootstrap, kafka.security_kwargs()),
        partitions={},
    )
    for t in (ctx.interactions, ctx.pending_feedback, ctx.utilities, ctx.sessions):
        ctx.partitions[t.changelog_topic.get_topic_name()] = parts  # faust creates changelogs with `parts`

    from streams import feedback, interactions, rewards, sessions
    from streams.lane import Lane, patch_faust_drain

    patch_faust_drain()
    lane = Lane(app, ctx, {
        topics.interactions.get_topic_name(): interactions.process_batch,
        topics.feedback.get_topic_name(): feedback.process_batch,
        topics.rewards.get_topic_name(): rewards.process_batch,
        topics.session_steps.get_topic_name(): sessions.process_batch,
        topics.session_joins.get_topic_name(): sessions.process_joins,
    })  # fmt: skip
    for topic in (topics.interactions, topics.feedback, topics.rewards, topics.session_steps, topics.session_joins):
        app.topics.add(topic)  # subscribed by faust's consumer; delivered through the lane
    app._taoflow_lane = lane  # type: ignore[attr-defined]

    @app.task
    async def process() -> None:
        await lane.run()

    return app, ctx
