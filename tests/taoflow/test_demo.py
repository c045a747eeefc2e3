"""`taoflow demo --fast`: the whole loop, checked in the outcome tables it leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streams.sqlapi import query
from taoflow.settings import Settings
from tests.conftest import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_fast_runs_the_whole_loop(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(TAOFLOW_DATA_DIR=str(tmp_path / "d"), TAOFLOW_BROKER_PORT=str(free_port()),
               PYTHONPATH=str(Path(__file__).parents[2]), COLUMNS="200")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "taoflow.cli", "demo", "--fast", "--seed", "3"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert ", 0 failed" in out, out
    cfg = Settings(overrides={"core": {"data_dir": tmp_path / "d" / "demo"}})
    assert cfg.core.duckdb_path.exists()

    def sql(q: str) -> list[list[Any]]:
        return query(q, cfg).rows

    # utilities rank the operators in their true order: support by the simulated users' success rates, math by
    # what the verifier measured for each strategy on the base model
    util = {(t, o): u for t, o, u in sql("SELECT task_type, operator, utility FROM utilities")}
    assert util[("support", "empathetic@base")] > util[("support", "terse@base")], out
    truth = dict(sql("SELECT operator, avg(reward) FROM final_scores WHERE task_type = 'math' AND operator "
                     "LIKE '%@base' GROUP BY operator"))  # fmt: skip
    better, worse = sorted(["direct@base", "padded@base"], key=lambda op: -truth[op])
    assert truth[better] > truth[worse] and util[("math", better)] > util[("math", worse)], out
    # a TAO round was published (the demo is a drill: its gate reports, margin -1) with its held-out numbers, on
    # questions split from the trained ones; its adapter was hot-swapped in as a canary
    published = sql("SELECT adapter, reward_before, reward_after, gain_lower_bound FROM round_history "
                    "WHERE decision = 'published'")  # fmt: skip
    assert len(published) == 1, out
    adapter, before, after, lower = published[0]
    assert None not in (before, after, lower) and lower <= after - before, out
    actions = [a for (a,) in sql(f"SELECT action FROM adapters WHERE adapter = '{adapter}' ORDER BY ts")]
    assert actions[:3] == ["published", "loaded", "canary"], actions
    # the release decision, by the sequential test on canary and base rewards (same strategies, same time)
    assert actions[3] in ("promoted", "rolled_back"), actions
    reason, metrics = sql(f"SELECT reason, metrics FROM adapters WHERE adapter = '{adapter}' AND action = "
                          f"'{actions[3]}'")[0]  # fmt: skip
    ev = json.loads(metrics) if isinstance(metrics, str) else metrics
    served = sql(f"SELECT count(*) FROM interactions WHERE adapter = '{adapter}'")[0][0]
    if actions[3] == "promoted":
        # by the test's own rule: the always-valid 95% interval of (adapter - base) lies above zero
        assert ev["lower"] > 0 and min(ev["n_challenger"], ev["n_reference"]) >= 30, (reason, ev)
        assert served >= 300, served  # the promoted adapter then served traffic
    else:
        # otherwise the demo shows the rollback with its evidence, and the adapter is taken out of service
        assert "worse than" in reason or "not shown better" in reason, reason
        assert "unloaded" in actions[4:], actions
    env["TAOFLOW_DATA_DIR"] = str(cfg.core.data_dir)
    report = subprocess.run([sys.executable, "-m", "taoflow.cli", "report", "--format", "json"], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0 and adapter in report.stdout, report.stdout + report.stderr
