"""Where the learner's rows go: over Kafka to the DuckDB owner (the lander), or straight into the file.

DuckDB allows one process per file. While a stream worker runs, its lander owns `taoflow.duckdb`, so
the learner produces its `tao_rounds` / `tao_candidates` rows to `taoflow.learner.records` and its
AdapterEvents to `taoflow.adapters`, and the lander lands them, idempotently, like every other table.
With no Kafka reachable (a lone `taoflow tao run` on embedded defaults) it writes the file itself.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from learners.exceptions import LearnerError
from schemas import AdapterEvent
from schemas import topics as names
from streams import store
from taoflow.settings import Settings

log = logging.getLogger(__name__)


class RecordSink:
    """`write(table, rows)` and `adapter_event(event)`; `close()` flushes."""

    def __init__(self, settings: Settings, *, prefer_kafka: bool = True) -> None:
        from taoflow.broker import reachable

        self.settings = settings
        self.producer: Any = None
        if prefer_kafka and reachable(settings.bootstrap, timeout=2.0):
            from kafka import KafkaProducer

            from taoflow.broker import ensure_topics

            ensure_topics(settings)
            self.producer = KafkaProducer(
                bootstrap_servers=settings.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_request_size=16 * 1024 * 1024,
                **settings.kafka.security_kwargs(),
            )
            log.info("learner records go to Kafka at %s (landed by the stream worker)", settings.bootstrap)
        else:
            log.info("Kafka is not reachable: the learner writes %s itself", settings.core.duckdb_path)

    @property
    def via(self) -> str:
        return "kafka" if self.producer is not None else "duckdb"

    def write(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Rows of `tao_rounds` or `tao_candidates`, JSON-style values; durable when this returns."""
        if not rows:
            return
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
            return
        self._write_file({"adapters": [store.record_values("adapters", event.model_dump())]})

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
