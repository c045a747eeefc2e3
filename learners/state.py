"""A TAO round's durable state: the learner directory, crash-safe JSON writes, the one-round-at-a-time lock, the
round state file (mirrored into `tao_rounds`) and the adapter the last committed round published."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learners.exceptions import LearnerError
from learners.records import RecordSink
from taoflow.settings import Settings

log = logging.getLogger(__name__)

PAUSE_ENV = "TAOFLOW_LEARNER_PAUSE_AT"  # test seam: park the round at a checkpoint so a test can kill it there


def learner_dir(settings: Settings) -> Path:
    return settings.core.data_dir / "learner"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` to `path` so that a crash leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(doc, indent=1, default=str).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def round_lock(settings: Settings) -> Iterator[None]:
    """Only one round at a time per data directory, across processes (`tao run` and `learner` alike)."""
    path = learner_dir(settings) / "round.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LearnerError(f"another TAO round is running on {settings.core.data_dir}; try again later") from None
        yield
    finally:
        os.close(fd)


def checkpoint(settings: Settings, point: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        (learner_dir(settings) / "paused-at").write_text(point)
        while True:  # parked until killed
            time.sleep(1)


class RoundState:
    def __init__(self, settings: Settings, sink: RecordSink, doc: dict[str, Any]) -> None:
        self.settings = settings
        self.sink = sink
        self.doc = doc

    @property
    def path(self) -> Path:
        return learner_dir(self.settings) / "rounds" / f"{self.doc['round_id']}.json"

    def save(self, **changes: Any) -> None:
        self.doc.update(changes)
        self.doc["seq"] = int(self.doc.get("seq", 0)) + 1
        write_json_atomic(self.path, self.doc)
        self.sink.write("tao_rounds", [self.row()])

    def row(self) -> dict[str, Any]:
        d = self.doc
        return {
            "round_id": d["round_id"],
            "status": d["status"],
            "stage": d.get("stage"),
            "started_at": d["started_at"],
            "finished_at": d.get("finished_at"),
            "base_model": d["base_model"],
            "parent_adapter": d.get("parent_adapter"),
            "adapter": d.get("adapter"),
            "mode": d["mode"],
            "k": d["k"],
            "window_start": d.get("window_start"),
            "window_end": d.get("window_end"),
            "prompts": d.get("prompts"),
            "heldout": d.get("heldout"),
            "timings": d.get("timings", {}),
            "metrics": d.get("metrics", {}),
            "error": d.get("error"),
            "seq": d["seq"],
        }


def load_rounds(settings: Settings) -> list[dict[str, Any]]:
    """Every round's state document, oldest first."""
    out = []
    for path in sorted((learner_dir(settings) / "rounds").glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            out.append(json.loads(path.read_text()))
    return out


def current_adapter(settings: Settings) -> dict[str, Any] | None:
    """The adapter the last committed round published (training continues from it), if any."""
    path = learner_dir(settings) / "current.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not (settings.core.adapters_dir / doc["adapter"] / "manifest.json").exists():
        log.warning(
            "current adapter %s is missing from %s; training starts from the base",
            doc["adapter"],
            settings.core.adapters_dir,
        )
        return None
    return doc


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def staging_dir(settings: Settings, name: str) -> Path:
    return settings.core.adapters_dir / f".staging-{name}"
