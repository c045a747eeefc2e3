"""Crash-safe on-disk spool: fsync'd, checksummed, segmented append log of records awaiting delivery."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from taoflow.exceptions import SpoolError

log = logging.getLogger(__name__)

# record := u32 payload length | u32 crc32(payload) | payload
# payload := u16 topic length | topic | i32 key length (-1 = no key) | key | value
_HEADER = struct.Struct("<II")
_TOPIC_LEN = struct.Struct("<H")
_KEY_LEN = struct.Struct("<i")
_SUFFIX = ".spool"
_ACK_SUFFIX = ".ack"


@dataclass(frozen=True, slots=True)
class Record:
    """One message waiting for the broker."""

    topic: str
    key: bytes | None
    value: bytes

    def encode(self) -> bytes:
        topic = self.topic.encode()
        key = b"" if self.key is None else self.key
        klen = -1 if self.key is None else len(key)
        payload = b"".join((_TOPIC_LEN.pack(len(topic)), topic, _KEY_LEN.pack(klen), key, self.value))
        return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> Record:
        (tlen,) = _TOPIC_LEN.unpack_from(payload, 0)
        pos = _TOPIC_LEN.size
        topic = payload[pos : pos + tlen].decode()
        pos += tlen
        (klen,) = _KEY_LEN.unpack_from(payload, pos)
        pos += _KEY_LEN.size
        key = None if klen < 0 else payload[pos : pos + klen]
        pos += max(klen, 0)
        return cls(topic, key, payload[pos:])


def _read_segment(path: Path) -> tuple[list[Record], int]:
    """Every whole, checksum-valid record of a segment, and the byte length they cover (a torn tail is cut)."""
    data = path.read_bytes()
    records: list[Record] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if end > len(data):
            break
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        records.append(Record.decode(payload))
        pos = end
    return records, pos


class Spool:
    """A directory of numbered segments; the oldest is delivered first, a delivered segment is deleted.

    One process owns a spool directory at a time (an exclusive lock), so two agents never interleave.
    Writes are appended and fsync'd per batch; on open, a torn last record (crash mid-write) is truncated.
    Delivery progress inside a segment is kept in a `<segment>.ack` file so a partly delivered segment
    is not sent again from its start.
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 8 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / "LOCK", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot open spool directory {self.dir}: {exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolError(
                f"spool {self.dir} is in use by another process; give each Emitter its own spool_dir"
            ) from None
        self._segments: list[int] = sorted(int(p.stem) for p in self.dir.glob(f"*{_SUFFIX}"))
        self._sizes: dict[int, int] = {}
        self._counts: dict[int, int] = {}
        for seg in self._segments:
            records, valid = _read_segment(self._path(seg))
            size = self._path(seg).stat().st_size
            if valid < size:
                log.warning("spool %s: cut a torn record at byte %d of segment %d", self.dir, valid, seg)
                with open(self._path(seg), "r+b") as fh:
                    fh.truncate(valid)
                    os.fsync(fh.fileno())
            self._sizes[seg] = valid
            self._counts[seg] = len(records) - self._acked(seg)
        self._tail_fh: int | None = None

    # paths and bookkeeping

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:020d}{_SUFFIX}"

    def _ack_path(self, seg: int) -> Path:
        return self.dir / f"{seg:020d}{_ACK_SUFFIX}"

    def _acked(self, seg: int) -> int:
        try:
            return int(self._ack_path(seg).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        """Records spooled and not yet delivered."""
        return sum(self._counts.values())

    # writing

    def _open_tail(self) -> int:
        if self._tail_fh is not None and self._sizes[self._segments[-1]] < self.segment_bytes:
            return self._tail_fh
        self._close_tail()
        seg = (self._segments[-1] + 1) if self._segments else 1
        fd = os.open(self._path(seg), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        self._segments.append(seg)
        self._sizes[seg] = 0
        self._counts[seg] = 0
        self._fsync_dir()
        self._tail_fh = fd
        return fd

    def _close_tail(self) -> None:
        if self._tail_fh is not None:
            os.close(self._tail_fh)
            self._tail_fh = None

    def append(self, records: Iterable[Record]) -> int:
        """Append and fsync as one write; returns how many fitted under `max_bytes` (the caller counts the rest)."""
        budget = self.max_bytes - self.bytes
        blobs: list[bytes] = []
        nbytes = 0
        for rec in records:
            blob = rec.encode()
            if nbytes + len(blob) > budget:
                break
            blobs.append(blob)
            nbytes += len(blob)
        if not blobs:
            return 0
        fd = self._open_tail()
        try:
            os.write(fd, b"".join(blobs))
            os.fsync(fd)
        except OSError as exc:
            raise SpoolError(f"cannot write spool {self.dir}: {exc}") from None
        seg = self._segments[-1]
        self._sizes[seg] += nbytes
        self._counts[seg] += len(blobs)
        return len(blobs)

    # reading and acknowledging

    def head(self) -> tuple[int, list[Record]] | None:
        """The oldest segment's undelivered records; the segment is sealed first so it no longer grows."""
        if not self._segments:
            return None
        seg = self._segments[0]
        if seg == self._segments[-1]:
            self._close_tail()
        records, _ = _read_segment(self._path(seg))
        return seg, records[self._acked(seg) :]

    def ack(self, seg: int, delivered: int) -> None:
        """Mark the first `delivered` records of the head batch delivered; a fully delivered segment goes."""
        if delivered <= 0:
            return
        if delivered >= self._counts[seg]:
            self._drop_segment(seg)
            return
        done = self._acked(seg) + delivered
        tmp = self._ack_path(seg).with_suffix(".tmp")
        tmp.write_text(str(done))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self._ack_path(seg))
        self._counts[seg] -= delivered

    def _drop_segment(self, seg: int) -> None:
        if self._segments and seg == self._segments[-1]:
            self._close_tail()
        self._path(seg).unlink(missing_ok=True)
        self._ack_path(seg).unlink(missing_ok=True)
        self._segments.remove(seg)
        self._sizes.pop(seg, None)
        self._counts.pop(seg, None)
        self._fsync_dir()

    def drop_oldest(self) -> int:
        """Discard the oldest segment (the `drop_oldest` policy); returns how many records went."""
        if not self._segments:
            return 0
        seg = self._segments[0]
        lost = self._counts.get(seg, 0)
        self._drop_segment(seg)
        return lost

    def close(self) -> None:
        self._close_tail()
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)
