"""Sticky routing for multi-step sessions: the operator chosen at a session's first step serves every step.

An agent's task in several steps (plan, call a tool, answer) is one trial of one strategy: its outcome (session
feedback) rewards the operator that ran it, so the operator must not change between its steps. The gateway keeps,
per caller and session id, the operator of the first step and the next step number, for `ttl_s` after the last
step, at most `max_sessions` of them (the least recently used go first).

This is per gateway process: with several replicas, route a session's requests to one replica (hash on the
`X-Taoflow-Session` header at the load balancer); a step that reaches another replica is routed afresh there.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass


@dataclass
class Sticky:
    task_type: str
    operator: str  # the full `strategy@adapter` name
    next_step: int
    seen: float


class Sessions:
    """(caller, session id) -> the session's operator and its next step number, bounded and expiring.

    >>> s = Sessions(ttl_s=60, max_sessions=2)
    >>> s.record(None, "a", "qa", "plain@base", None, now=0.0), s.record(None, "a", "qa", "plain@base", None, now=1.0)
    (0, 1)
    >>> s.get(None, "a", now=2.0).operator, s.get("k" * 32, "a", now=2.0)  # kept per caller
    ('plain@base', None)
    >>> s.get(None, "a", now=100.0) is None  # expired
    True
    """

    def __init__(self, ttl_s: float, max_sessions: int) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._live: collections.OrderedDict[tuple[str | None, str], Sticky] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def get(self, caller: str | None, session_id: str, now: float | None = None) -> Sticky | None:
        now = time.monotonic() if now is None else now
        key = (caller, session_id)
        sticky = self._live.get(key)
        if sticky is not None and now - sticky.seen > self.ttl_s:
            del self._live[key]
            return None
        return sticky

    def record(
        self, caller: str | None, session_id: str, task_type: str, operator: str, step: int | None,
        now: float | None = None,
    ) -> int:  # fmt: skip
        """Remember the operator that served this step; returns the step number (the client's, or the next one)."""
        now = time.monotonic() if now is None else now
        key = (caller, session_id)
        sticky = self.get(caller, session_id, now)
        number = step if step is not None else (sticky.next_step if sticky is not None else 0)
        if sticky is None:
            sticky = self._live[key] = Sticky(task_type, operator, number + 1, now)
        else:
            sticky.operator, sticky.task_type = operator, task_type
            sticky.next_step, sticky.seen = max(sticky.next_step, number + 1), now
        self._live.move_to_end(key)
        while len(self._live) > self.max_sessions:
            self._live.popitem(last=False)
        return number
