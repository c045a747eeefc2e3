"""Bounded stop: a worker (and its lander) asked to stop exits within `stop_timeout_s` even when the broker does
not answer, so a standby can take the DuckDB file over."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from taoflow.broker import EmbeddedBroker
from tests.streams.harness import start_worker, wait_for, worker_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_worker_and_lander_stop_within_the_bound_while_the_broker_is_frozen(
    fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = worker_env(fresh_broker.bootstrap, data, "stop", TAOFLOW_STREAM_STOP_TIMEOUT_S="5")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        wait_for(data, "SELECT count(*) FROM interactions", lambda r: r.rows[0][0] == 0, timeout=60)
        lander = json.loads((data / "lander.json").read_text())["pid"]
        assert fresh_broker.proc is not None
        os.kill(fresh_broker.proc.pid, signal.SIGSTOP)  # the broker stops answering (connections stay open)
        try:
            time.sleep(1)
            t0 = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
            took = time.monotonic() - t0
            deadline = time.monotonic() + 30
            while _alive(lander) and time.monotonic() < deadline:
                time.sleep(0.2)
            lander_took = time.monotonic() - t0
        finally:
            os.kill(fresh_broker.proc.pid, signal.SIGCONT)
        assert took < 5 + 3, f"worker took {took:.1f}s to stop"
        assert not _alive(lander) and lander_took < 2 * 5 + 5, f"lander took {lander_took:.1f}s to stop"
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
