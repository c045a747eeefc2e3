"""Helpers to run a real `taoflow worker` process and wait for the outcome tables to reach a state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from streams.sqlapi import QueryResult, query
from taoflow.settings import Settings

ROOT = Path(__file__).parents[2]
SCORERS = json.dumps([{"type": "python", "callable": "tests.streams.scorers:reward_from_metadata", "name": "planted"}])


def worker_env(bootstrap: str, data_dir: Path, app_id: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(
        PYTHONPATH=str(ROOT),
        TAOFLOW_KAFKA_BOOTSTRAP=bootstrap,
        TAOFLOW_DATA_DIR=str(data_dir),
        TAOFLOW_STREAM_APP_ID=app_id,
        TAOFLOW_STREAM_SCORERS=SCORERS,
        TAOFLOW_LOG_LEVEL=os.environ.get("TAOFLOW_TEST_WORKER_LOG_LEVEL", "WARNING"),
        **extra,
    )
    return env


def start_worker(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")  # noqa: SIM115 - the child writes to it for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "taoflow.cli", "worker", *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def settings_for(data_dir: Path, **stream: Any) -> Settings:
    return Settings(overrides={"core": {"data_dir": data_dir}, "stream": stream})


def wait_for(
    data_dir: Path, sql: str, predicate: Any, timeout: float = 180.0, settings: Settings | None = None
) -> QueryResult:
    """Poll SQL (through the lander, while it runs) until predicate(result) holds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = query(sql, settings or settings_for(data_dir))
            if predicate(last):
                return last  # type: ignore[no-any-return]
        except Exception as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting on {sql!r}; last result: {getattr(last, 'rows', last)}")


def counts(data_dir: Path) -> dict[str, int]:
    tables = ("interactions", "feedback", "scores", "utility_history", "dead_letters", "utilities")
    sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t}) AS {t}" for t in tables)
    return query(sql, settings_for(data_dir)).as_dicts()[0]
