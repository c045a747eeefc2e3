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


def test_a_lander_whose_worker_died_while_starting_it_stops_on_its_own(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a worker that is already gone when its lander starts (its first parent is init)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(TAOFLOW_DATA_DIR=str(tmp_path), TAOFLOW_KAFKA_BOOTSTRAP="127.0.0.1:9", TAOFLOW_STREAM_STOP_TIMEOUT_S="2",
               _TAOFLOW_LANDER_PARENT=str(dead.pid), PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # fmt: skip
    t0 = time.monotonic()
    lander = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "lander"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        lander.wait(60)
    finally:
        if lander.poll() is None:
            lander.kill()
    assert time.monotonic() - t0 < 30
