"""The fault campaign (`bench/chaos.py`), short: five seeded runs, each with its own broker, up to three workers and
randomized faults (SIGKILL, SIGTERM, SIGSTOP past the session timeout, joins and leaves, the lander killed, the broker
frozen), checked by the independent oracle: every interaction scored and landed exactly once, utilities equal to the
closed form to 1e-9, no duplicate rows in DuckDB or Parquet, and no committed offset ever past an interaction whose
score was not yet in Kafka. A failing seed replays with `python bench/chaos.py --replay SEED`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import chaos

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.mark.parametrize("seed", [100, 101, 102, 103, 104])
def test_no_loss_no_duplicates_under_randomized_faults(seed: int, tmp_path: Path) -> None:
    plan = chaos.Plan.draw(seed, events=1000, workers=3, duration_s=12.0, faults=3)
    report = chaos.run_once(plan, tmp_path)
    assert report.ok, (
        f"seed {seed}, faults {dict(report.faults)}: "
        + "; ".join(report.problems)
        + ("\nfrom the workers' logs:\n" + "\n".join(report.clues))
    )
    assert report.lost == report.duplicated == report.invariant_violations == 0
    assert report.utility_error <= 1e-9
