"""Input positions owned by taoflow, and the fencing of a paused old owner's late changelog writes.

Positions. For every input partition the worker writes "processed through offset n-1" into the `positions` table, in
the same Outbox as the table changelog records that processing produced, on the changelog partition of the input
partition (so faust's recovery hands it to that partition's next owner with the rest of the partition's state). An
Outbox goes out in three steps, each acknowledged before the next: outputs, table changelogs, positions. A recovered
position n therefore means: every output of the records before n is in Kafka, and so is every table change they
made. After recovery each input partition is sought to its recovered position (`streams.seams.Consumer.perform_seek`),
not to Kafka's committed offset; Kafka commits only follow it, for lag monitoring, and a wrong commit cannot lose
anything. A partition with no position yet (a new deployment, or state written before positions existed) starts at
its committed offset, or at its beginning.

Epochs. A worker paused past the session timeout (SIGSTOP, a long GC, a frozen VM) is replaced while it sleeps; when it
wakes it may still deliver a processed batch before it learns it was replaced. Its outputs are harmless (every
consumer de-duplicates by source position), but its changelog records would land on partitions another worker now
owns, and the next recovery would apply them over the new owner's state. So every changelog partition has epochs:

- When a worker takes a changelog partition as active, before reading it, it appends a marker record; the marker's
  offset is the worker's epoch on that partition, and every changelog record it writes there carries it in the
  `taoflow-epoch` header.
- Recovery (and standby replication) applies a record only if its epoch is at least the highest epoch seen so far on
  its partition (markers included). A paused owner's epoch is below the marker of the owner that replaced it, so its
  records written after that marker are skipped by every later reader; its records from before the marker are part of
  what the new owner recovered. Which records count depends on the log alone, so every reader agrees.
- A worker that missed a group generation (it was paused or cut off) may still hold, in memory, state it wrote as a
  zombie; it drops its tables and rebuilds them from the changelogs (`streams.seams.Recovery`).

The epoch is taoflow's own (a marker's offset), not the consumer group's generation: a group that empties can start its
generations again, and a filter by generation would then drop real writes. Markers have a unique key each, so log
compaction never removes the one a later reader needs. Records without the header (written before epochs existed)
count as epoch -1: applied until the partition's first marker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

EPOCH_HEADER = "taoflow-epoch"
MARKER_PREFIX = b'["taoflow-epoch","'  # a JSON list: valid for faust's key decoding, and no table key (a string) is one
NO_EPOCH = -1


def position_key(topic: str, partition: int) -> str:
    """The `positions` table key of an input partition."""
    return f"{topic}/{partition}"


def resume_offsets(rows: Mapping[str, Any], partitions: Iterable[Any]) -> dict[Any, int]:
    """Where each of `partitions` (faust TPs) resumes by its recovered position; partitions without one are absent."""
    out = {}
    for tp in partitions:
        row = rows.get(position_key(tp.topic, tp.partition))
        if isinstance(row, dict) and isinstance(row.get("next"), int) and row["next"] >= 0:
            out[tp] = row["next"]
    return out


def marker_key() -> bytes:
    """A marker's key: unique, so compaction keeps every marker (they are a few dozen bytes, one per takeover)."""
    return MARKER_PREFIX + uuid.uuid4().hex.encode() + b'"]'


def is_marker(key: Any) -> bool:
    return isinstance(key, bytes | bytearray) and bytes(key).startswith(MARKER_PREFIX)


def epoch_of(headers: Any) -> int:
    """The `taoflow-epoch` header of a record (faust hands headers on as a list of pairs, or a mapping)."""
    if not headers:
        return NO_EPOCH
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if name == EPOCH_HEADER:
            try:
                return int(value)
            except (TypeError, ValueError):
                return NO_EPOCH
    return NO_EPOCH


def epoch_header(epoch: int | None) -> list[tuple[str, bytes]]:
    return [] if epoch is None else [(EPOCH_HEADER, str(epoch).encode())]


class EpochFilter:
    """Which changelog records a reader applies: a record counts if its epoch is at least the highest epoch seen on its
    partition so far; a marker raises that epoch to its own offset and is never applied itself.

    State per partition, in log order. A read that starts again at or below an offset already seen (faust recovering a
    partition from its beginning) starts the partition's state again."""

    def __init__(self) -> None:
        self._high: dict[Any, int] = {}  # tp -> highest epoch seen
        self._last: dict[Any, int] = {}  # tp -> last offset seen
        self.skipped = 0

    def keep(self, tp: Any, offset: int, key: Any, headers: Any) -> bool:
        last = self._last.get(tp)
        if last is not None and offset <= last:
            self._high.pop(tp, None)  # the partition is read again from an earlier point
        self._last[tp] = offset
        high = self._high.get(tp, NO_EPOCH)
        if is_marker(key):
            self._high[tp] = max(high, offset)
            return False
        epoch = epoch_of(headers)
        if epoch < high:
            self.skipped += 1
            if self.skipped == 1 or self.skipped % 1000 == 0:
                log.warning("%s/%d@%d: a changelog record of epoch %d, written after epoch %d began (a replaced "
                            "owner's late write), is not applied (%d so far)", getattr(tp, "topic", tp),
                            getattr(tp, "partition", -1), offset, epoch, high, self.skipped)  # fmt: skip
            return False
        self._high[tp] = max(high, epoch)
        return True

    def forget(self) -> None:
        """Every partition is read again from its beginning (the tables were dropped)."""
        self._high.clear()
        self._last.clear()


class Fencing:
    """This worker's epochs, the changelog filter and its group membership (see the module's text)."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer  # streams.outbox.BatchProducer
        self.epochs: dict[tuple[str, int], int] = {}  # changelog partition -> this worker's epoch there (read at send)
        self.filter = EpochFilter()
        self._member: str | None = None

    async def begin_epochs(self, tps: Iterable[Any]) -> None:
        """Append a marker to each active changelog partition (faust TPs); its offset is this worker's epoch there.
        Partitions no longer active lose their epoch: a late write to one carries none, and is not recovered."""
        wanted = sorted({(tp.topic, tp.partition) for tp in tps})
        fresh = await self.producer.write_markers(wanted) if wanted else {}
        self.epochs.clear()
        self.epochs.update(fresh)
        log.info("epochs begun on %d changelog partitions", len(fresh))

    def rejoined(self, member: str | None) -> bool:
        """True if this worker is in the group under a new member id since its last assignment (it was removed)."""
        previous, self._member = self._member, member
        return previous is not None and member is not None and member != previous

    def drop_state(self, app: Any) -> None:
        """Empty every table and make recovery read every changelog partition from its beginning."""
        from streams.outbox import table_rows

        for table in app.tables.values():
            table_rows(table).clear()
            getattr(table.data, "_key_partition", {}).clear()
        recovery = app.tables.recovery
        for offsets in (recovery.active_offsets, recovery.standby_offsets):
            offsets.clear()
        self.filter.forget()
        self.epochs.clear()
