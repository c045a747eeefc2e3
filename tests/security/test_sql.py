"""Attacks on the lander's SQL endpoint and on `taoflow sql` over the file: a real lander process (embedded broker,
real DuckDB file, real HTTP), and the direct-file path with no lander. Each test is one attack from issue 13."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from kafka import KafkaProducer

from streams import store
from streams.exceptions import QueryError
from streams.sqlapi import TOKEN_FILE, query
from taoflow.broker import EmbeddedBroker
from taoflow.cli import cli
from taoflow.settings import Settings
from tests.streams.harness import ROOT

pytestmark = [pytest.mark.broker]

SECRET = "not-for-sql-7f3a"
RUNAWAY = "SELECT count(*) FROM range(100000000) a, range(100000000) b"
TIMEOUT_S = 5.0


class Lander:
    """A `taoflow lander` process on its own data dir, and an HTTP client for its SQL endpoint."""

    def __init__(self, bootstrap: str, root: Path, name: str, **stream: str) -> None:
        self.bootstrap = bootstrap
        self.data = root / "data"
        self.secret = root / "secret.txt"
        self.secret.write_text(SECRET + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
        env.update(PYTHONPATH=str(ROOT), TAOFLOW_KAFKA_BOOTSTRAP=bootstrap, TAOFLOW_DATA_DIR=str(self.data),
                   TAOFLOW_STREAM_APP_ID=f"sec-{name}", TAOFLOW_LOG_LEVEL="WARNING",
                   **{f"TAOFLOW_STREAM_{k.upper()}": v for k, v in stream.items()})  # fmt: skip
        self.log = root / "lander.log"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "lander"], env=env, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        owner = self.data / "lander.json"
        deadline = time.monotonic() + 60
        while not owner.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.url = json.loads(owner.read_text())["url"]
        token = self.data / TOKEN_FILE
        self.token = token.read_text().strip() if token.exists() else "none"
        self.settings = Settings(overrides={"core": {"data_dir": self.data}})

    def post(self, sql: str, timeout: float = 30.0) -> httpx.Response:
        return httpx.post(f"{self.url}/sql", json={"sql": sql}, timeout=timeout,
                          headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip

    def count(self, table: str) -> int:
        return int(query(f"SELECT count(*) FROM {table}", self.settings).rows[0][0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def produce(bootstrap: str, n: int, tag: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    now = datetime.now(UTC).isoformat()
    for i in range(n):
        event_id = f"{tag}-{i}"
        ev: dict[str, object] = {"event_id": event_id, "ts": now, "agent_id": "t", "task_type": "qa", "operator": "a",
              "prompt": f"q{i}", "response": "a", "adapter": None, "latency_ms": 1.0, "metadata": {}}  # fmt: skip
        producer.send("taoflow.interactions", key=event_id.encode(), value=json.dumps(ev).encode())
    producer.flush()
    producer.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def lander(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lander]:
    root = tmp_path_factory.mktemp("sqlsec")
    ld = Lander(broker.bootstrap, root, "main", sql_timeout_s=str(TIMEOUT_S), sql_max_rows="1000",
                sql_max_bytes="200000", sql_max_concurrent="2")  # fmt: skip
    produce(broker.bootstrap, 20, "seed")
    wait_until(lambda: ld.count("interactions") >= 20)
    yield ld
    ld.stop()


def refused(resp: httpx.Response) -> str:
    assert resp.status_code == 400, resp.text
    error = str(resp.json()["error"])
    assert SECRET not in resp.text and "root:" not in resp.text
    return error


# every way found to make DuckDB read a file; {secret} is a file outside the outcome tables and lake
FILE_READS = [
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM read_csv_auto('{secret}')",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_blob('{secret}')",
    "SELECT * FROM read_json('{secret}')",
    "SELECT * FROM read_json_objects('{secret}')",
    "SELECT * FROM read_parquet('{secret}')",
    "SELECT * FROM sniff_csv('{secret}')",
    "SELECT * FROM glob('{dir}/*')",
    "SELECT * FROM '{secret}'",
    "FROM '/etc/passwd'",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT (SELECT content FROM read_text('{secret}')) AS x",
    "WITH s AS (SELECT * FROM read_text('{secret}')) SELECT * FROM s",
    "SELECT * FROM interactions WHERE prompt IN (SELECT content FROM read_text('{secret}'))",
    "SUMMARIZE SELECT * FROM read_text('{secret}')",
    "DESCRIBE '{secret}'",
    "SELECT * FROM query('SELECT * FROM read_text(''{secret}'')')",
    "SELECT * FROM read_duckdb('{db}')",
    "ATTACH '{db}' AS other",
]


@pytest.mark.parametrize("attack", FILE_READS)
def test_endpoint_reads_no_file(lander: Lander, attack: str) -> None:
    sql = attack.format(secret=lander.secret, dir=lander.secret.parent, db=lander.data / "taoflow.duckdb")
    assert refused(lander.post(sql))


@pytest.mark.parametrize("attack", [
    "COPY (SELECT 1 AS a) TO '{out}'",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{out}'",
    "EXPORT DATABASE '{out}'",
])  # fmt: skip
def test_endpoint_writes_no_file(lander: Lander, attack: str, tmp_path: Path) -> None:
    out = tmp_path / "evil.pth"
    error = refused(lander.post(attack.format(out=out)))
    assert "not allowed" in error and not out.exists()


@pytest.mark.parametrize("attack", [
    "EXPLAIN ANALYZE DELETE FROM interactions",
    "EXPLAIN ANALYZE INSERT INTO interactions SELECT * FROM interactions",
    "EXPLAIN ANALYZE UPDATE interactions SET response = 'x'",
    "WITH d AS (DELETE FROM interactions RETURNING *) SELECT count(*) FROM d",
    "DELETE FROM interactions",
    "DROP TABLE interactions",
    "CREATE TABLE t AS SELECT 1",
])  # fmt: skip
def test_endpoint_changes_no_table(lander: Lander, attack: str) -> None:
    before = lander.count("interactions")
    assert "not allowed" in refused(lander.post(attack))
    assert lander.count("interactions") == before
    assert lander.post("SELECT count(*) AS n FROM interactions WHERE response = 'x'").json()["rows"] == [[0]]


@pytest.mark.parametrize("attack", [
    "SET memory_limit = '1MB'",
    "SET GLOBAL enable_external_access = true",
    "RESET memory_limit",
    "PRAGMA memory_limit = '1MB'",
    "PRAGMA database_list",
    "SELECT current_setting('memory_limit')",
    "SELECT 1; SET memory_limit = '1MB'",
    "SELECT 1; DROP TABLE interactions",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CALL checkpoint()",
    "SELECT * FROM checkpoint()",
    "SELECT * FROM enable_profiling()",
    "SELECT * FROM duckdb_secrets()",
    "DETACH taoflow",
    "USE memory",
])  # fmt: skip
def test_endpoint_changes_no_setting_and_runs_one_statement(lander: Lander, attack: str) -> None:
    assert refused(lander.post(attack))
    # landing still works after the attempt: the issue's `SET memory_limit` made the next landing kill the lander
    before = lander.count("interactions")
    produce(lander.bootstrap, 1, f"after-{time.time_ns()}")
    wait_until(lambda: lander.count("interactions") > before)
    assert lander.proc.poll() is None


@pytest.mark.parametrize("ctype,body", [
    ("application/x-www-form-urlencoded", b"sql=SELECT+1"),
    ("text/plain", b'{"sql": "SELECT 1"}'),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="sql"\r\n\r\nSELECT 1\r\n--x--'),
])  # fmt: skip
def test_endpoint_wants_json(lander: Lander, ctype: str, body: bytes) -> None:
    resp = httpx.post(f"{lander.url}/sql", content=body, headers={"Content-Type": ctype,
                      "Authorization": f"Bearer {lander.token}"})  # fmt: skip
    assert resp.status_code == 415 and "application/json" in resp.json()["error"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic Zm9vOmJhcg==", "Bearer"])
def test_endpoint_wants_the_token(lander: Lander, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    resp = httpx.post(f"{lander.url}/sql", json={"sql": "SELECT 1"}, headers=headers)
    assert resp.status_code == 401 and TOKEN_FILE in resp.json()["error"]


def test_token_is_checked_before_the_body_is_read(lander: Lander) -> None:
    """Headers promise 10 MB that never come: the answer must not wait for them."""
    host, port = lander.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /sql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000\r\n\r\n{")  # fmt: skip
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 401"), head


def test_body_size_is_capped(lander: Lander) -> None:
    sql = "SELECT 1 -- " + "x" * 200_000
    assert lander.post(sql).status_code == 413


def test_token_file_is_private(lander: Lander) -> None:
    mode = stat.S_IMODE((lander.data / TOKEN_FILE).stat().st_mode)
    assert mode == 0o600 and len(lander.token) >= 32


def test_runaway_query_is_stopped_while_landing_goes_on(lander: Lander, broker: EmbeddedBroker) -> None:
    results: list[tuple[float, httpx.Response]] = []

    def runaway() -> None:
        resp = lander.post(RUNAWAY)
        results.append((time.monotonic(), resp))

    threads = [threading.Thread(target=runaway) for _ in range(2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.5)
    # both query slots are taken: a third query is turned away instead of queueing behind them
    assert lander.post("SELECT 1").status_code == 429
    before = int(httpx.get(f"{lander.url}/healthz").json()["landed"].get("interactions", 0))
    produce(broker.bootstrap, 5, f"during-{time.time_ns()}")
    wait_until(lambda: httpx.get(f"{lander.url}/healthz").json()["landed"].get("interactions", 0) >= before + 5, 20)
    landed_at = time.monotonic()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and all("sql_timeout_s" in r.json()["error"] for _, r in results), results
    assert max(done for done, _ in results) - t0 < TIMEOUT_S + 10
    assert landed_at < min(done for done, _ in results)  # landed while the two queries ran, not after
    assert lander.post("SELECT 42 AS x").json() == {"columns": ["x"], "rows": [[42]]}


def test_row_and_byte_caps(lander: Lander) -> None:
    assert "sql_max_rows" in refused(lander.post("SELECT * FROM range(5000)"))
    assert "sql_max_bytes" in refused(lander.post("SELECT repeat('x', 1000) AS s FROM range(500)"))
    assert len(lander.post("SELECT * FROM range(1000)").json()["rows"]) == 1000


def test_plain_selects_still_answer(lander: Lander) -> None:
    """What `taoflow report`, the dashboard and the learner send keeps working through the endpoint."""
    for sql in ("SELECT count(*) FROM interactions", "DESCRIBE interactions",
                "SELECT * FROM improvement_by(INTERVAL 1 HOUR)", "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
                "SELECT task_type, count(*) FROM interactions GROUP BY ALL", "FROM utilities",
                "SELECT * FROM (SELECT 1 UNION ALL SELECT 2)", "SELECT unnest([1, 2])"):  # fmt: skip
        resp = lander.post(sql)
        assert resp.status_code == 200, (sql, resp.text)


def test_sigterm_interrupts_a_running_query(broker: EmbeddedBroker, tmp_path: Path) -> None:
    ld = Lander(broker.bootstrap, tmp_path, "term", sql_timeout_s="600")
    try:
        threading.Thread(target=lambda: ld.post(RUNAWAY, timeout=120), daemon=True).start()
        time.sleep(1.0)
        t0 = time.monotonic()
        ld.proc.send_signal(signal.SIGTERM)
        ld.proc.wait(15)
        assert time.monotonic() - t0 < 15
        assert not (ld.data / TOKEN_FILE).exists()
    finally:
        if ld.proc.poll() is None:
            os.killpg(ld.proc.pid, signal.SIGKILL)
            ld.proc.wait()


# --- the same rules when no lander runs: `taoflow sql` and streams.sqlapi.query open the file themselves


@pytest.fixture
def offline(tmp_path: Path) -> Settings:
    settings = Settings(overrides={"core": {"data_dir": tmp_path / "data"}, "stream": {"sql_timeout_s": 1.0}})
    con = store.connect(settings.core.duckdb_path)
    con.close()
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    return settings


OFFLINE_ATTACKS = [
    *FILE_READS, "COPY (SELECT 1) TO '{dir}/evil.pth'", "EXPLAIN ANALYZE COPY (SELECT 1) TO '{dir}/e.pth'",
    "EXPLAIN ANALYZE DELETE FROM interactions", "SET memory_limit = '1MB'", "PRAGMA database_list",
    "SELECT 1; DROP TABLE interactions", "INSTALL httpfs", "LOAD httpfs",
]  # fmt: skip


@pytest.mark.parametrize("attack", OFFLINE_ATTACKS)
def test_file_path_refuses_the_same(offline: Settings, attack: str, tmp_path: Path) -> None:
    sql = attack.format(secret=tmp_path / "secret.txt", dir=tmp_path, db=offline.core.duckdb_path)
    with pytest.raises(QueryError) as exc:
        query(sql, offline)
    assert SECRET not in str(exc.value) and not list(tmp_path.glob("*.pth"))


def test_file_path_with_a_lake_refuses_the_same(offline: Settings, tmp_path: Path) -> None:
    lake = Settings(overrides={"core": {"data_dir": offline.core.data_dir},
                               "stream": {"parquet_url": str(tmp_path / "lake"), "sql_timeout_s": 1.0}})  # fmt: skip
    assert query("SELECT count(*) FROM lake.interactions", lake).rows == [[0]]
    with pytest.raises(QueryError, match="not allowed"):
        query(f"SELECT * FROM read_text('{tmp_path / 'secret.txt'}')", lake)


def test_file_path_times_out(offline: Settings) -> None:
    t0 = time.monotonic()
    with pytest.raises(QueryError, match="sql_timeout_s"):
        query(RUNAWAY, offline)
    assert time.monotonic() - t0 < 10


def test_locked_connection_reads_no_file_even_past_the_checks(tmp_path: Path) -> None:
    """The second wall: a statement that got past sqlguard.check still cannot read files or change settings."""
    import duckdb

    from streams.sqlguard import lock_down, read_cursor

    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "lake").mkdir()
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    cur = read_cursor(con)
    lock_down(con, [str(tmp_path / "lake") + "/"])
    attempts: dict[str, type[Exception]] = {
        f"SELECT * FROM read_text('{tmp_path / 'secret.txt'}')": duckdb.PermissionException,
        f"SELECT * FROM read_text('{tmp_path}/lake/../secret.txt')": duckdb.PermissionException,
        f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'": duckdb.PermissionException,
        "SET memory_limit = '1MB'": duckdb.InvalidInputException,
        "SET enable_external_access = true": duckdb.InvalidInputException,
    }
    for sql, error in attempts.items():
        with pytest.raises(error):
            cur.execute(sql)
    assert not (tmp_path / "out.csv").exists()
    con.close()


def test_cli_refusal_is_one_line(offline: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAOFLOW_DATA_DIR", str(offline.core.data_dir))
    result = CliRunner().invoke(cli, ["sql", "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.pth'"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().startswith("error: EXPLAIN statements are not allowed here")
    assert len(result.output.strip().splitlines()) == 1
    ok = CliRunner().invoke(cli, ["sql", "SELECT count(*) AS n FROM interactions", "--format", "json"])
    assert ok.exit_code == 0 and json.loads(ok.output) == [{"n": 0}]


@pytest.mark.parametrize("var,url", [
    ("TAOFLOW_STREAM_PARQUET_URL", "s3://user:hunter2pw@minio:9000/lake"),
    ("TAOFLOW_STREAM_PARQUET_URL", "http://u:hunter2pw@host/lake"),
    ("TAOFLOW_KAFKA_BOOTSTRAP", "postgresql://admin:hunter2pw@db:5432/x"),
])  # fmt: skip
def test_config_masks_passwords_in_urls(monkeypatch: pytest.MonkeyPatch, var: str, url: str) -> None:
    monkeypatch.setenv(var, url)
    for fmt in ("json", "env"):
        result = CliRunner().invoke(cli, ["config", "--format", fmt])
        assert result.exit_code == 0, result.output
        assert "hunter2pw" not in result.output and url.split(":hunter2pw")[0] + ":**********@" in result.output
