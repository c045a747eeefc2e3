"""The lane's watch on recovery (broker-free): a worker whose assigned partitions have a suspended flow and no table
recovery running leaves, so that another worker takes them; a recovery that is running, however long, never counts."""

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


def lane(stall_s: float = 60.0) -> tuple[Lane, Any, list[int]]:
    app = SimpleNamespace(flow_control=Flow(), consumer=SimpleNamespace(assignment=lambda: {"tp0", "tp1"}),
                          tables=SimpleNamespace(recovery=SimpleNamespace(in_recovery=False)))  # fmt: skip
    ctx = SimpleNamespace(cfg=SimpleNamespace(recovery_stall_s=stall_s))
    exits: list[int] = []
    lane = Lane(app, ctx, {})
    lane._exit = exits.append  # type: ignore[method-assign]
    return lane, app, exits


def test_assigned_partitions_nobody_recovers_make_the_worker_leave_after_the_stall_time() -> None:
    w, app, exits = lane()
    app.flow_control.active = False  # revoked, reassigned, and no recovery started
    for t in (0.0, 30.0, 59.0):
        w._watch_recovery(now=t)
    assert exits == []
    w._watch_recovery(now=60.0)
    assert exits == [5]


@pytest.mark.parametrize("state", ["flow active", "recovering", "nothing assigned"])
def test_a_healthy_or_recovering_worker_is_never_counted(state: str) -> None:
    w, app, exits = lane()
    app.flow_control.active = state == "flow active"
    app.tables.recovery.in_recovery = state == "recovering"
    if state == "nothing assigned":
        app.consumer.assignment = set
    for t in range(0, 600, 3):
        w._watch_recovery(now=float(t))
    assert exits == []


def test_the_clock_restarts_when_recovery_resumes() -> None:
    w, app, exits = lane()
    app.flow_control.active = False
    w._watch_recovery(now=0.0)
    w._watch_recovery(now=50.0)
    app.tables.recovery.in_recovery = True  # a recovery started after all
    w._watch_recovery(now=55.0)
    app.tables.recovery.in_recovery = False
    w._watch_recovery(now=70.0)
    w._watch_recovery(now=120.0)
    assert exits == []
    w._watch_recovery(now=130.0)
    assert exits == [5]
