"""The CLI: every product command is listed, user mistakes are one-line errors, broker starts and stops."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from taoflow.cli import cli
from tests.conftest import free_port, read_topic


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output  # stdout and stderr, as the user sees them


def run_stdout(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Only stdout: what a pipe gets (logs must never end up there)."""
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout


def test_help_lists_every_product_command() -> None:
    code, out = run("--help")
    assert code == 0
    for cmd in ("up", "broker", "worker", "learner", "tao", "serve", "sql", "report", "demo", "schemas", "models"):
        assert f"  {cmd} " in out or f"  {cmd}\n" in out, cmd
    code, out = run("tao", "--help")
    assert "run" in out


def test_schemas_export(tmp_path: Path) -> None:
    code, _ = run("schemas", "export", str(tmp_path / "out"))
    assert code == 0
    names = {p.name.removesuffix(".schema.json") for p in (tmp_path / "out").glob("*.schema.json")}
    assert names == {"InteractionEvent", "FeedbackEvent", "ScoreEvent", "UtilityEvent", "AdapterEvent", "DeadLetter",
                     "SessionEvent", "KnowledgeFile"}  # fmt: skip
    doc = json.loads((tmp_path / "out" / "InteractionEvent.schema.json").read_text())
    assert {"tools", "tool_calls", "response_format", "finish_reason", "session_id", "step"} <= set(doc["properties"])


def test_config_masks_secrets_and_reads_toml(tmp_path: Path) -> None:
    (tmp_path / "taoflow.toml").write_text('data_dir = "/srv/tf"\n[broker]\nport = 9999\n')
    logging.getLogger("kafka.net.manager").error("a background client's log line")  # must not reach stdout
    code, out = run_stdout("config", env={"TAOFLOW_KAFKA_SASL_PASSWORD": "hunter2", "TAOFLOW_BROKER_PARTITIONS": "8"})
    assert code == 0
    data = json.loads(out)
    assert "hunter2" not in out and data["kafka"]["sasl_password"] == "**********"
    assert data["broker"]["port"] == 9999 and data["broker"]["partitions"] == 8  # env beats toml, toml beats default
    assert data["core"]["data_dir"] == "/srv/tf"


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    env = {"TAOFLOW_BROKER_PORT": "not-a-port"}
    code, out = run("config", env=env)
    assert code == 1 and out.strip().startswith("error: invalid settings: broker.port") and "Traceback" not in out
    (tmp_path / "taoflow.toml").write_text("[kafka\n")
    code, out = run("config")
    assert code == 1 and "is not valid TOML" in out
    (tmp_path / "taoflow.toml").write_text("[kafka]\nbootstrapp = 'x:1'\n")
    code, out = run("config")
    assert code == 1 and "kafka.bootstrapp" in out
    (tmp_path / "taoflow.toml").unlink()
    code, out = run("worker", env={"TAOFLOW_BROKER_PORT": "1"})
    assert code == 1 and "no Kafka answers at 127.0.0.1:1; start it with `taoflow broker`" in out
    code, out = run("report")
    assert code == 1 and "error: no outcome database at .taoflow/taoflow.duckdb" in out and "Traceback" not in out
    nokafka = {"TAOFLOW_KAFKA_BOOTSTRAP": "127.0.0.1:9"}
    code, out = run("tao", "run", env=nokafka)
    assert code == 1 and "error: no scorers configured: set TAOFLOW_LEARNER_SCORERS" in out and "Traceback" not in out
    code, out = run("tao", "run", env={**nokafka, "TAOFLOW_LEARNER_SCORERS": '[{"type": "arithmetic"}]',
                                       "TAOFLOW_BASE_MODEL": str(tmp_path / "nowhere")})  # fmt: skip
    assert code == 1 and "cannot load model" in out and "make-tiny" in out and "Traceback" not in out
    code, out = run("learner", env={"TAOFLOW_LEARNER_CRON": "every tuesday"})
    assert code == 1 and "is not a crontab expression" in out


def test_broker_command_starts_creates_topics_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "TAOFLOW_BROKER_PORT": str(port), "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "taoflow.cli", "broker", "--partitions", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while "ready" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        topics = set(admin.list_topics())
        assert {"taoflow.interactions", "taoflow.utilities", "taoflow.dead-letters"} <= topics
        desc = admin.describe_topics(["taoflow.interactions"])
        assert len(desc[0]["partitions"]) == 2
        admin.close()
        assert read_topic(f"127.0.0.1:{port}", "taoflow.interactions", 0, timeout=1) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_broker_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        code, out = run("broker", "--port", str(s.getsockname()[1]))
    assert code == 1 and "already in use" in out and "TAOFLOW_BROKER_PORT" in out


@pytest.mark.parametrize("bad", [["sql"], ["schemas", "export"], ["nope"]])
def test_usage_errors_exit_2(bad: list[str]) -> None:
    result = CliRunner().invoke(cli, bad)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_sql_prints_plain_rows_when_piped_and_never_cuts_names(tmp_path: Path) -> None:
    from streams import store

    store.connect(tmp_path / "taoflow.duckdb").close()
    env = {"TAOFLOW_DATA_DIR": str(tmp_path)}
    name = "direct@tao-20261203T073815-fc0123456789abcdef"
    query = f"SELECT '{name}' AS operator, 3 AS n"
    code, out = run_stdout("sql", query, env=env)  # CliRunner's stdout is not a terminal: a pipe
    assert code == 0 and out.splitlines() == ["operator\tn", f"{name}\t3"]
    code, out = run_stdout("sql", query, "--format", "table", env={**env, "COLUMNS": "40"})
    assert code == 0 and "…" not in out and name[:20] in out and name[-10:] in out.replace("\n", "").replace("│", "")
