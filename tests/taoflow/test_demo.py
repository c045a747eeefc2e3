"""`taoflow demo --fast`: the streaming half of the loop learns the best operator for each task."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_fast_learns_operator_order(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAOFLOW_")}
    env.update(TAOFLOW_DATA_DIR=str(tmp_path / "d"), TAOFLOW_BROKER_PORT=str(free_port()),
               PYTHONPATH=str(Path(__file__).parents[2]), COLUMNS="200")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "taoflow.cli", "demo", "--fast", "--seed", "3"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Support utilities match the strategies' true order" in out, out
    assert "TAO round" in out and ", 0 failed" in out, out
    assert (tmp_path / "d" / "demo" / "taoflow.duckdb").exists()
