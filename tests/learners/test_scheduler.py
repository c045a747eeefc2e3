"""`taoflow learner`: scheduled rounds, the new-prompt threshold, job state across restarts, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from learners.scheduler import JOB_ID, new_prompts
from learners.state import learner_dir
from learners.tasks import arithmetic_prompts
from tests.learners.conftest import land_prompts, learner_settings

ROOT = Path(__file__).parents[2]


def _env(settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(settings.environ(), PYTHONPATH=str(ROOT), TAOFLOW_LOG_LEVEL="INFO", **extra)
    return env


def _rounds(settings) -> list[tuple]:
    con = duckdb.connect(str(settings.core.duckdb_path), read_only=True)
    try:
        return con.execute("SELECT round_id, status, error FROM tao_rounds ORDER BY started_at").fetchall()
    finally:
        con.close()


def _wait(pred, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _statuses(settings) -> list[str]:
    rounds = learner_dir(settings) / "rounds"
    return [json.loads(p.read_text())["status"] for p in rounds.glob("*.json")] if rounds.exists() else []


def test_learner_runs_rounds_on_schedule_skips_without_new_prompts_and_recovers_after_a_crash(
    tmp_path, warm_model
) -> None:
    from tests.conftest import free_port

    metrics_port = free_port()
    settings = learner_settings(tmp_path / "d", warm_model, gate_margin=-1.0, interval_minutes=0.05,
                                min_new_prompts=10, metrics_port=metrics_port)  # fmt: skip
    land_prompts(settings, arithmetic_prompts(30, seed=8))
    assert new_prompts(settings) == 30

    # a round that a crash interrupted, left in state "running"
    crash = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "tao", "run"], start_new_session=True,
                             env=_env(settings, TAOFLOW_LEARNER_PAUSE_AT="generate"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)  # fmt: skip
    _wait(lambda: (learner_dir(settings) / "paused-at").exists(), 120, crash)
    os.killpg(crash.pid, signal.SIGKILL)
    crash.wait()
    assert _statuses(settings) == ["running"]

    learner = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "learner"], env=_env(settings),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        # at start the interrupted round is marked failed; within an interval a round runs and publishes
        _wait(lambda: sorted(_statuses(settings)) == ["failed", "published"], 180, learner)
        # no new prompts since that round's window: the next scheduled runs are skipped
        time.sleep(8)
        assert sorted(_statuses(settings)) == ["failed", "published"]
        import httpx

        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'taoflow_learner_rounds_total{status="published"} 1.0' in metrics
        assert 'taoflow_learner_stage_seconds_count{stage="train"} 1.0' in metrics
    finally:
        learner.send_signal(signal.SIGTERM)
        out = learner.communicate(timeout=60)[0].decode()
    assert learner.returncode == 0, out[-3000:]
    assert "marked failed" in out and "scheduled round skipped: 0 new prompts" in out

    # the job and its next run time live in the SQLite job store, across restarts
    import sqlite3

    con = sqlite3.connect(learner_dir(settings) / "jobs.sqlite")
    assert [r[0] for r in con.execute("SELECT id FROM apscheduler_jobs")] == [JOB_ID]
    con.close()
    rounds = _rounds(settings)
    assert [r[1] for r in rounds] == ["failed", "published"]
    assert "interrupted during generate" in rounds[0][2]
