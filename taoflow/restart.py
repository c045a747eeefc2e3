"""One restart policy for every supervised child process (`taoflow up`'s children, the worker's lander)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """Exponential restart delay: `first` seconds, doubling up to `cap`; a child that ran at least `stable` seconds
    before it exited starts again from `first` (it was not crash-looping).

    >>> b = Backoff(first=1.0, cap=4.0, stable=60.0)
    >>> [b.delay(ran_for=0.5) for _ in range(4)], b.delay(ran_for=120.0)
    ([1.0, 2.0, 4.0, 4.0], 1.0)
    """

    first: float = 1.0
    cap: float = 30.0
    stable: float = 60.0
    _next: float = 0.0

    def delay(self, ran_for: float) -> float:
        """How long to wait before restarting a child that exited after running `ran_for` seconds."""
        if ran_for >= self.stable or not self._next:
            self._next = self.first
        wait = self._next
        self._next = min(self.cap, self._next * 2)
        return wait
