"""The worker's watchdog (broker-free): a worker that can no longer make progress says why, and its watchdog thread
exits the process so that another worker takes its partitions. A recovery that is running, however long, never counts,
and nothing counts before the processing loop has started."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from streams.lane import Lane


class Flow:
    def __init__(self) -> None:
        self.active = True

    def manage_queue(self, queue: Any) -> None:
        pass

    def is_active(self) -> bool:
        return self.active


def lane(stall_s: float = 60.0) -> tuple[Lane, Any]:
    app = SimpleNamespace(flow_control=Flow(), consumer=SimpleNamespace(assignment=lambda: {"tp0", "tp1"}),
                          tables=SimpleNamespace(recovery=SimpleNamespace(in_recovery=False)))  # fmt: skip
    w = Lane(app, SimpleNamespace(cfg=SimpleNamespace(recovery_stall_s=stall_s)), {})
    w.last_tick = 0.0
    return w, app


def test_assigned_partitions_nobody_recovers_are_reported_after_the_stall_time() -> None:
    w, app = lane()
    app.flow_control.active = False  # revoked, reassigned, and no recovery started
    for t in (0.0, 30.0, 59.0):
        w.last_tick = t  # the loop still runs
        assert w.health(t) is None
    w.last_tick = 60.0
    assert w.health(60.0) == "2 partitions assigned, the flow suspended and no table recovery running for 60s"


def test_a_processing_loop_that_stopped_running_is_reported() -> None:
    w, _ = lane()
    assert w.health(59.0) is None
    assert w.health(61.0) == "the stream processing loop has not run for 61s"


def test_before_the_loop_has_started_only_a_recovery_nobody_runs_counts() -> None:
    w, app = lane()
    w.last_tick = None  # faust starts the loop's task after the first recovery
    assert w.health(10_000.0) is None
    app.flow_control.active = False  # the first recovery was cancelled (seed 280): the loop never starts
    assert w.health(10_000.0) is None
    assert w.health(10_060.0) is not None


@pytest.mark.parametrize("state", ["flow active", "recovering", "nothing assigned"])
def test_a_healthy_or_recovering_worker_is_never_reported(state: str) -> None:
    w, app = lane()
    app.flow_control.active = state == "flow active"
    app.tables.recovery.in_recovery = state == "recovering"
    if state == "nothing assigned":
        app.consumer.assignment = set
    for t in range(0, 600, 3):
        w.last_tick = float(t)
        assert w.health(float(t)) is None


def test_the_clock_restarts_when_recovery_resumes() -> None:
    w, app = lane()
    app.flow_control.active = False
    for t, recovering in ((0.0, False), (50.0, False), (55.0, True), (70.0, False), (120.0, False)):
        app.tables.recovery.in_recovery = recovering
        w.last_tick = t
        assert w.health(t) is None
    w.last_tick = 130.0
    assert w.health(130.0) is not None
