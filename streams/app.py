"""The single faust App of the stream worker, its tables and topics, wired to the processors."""

from __future__ import annotations

import logging
from typing import Any

import faust

from learners.rewards import CompositeScorer, build_scorer
from streams import feedback, interactions, rewards, sessions
from streams.context import WorkerContext
from streams.lane import Lane
from streams.outbox import BatchProducer, table_rows
from streams.positions import Fencing, resume_offsets
from streams.seams import SCHEME, StreamApp, Table, TableManager, check_registered
from streams.topics import declare
from taoflow.settings import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> tuple[StreamApp, WorkerContext]:
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
    check_registered()
    app = StreamApp(
        cfg.app_id,
        # the scheme selects taoflow's transport (`streams.seams`) through faust's entry points, for this App only
        broker=[f"{SCHEME}://{b.strip()}" for b in settings.bootstrap.split(",")],
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
        # faust's class-valued settings: tables that recover by epoch, a recovery that begins epochs (streams.seams)
        Table=Table,
        TableManager=TableManager,
    )
    app.bootstrap = settings.bootstrap
    app.security = kafka.security_kwargs()
    app.fetch_wait_ms = cfg.fetch_wait_ms
    topics = declare(app, parts)
    schema: Any = faust.Schema(key_type=str, key_serializer="raw", value_serializer="json")
    table: dict[str, Any] = {"partitions": parts, "schema": schema}
    # use_partitioner: table keys go to the partition their topic key goes to, so batches may mix partitions
    producer = BatchProducer(settings.bootstrap, kafka.security_kwargs())
    fencing = Fencing(producer)
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
        positions=app.Table("positions", **table),  # type: ignore[arg-type]
        producer=producer,
        partitions={},
        epochs=fencing.epochs,
    )
    app.fencing = fencing
    positions = ctx.positions
    app.recovered_positions = lambda tps: resume_offsets(table_rows(positions), tps)
    for t in (ctx.interactions, ctx.pending_feedback, ctx.utilities, ctx.sessions, ctx.positions):
        ctx.partitions[t.changelog_topic.get_topic_name()] = parts  # faust creates changelogs with `parts`

    lane = Lane(app, ctx, {
        topics.interactions.get_topic_name(): interactions.process_batch,
        topics.feedback.get_topic_name(): feedback.process_batch,
        topics.rewards.get_topic_name(): rewards.process_batch,
        topics.session_steps.get_topic_name(): sessions.process_batch,
        topics.session_joins.get_topic_name(): sessions.process_joins,
    })  # fmt: skip
    for topic in (topics.interactions, topics.feedback, topics.rewards, topics.session_steps, topics.session_joins):
        app.topics.add(topic)  # subscribed by faust's consumer; delivered through the lane
    app.lane = lane

    @app.task
    async def process() -> None:
        await lane.run()

    return app, ctx
