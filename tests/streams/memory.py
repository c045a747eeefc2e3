"""The stream worker's processors without a broker: a real `WorkerContext` whose faust tables are plain dicts, each
output handed to the next processor as Kafka would, every record landed with the lander's real row mapping in a real
DuckDB file. Tests of the processors' logic run in milliseconds on it."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from learners.rewards import CompositeScorer, build_scorer
from schemas import topics as names
from streams import feedback, interactions, landing, rewards, sessions, store
from streams.context import WorkerContext
from streams.topics import REWARDS_INTERNAL, SESSION_JOINS_INTERNAL, SESSIONS_INTERNAL, Topics
from taoflow.settings import Settings
from tests.streams.harness import SCORERS


@dataclass
class Record:
    """A Kafka record as faust and aiokafka hand it over (the attributes the processors and the lander read)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class Named:
    """A topic or table changelog: only its name matters to the processors."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get_topic_name(self) -> str:
        return self.name


class MemoryTable:
    """A faust in-memory Table's surface that `streams.outbox` uses: its rows and its changelog topic."""

    def __init__(self, name: str) -> None:
        self.data: dict[str, Any] = {}
        self.changelog_topic = Named(f"worker-{name}-changelog")


class Worker:
    """The stream worker's processors wired as the lane wires them, with a real DuckDB file as the lander's."""

    def __init__(self, tmp_path: Path, **stream: Any) -> None:
        settings = Settings(overrides={"core": {"data_dir": tmp_path},
                                       "stream": {"scorers": json.loads(SCORERS), **stream}})  # fmt: skip
        cfg = settings.stream
        tables = {
            name: MemoryTable(name)
            for name in ("interaction-join", "pending-feedback", "utilities", "sessions", "positions")
        }
        topic_names = {
            "interactions": names.INTERACTIONS,
            "feedback": names.FEEDBACK,
            "scores": names.SCORES,
            "utilities": names.UTILITIES,
            "dead_letters": names.DEAD_LETTERS,
            "rewards": REWARDS_INTERNAL,
            "sessions": names.SESSIONS,
            "session_steps": SESSIONS_INTERNAL,
            "session_joins": SESSION_JOINS_INTERNAL,
        }
        self.ctx = WorkerContext(
            settings=settings, cfg=cfg, limits=settings.limits.limits(),
            scorer=CompositeScorer([build_scorer(s) for s in cfg.scorers], cfg.feedback_weights),
            topics=Topics(**{k: Named(v) for k, v in topic_names.items()}),  # type: ignore[arg-type]
            interactions=tables["interaction-join"], pending_feedback=tables["pending-feedback"],
            utilities=tables["utilities"], sessions=tables["sessions"], positions=tables["positions"],
            producer=None,  # type: ignore[arg-type]
            partitions={t.changelog_topic.get_topic_name(): 4 for t in tables.values()},
        )  # fmt: skip
        self.processors = {names.INTERACTIONS: interactions.process_batch, names.FEEDBACK: feedback.process_batch,
                           REWARDS_INTERNAL: rewards.process_batch, SESSIONS_INTERNAL: sessions.process_batch,
                           SESSION_JOINS_INTERNAL: sessions.process_joins}  # fmt: skip
        self.log: dict[str, list[Record]] = defaultdict(list)  # every record "in Kafka", per topic
        self._offsets: dict[str, itertools.count[int]] = defaultdict(itertools.count)
        self.con = store.connect(tmp_path / "taoflow.duckdb")
        self.outboxes: list[Any] = []  # every batch's Outbox, changelog records included

    def produce(self, topic: str, key: bytes | None, value: bytes) -> Record:
        rec = Record(topic, 0, next(self._offsets[topic]), key, value)
        self.log[topic].append(rec)
        return rec

    def send(self, topic: str, doc: dict[str, Any] | bytes) -> None:
        """Produce one event and run the worker until it and everything it caused is processed and landed."""
        self.send_batch(topic, [doc])

    def send_batch(self, topic: str, docs: list[dict[str, Any] | bytes]) -> None:
        """Produce events (dicts as JSON, bytes as they are) and hand them to the worker as one fetched batch."""
        batch = []
        for doc in docs:
            if isinstance(doc, bytes):
                batch.append(self.produce(topic, b"raw", doc))
            else:
                key = (doc.get("interaction_id") or doc.get("session_id") or doc.get("event_id", "")).encode()
                batch.append(self.produce(topic, key, orjson.dumps(doc)))
        self.run(batch)

    def run(self, batch: list[Record]) -> None:
        """Process a batch and, as fetched batches of their own, the internal records it causes, until none is left."""
        queue = [batch]
        while queue:
            batch = queue.pop(0)
            if not batch:
                continue
            out = self.ctx.outbox()
            self.processors[batch[0].topic](self.ctx, out, batch)
            self.outboxes.append(out)
            self.land(batch)
            made = [self.produce(t, k, v) for t, msgs in out.msgs.items() for k, v, _ in msgs if v is not None]
            self.land([r for r in made if r.topic not in self.processors])
            for topic in (SESSIONS_INTERNAL, SESSION_JOINS_INTERNAL, REWARDS_INTERNAL):
                queue.append([r for r in made if r.topic == topic])

    def land(self, records: list[Record]) -> None:
        for table, cols in landing.to_rows(records, self.ctx.limits).items():
            store.insert(self.con, table, cols)

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        return list(self.con.execute(query, list(args)).fetchall())

    def reward_records(self, iid: str) -> list[dict[str, Any]]:
        """What the utility agent was handed for this interaction."""
        return [r for r in map(orjson.loads, (m.value for m in self.log[REWARDS_INTERNAL])) if r["iid"] == iid]
