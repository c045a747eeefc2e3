"""`taoflow up`: every component under one supervisor; a killed child comes back and the loop carries on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from streams.sqlapi import query
from taoflow.settings import Settings
from tests.conftest import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_runs_everything_restarts_a_killed_worker_and_stops_cleanly(tmp_path: Path, warm_model: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(PYTHONPATH=str(Path(__file__).parents[2]), TAOFLOW_DATA_DIR=str(data),
               TAOFLOW_BROKER_PORT=str(free_port()), TAOFLOW_SERVE_PORT=str(port),
               TAOFLOW_BASE_MODEL=str(warm_model), TAOFLOW_LEARNER_INTERVAL_MINUTES="600",
               TAOFLOW_SERVE_MAX_TOKENS="4")  # fmt: skip
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)  # fmt: skip
    state = data / "up.json"
    url = f"http://127.0.0.1:{port}"
    settings = Settings(overrides={"core": {"data_dir": data}})

    def wait(pred, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if pred():
                    return
            except Exception:
                pass
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-4000:]
            assert time.monotonic() < deadline, f"timed out: {what}\n" + (tmp_path / "up.log").read_text()[-4000:]
            time.sleep(0.5)

    def chat(text: str) -> str:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"model": "taoflow", "messages": [{"role": "user", "content": text}]})  # fmt: skip
        assert r.status_code == 200, r.text
        return str(r.json()["interaction_id"])

    def landed(iid: str) -> bool:
        return bool(query(f"SELECT count(*) FROM interactions WHERE event_id = '{iid}'", settings).rows[0][0])

    try:
        wait(lambda: httpx.get(f"{url}/healthz").status_code == 200, "the gateway")
        first = chat("Order 1: What is 1 + 1?")
        wait(lambda: landed(first), "the first interaction to land")
        children = json.loads(state.read_text())["children"]
        assert set(children) == {"broker", "worker", "learner", "gateway"}
        worker_pid = children["worker"]["pid"]
        os.killpg(worker_pid, signal.SIGKILL)
        wait(lambda: json.loads(state.read_text())["children"]["worker"]["restarts"] == 1, "the worker restart")
        new_pid = json.loads(state.read_text())["children"]["worker"]["pid"]
        assert new_pid != worker_pid and _alive(new_pid)
        second = chat("Order 2: What is 2 + 2?")
        wait(lambda: landed(second), "an interaction after the restart to land")
    finally:
        pids = [c["pid"] for c in json.loads(state.read_text())["children"].values()] if state.exists() else []
        up.send_signal(signal.SIGINT)
        code = up.wait(90)
        log.close()
    out = (tmp_path / "up.log").read_text()
    assert code == 0, out[-4000:]
    assert "worker exited with -9; restarting" in out and "all stopped" in out
    assert all(not _alive(p) for p in pids if p)
    assert not state.exists()
