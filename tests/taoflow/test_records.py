"""Where the learner's rows go (issue 14): into the DuckDB file while no lander holds it, so `taoflow sql` shows them
at once even with a broker up and no worker; over Kafka to the lander once one owns the file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from learners.records import RecordSink, file_owned
from schemas import AdapterEvent
from schemas import topics as names
from streams import store
from taoflow.broker import EmbeddedBroker
from taoflow.settings import Settings
from tests.conftest import read_topic

pytestmark = pytest.mark.broker


def round_row(rid: str, status: str = "running") -> dict[str, Any]:
    return {"round_id": rid, "status": status, "stage": "select", "started_at": datetime.now(UTC).isoformat(),
            "base_model": "tiny", "mode": "grpo", "k": 4, "seq": 1}  # fmt: skip


@contextmanager
def lander_holding(path: Path) -> Iterator[None]:
    """Another process with the file open for writing, as a lander has it."""
    code = "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        yield
    finally:
        proc.communicate(timeout=30)


def test_rows_go_to_the_file_while_no_lander_holds_it_else_to_kafka(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = Settings(overrides={"core": {"data_dir": tmp_path}, "kafka": {"bootstrap": broker.bootstrap}})
    path = settings.core.duckdb_path
    store.connect(path).close()

    with RecordSink(settings) as sink:  # broker up, no worker: the file, readable at once
        assert sink.via == "duckdb" and str(path) in sink.where()
        sink.write("tao_rounds", [round_row("r-file")])
        event = AdapterEvent(adapter="tao-a", action="published", base_model="tiny", round_id="r-file", sha256="0" * 64)
        sink.adapter_event(event)
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT round_id FROM tao_rounds").fetchall() == [("r-file",)]
    assert con.execute("SELECT adapter, action FROM adapters").fetchall() == [("tao-a", "published")]
    con.close()
    published = [json.loads(r.value) for r in read_topic(broker.bootstrap, names.ADAPTERS, 1)]
    assert any(e["adapter"] == "tao-a" for e in published), "the gateway follows taoflow.adapters: it goes there too"

    with lander_holding(path):
        assert file_owned(settings)
        with RecordSink(settings) as sink:
            assert sink.via == "kafka" and "lander" in sink.where()
            sink.write("tao_rounds", [round_row("r-kafka")])
    sent = [json.loads(r.value) for r in read_topic(broker.bootstrap, names.LEARNER_RECORDS, 1)]
    assert any(d["row"]["round_id"] == "r-kafka" for d in sent)


def test_a_lander_taking_the_file_mid_round_gets_the_rest_over_kafka(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = Settings(overrides={"core": {"data_dir": tmp_path}, "kafka": {"bootstrap": broker.bootstrap}})
    with RecordSink(settings) as sink:
        sink.write("tao_rounds", [round_row("r-mid")])
        assert sink.via == "duckdb"
        with lander_holding(settings.core.duckdb_path):
            sink.write("tao_rounds", [round_row("r-mid", "published")])
            assert sink.via == "kafka"
    sent = [json.loads(r.value) for r in read_topic(broker.bootstrap, names.LEARNER_RECORDS, 1)]
    assert any(d["row"]["round_id"] == "r-mid" and d["row"]["status"] == "published" for d in sent)


def test_no_broker_and_a_held_file_is_a_clear_error(tmp_path: Path) -> None:
    from learners.exceptions import LearnerError

    settings = Settings(overrides={"core": {"data_dir": tmp_path}, "kafka": {"bootstrap": "127.0.0.1:9"}})
    store.connect(settings.core.duckdb_path).close()
    with (
        lander_holding(settings.core.duckdb_path),
        RecordSink(settings) as sink,
        pytest.raises(LearnerError, match="another process holds it"),
    ):
        sink.write("tao_rounds", [round_row("r-none")])
