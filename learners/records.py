"""Where the learner's rows go: straight into the DuckDB file when no process owns it, else over Kafka to the
process that does (the lander).

DuckDB allows one process per file. While a stream worker runs, its lander owns `taoflow.duckdb`, so the learner
produces its `tao_rounds` / `tao_candidates` rows to `taoflow.learner.records` and the lander lands them,
idempotently, like every other table. When no lander holds the file (a `taoflow tao run` with the broker up but no
worker, or with no broker at all) the learner writes the file itself, so `taoflow sql` shows its rows at once; if a
lander takes the file in the middle of a round, the rest goes over Kafka. AdapterEvents always go to
`taoflow.adapters` when Kafka is reachable (the gateway follows it), and to the file's `adapters` table as well
when the learner writes the file (landing the event again later is a no-op: same key).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from learners.exceptions import LearnerError
from schemas import AdapterEvent
from schemas import topics as names
from streams import store
from taoflow.broker import ensure_topics, reachable
from taoflow.settings import Settings

log = logging.getLogger(__name__)


class RecordSink:
    """`write(table, rows)` and `adapter_event(event)`; `close()` flushes."""

    def __init__(self, settings: Settings, *, prefer_kafka: bool = True) -> None:
        self.settings = settings
        self.producer: Any = None
        self.to_file = not file_owned(settings)  # write the file ourselves while no other process holds it
        if prefer_kafka and reachable(settings.bootstrap, timeout=2.0):
            from kafka import KafkaProducer

            ensure_topics(settings)
            self.producer = KafkaProducer(
                bootstrap_servers=settings.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_request_size=16 * 1024 * 1024,
                **settings.kafka.security_kwargs(),
            )
        log.info("learner records: %s", self.where())

    @property
    def via(self) -> str:
        return "duckdb" if self.to_file or self.producer is None else "kafka"

    def where(self) -> str:
        """Where this round's rows go, in a sentence for the user."""
        path = self.settings.core.duckdb_path
        if self.via == "duckdb":
            return f"written to {path} (no other process holds it)"
        return (f"sent to {names.LEARNER_RECORDS} at {self.settings.bootstrap}; the stream worker's lander owns {path} "
                "and lands them")  # fmt: skip

    def write(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Rows of `tao_rounds` or `tao_candidates`, JSON-style values; durable when this returns."""
        if not rows:
            return
        if self.to_file:
            try:
                self._write_file({table: [store.record_values(table, r) for r in rows]})
                return
            except LearnerError:
                if self.producer is None:
                    raise
                self.to_file = False  # a lander took the file since: it lands the rest from Kafka
                log.info("learner records: %s", self.where())
        if self.producer is not None:
            for row in rows:
                value = orjson.dumps({"table": table, "row": row}, default=str)
                self.producer.send(names.LEARNER_RECORDS, key=str(row["round_id"]).encode(), value=value)
            self.producer.flush(60)
            return
        self._write_file({table: [store.record_values(table, r) for r in rows]})

    def adapter_event(self, event: AdapterEvent) -> None:
        """Publish an AdapterEvent (serving listens) and record it in `adapters`."""
        if self.producer is not None:
            self.producer.send(names.ADAPTERS, key=event.key(), value=event.to_json_bytes())
            self.producer.flush(60)
        if self.to_file or self.producer is None:
            try:
                self._write_file({"adapters": [store.record_values("adapters", event.model_dump())]})
            except LearnerError:
                if self.producer is None:
                    raise  # nowhere else for it to go
                self.to_file = False  # the lander that took the file lands the event from Kafka

    def _write_file(self, tables: dict[str, list[tuple[Any, ...]]]) -> None:
        import duckdb

        try:
            con = store.connect(self.settings.core.duckdb_path)
        except duckdb.IOException as exc:
            raise LearnerError(
                f"cannot write {self.settings.core.duckdb_path}: another process holds it ({exc}). Start the "
                "broker so the learner's rows travel through Kafka to the process that owns the file"
            ) from None
        try:
            con.execute("BEGIN TRANSACTION")
            for table, values in tables.items():
                cols = {c: [v[i] for v in values] for i, c in enumerate(store.COLUMNS[table])}
                store.insert(con, table, cols)
            con.execute("COMMIT")
        finally:
            con.close()

    def __enter__(self) -> RecordSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush(60)
            self.producer.close(5)
            self.producer = None


def file_owned(settings: Settings) -> bool:
    """Whether another process holds the DuckDB file (a lander): DuckDB then refuses to open it here."""
    import duckdb

    path = settings.core.duckdb_path
    if not path.exists():
        return False
    try:
        duckdb.connect(str(path)).close()
    except duckdb.IOException:
        return True
    return False
