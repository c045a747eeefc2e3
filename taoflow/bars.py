"""Progress bars for the entry points: a TAO round's stages (`StageBars`, a `learners.progress.Reporter`) and any
counted phase, drawn by one rich `Progress` on stderr."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from learners.progress import Reporter


def bars(console: Console | None = None) -> Progress:
    """A `Progress` with the columns every taoflow bar uses (name, bar, n of total, time)."""
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console or Console(stderr=True))


class StageBars(Reporter):
    """One bar per stage of a TAO round."""

    def __init__(self, progress: Progress, prefix: str = "") -> None:
        self.progress = progress
        self.prefix = prefix
        self.task: Any = None

    def stage(self, name: str, total: int | None = None) -> None:
        self.task = self.progress.add_task(f"{self.prefix}{name}", total=total or 1)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def done(self, name: str, seconds: float, note: str = "") -> None:
        if self.task is not None:
            total = self.progress.tasks[self.task].total
            self.progress.update(self.task, completed=total, description=f"{self.prefix}{name} ({seconds:.1f}s)")
        self.task = None
