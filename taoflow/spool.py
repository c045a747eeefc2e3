"""Crash-safe on-disk spool: fsync'd, checksummed, segmented append log of records awaiting delivery."""

from __future__ import annotations

import builtins
import errno
import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from taoflow.exceptions import SpoolError

log = logging.getLogger(__name__)

# record := magic | u32 payload length | u32 crc32(length field, payload) | payload
# payload := u16 topic length | topic | i32 key length (-1 = no key) | key | value
# The magic is the sync marker a reader scans for after a damaged record; 0xF5 never occurs in UTF-8, so the JSON
# values cannot contain one, and a false match must also pass the checksum. Segments written before the marker
# (format 1: u32 length | u32 crc32(payload) | payload) are still read.
_MAGIC = b"\xf5\x7f\xa7\x1e"
_HEADER = struct.Struct("<4sII")
_V1_HEADER = struct.Struct("<II")
_TOPIC_LEN = struct.Struct("<H")
_KEY_LEN = struct.Struct("<i")
_SUFFIX = ".spool"
_ACK_SUFFIX = ".ack"
_CORRUPT_SUFFIX = ".corrupt"
_OWN_SUFFIXES = (_SUFFIX, _ACK_SUFFIX, _CORRUPT_SUFFIX, ".tmp")
# the spool holds prompts and responses: only the owning user may read it, whatever the umask
_DIR_MODE = 0o700
_FILE_MODE = 0o600


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
        length = struct.pack("<I", len(payload))
        return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload

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


def _frame_end(data: bytes, pos: int) -> int | None:
    """Where the record starting at `pos` says it ends (checksum not checked); None if its header is cut."""
    if data.startswith(_MAGIC, pos):
        if pos + _HEADER.size > len(data):
            return None
        return pos + _HEADER.size + _HEADER.unpack_from(data, pos)[1]
    if len(data) - pos < len(_MAGIC) and _MAGIC.startswith(data[pos:]):
        return None  # the marker itself was cut
    if pos + _V1_HEADER.size > len(data):
        return None
    return pos + _V1_HEADER.size + _V1_HEADER.unpack_from(data, pos)[0]


def _record_at(data: bytes, pos: int) -> tuple[Record, int] | None:
    """The whole, checksum-valid record starting at `pos` and the offset after it, or None."""
    end = _frame_end(data, pos)
    if end is None or end > len(data):
        return None
    if data.startswith(_MAGIC, pos):
        _, _, crc = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size : end]
        ok = zlib.crc32(payload, zlib.crc32(data[pos + 4 : pos + 8])) == crc
    else:
        _, crc = _V1_HEADER.unpack_from(data, pos)
        payload = data[pos + _V1_HEADER.size : end]
        ok = zlib.crc32(payload) == crc
    if not ok:
        return None
    try:
        return Record.decode(payload), end
    except (struct.error, UnicodeDecodeError):
        return None  # a checksum that matched by chance over bytes that are no record


def _resync(data: bytes, pos: int) -> int | None:
    """The start of the next valid record after a damaged one at `pos`, or None when none follows."""
    # a record whose frame is intact but whose bytes are not: the next one starts where its length says
    end = _frame_end(data, pos)
    if end is not None and pos < end < len(data) and _record_at(data, end) is not None:
        return end
    q = data.find(_MAGIC, pos + 1)
    while q != -1:
        if _record_at(data, q) is not None:
            return q
        q = data.find(_MAGIC, q + 1)
    return None


@dataclass
class _Scan:
    """What a read of one segment found."""

    records: list[Record] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # bytes of each valid record
    bad: list[tuple[int, int, int]] = field(default_factory=list)  # damaged ranges and about how many records each
    torn_at: int | None = None  # start of a last record a crash cut short

    @property
    def valid_bytes(self) -> int:
        return sum(end - start for start, end in self.spans)


def _scan(data: bytes) -> _Scan:
    """Every valid record of a segment; damaged records are stepped over to the next valid one."""
    out = _Scan()
    pos = 0
    while pos < len(data):
        got = _record_at(data, pos)
        if got is not None:
            out.records.append(got[0])
            out.spans.append((pos, got[1]))
            pos = got[1]
            continue
        nxt = _resync(data, pos)
        if nxt is None:
            end = _frame_end(data, pos)
            if end is None or end > len(data):
                out.torn_at = pos  # a crash mid-write: the record never finished
            else:
                out.bad.append((pos, len(data), max(1, data.count(_MAGIC, pos))))
            break
        out.bad.append((pos, nxt, max(1, data.count(_MAGIC, pos, nxt))))
        pos = nxt
    return out


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CLOEXEC, _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)  # open() keeps an existing file's mode; the umask could only narrow a new one
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written; a short write on a full disk comes back as ENOSPC."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


class Spool:
    """A directory of numbered segments; the oldest is delivered first, a delivered segment is deleted.

    One process owns a spool directory at a time (an exclusive lock), so two agents never interleave.
    The directory is 0700 and its files 0600. Writes are appended and fsync'd per batch; a batch that cannot
    be written whole (disk full, I/O error) is cut back out and raises SpoolError, so no torn record stays.
    On open, a torn last record (crash mid-write) is truncated. A damaged record is stepped over (records carry a
    sync marker): its bytes go to `<segment>.corrupt`, it is counted (`take_lost`) and logged, and the records
    after it are still delivered. Delivery progress inside a segment is kept in a `<segment>.ack` file so a
    partly delivered segment is not sent again from its start.
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 8 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lost = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, _DIR_MODE)
            self._lock_fd = _open_private(self.dir / "LOCK", os.O_CREAT | os.O_RDWR)
        except OSError as exc:
            raise SpoolError(
                f"cannot open spool directory {self.dir}: {exc.strerror or exc}; it must be a directory this user "
                "owns (set TAOFLOW_SDK_SPOOL_DIR)"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolError(
                f"spool {self.dir} is in use by another process; give each Emitter its own spool_dir"
            ) from None
        self._tighten_modes()
        self._segments: list[int] = sorted(int(p.stem) for p in self.dir.glob(f"*{_SUFFIX}"))
        self._sizes: dict[int, int] = {}
        self._counts: dict[int, int] = {}
        for seg in self._segments:
            records = self._load(seg)
            self._counts[seg] = len(records) - self._acked(seg)
        self._tail_fh: int | None = None

    def _tighten_modes(self) -> None:
        """Files an older version left world-readable become 0600."""
        for p in self.dir.iterdir():
            if p.name == "LOCK" or p.name.endswith(_OWN_SUFFIXES):
                try:
                    if p.is_file() and p.stat().st_mode & 0o077:
                        os.chmod(p, _FILE_MODE)
                except OSError as exc:
                    log.warning("spool %s: cannot make %s private (%s)", self.dir, p.name, exc.strerror)

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

    def _write_ack(self, seg: int, done: int) -> None:
        tmp = self._ack_path(seg).with_suffix(".tmp")
        fd = _open_private(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, str(done).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._ack_path(seg))

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

    def take_lost(self) -> int:
        """Records lost to damaged bytes since the last call (the caller counts them as dropped)."""
        lost, self._lost = self._lost, 0
        return lost

    # reading a segment, repairing it if it is damaged

    def _load(self, seg: int) -> list[Record]:
        """The segment's valid records; a torn tail is cut and damaged records are moved out (and counted)."""
        path = self._path(seg)
        data = path.read_bytes()
        scan = _scan(data)
        if scan.bad:
            self._quarantine(seg, data, scan)
        elif scan.torn_at is not None:
            log.warning(
                "spool %s: cut a torn record (%d bytes) at byte %d of segment %d: a crash during a write",
                self.dir, len(data) - scan.torn_at, scan.torn_at, seg,
            )  # fmt: skip
            with open(path, "r+b") as fh:
                fh.truncate(scan.torn_at)
                os.fsync(fh.fileno())
        self._sizes[seg] = scan.valid_bytes
        return scan.records

    # builtins.bytes: inside this class `bytes` names the property below
    def _quarantine(self, seg: int, data: builtins.bytes, scan: _Scan) -> None:
        """Rewrite the segment with only its valid records; the damaged bytes go to `<segment>.corrupt`."""
        acked = self._acked(seg)
        delivered_bad = lost = 0
        seen_bad = 0
        for start, end, n in scan.bad:
            # the position of this damaged range among the records as they were written
            index = sum(1 for s, _ in scan.spans if s < start) + seen_bad
            done = min(max(acked - index, 0), n)  # sent before the damage happened
            delivered_bad += done
            lost += n - done
            seen_bad += n
            log.error(
                "spool %s: segment %d has %d damaged bytes at %d (about %d records); they are skipped and kept in "
                "%s%s, the records after them are still delivered",
                self.dir, seg, end - start, start, n - done, self._path(seg).name, _CORRUPT_SUFFIX,
            )  # fmt: skip
        path = self._path(seg)
        bad_fd = _open_private(path.with_name(path.name + _CORRUPT_SUFFIX), os.O_CREAT | os.O_WRONLY | os.O_APPEND)
        try:
            _write_all(bad_fd, b"".join(data[s:e] for s, e, _ in scan.bad))
            os.fsync(bad_fd)
        finally:
            os.close(bad_fd)
        tmp = path.with_suffix(".tmp")
        fd = _open_private(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, b"".join(data[s:e] for s, e in scan.spans))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if delivered_bad:
            self._write_ack(seg, acked - delivered_bad)
        self._fsync_dir()
        self._lost += lost

    # writing

    def _open_tail(self) -> int:
        if self._tail_fh is not None and self._sizes[self._segments[-1]] < self.segment_bytes:
            return self._tail_fh
        self._close_tail()
        seg = (self._segments[-1] + 1) if self._segments else 1
        try:
            fd = _open_private(self._path(seg), os.O_CREAT | os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise SpoolError(f"cannot create a segment in spool {self.dir}: {exc.strerror or exc}") from None
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
        """Append and fsync as one write; returns how many fitted under `max_bytes` (the caller counts the rest).

        Raises SpoolError when the batch cannot be written (disk full, I/O error); the partial write is cut back
        out first, so the segment holds only whole records and later appends still work once space is back.
        """
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
        seg = self._segments[-1]
        try:
            _write_all(fd, b"".join(blobs))
            os.fsync(fd)
        except OSError as exc:
            self._cut_back(fd, seg)
            raise SpoolError(
                f"cannot write {len(blobs)} records to spool {self.dir}: {exc.strerror or exc}; free space on "
                "that disk or point TAOFLOW_SDK_SPOOL_DIR at another"
            ) from None
        self._sizes[seg] += nbytes
        self._counts[seg] += len(blobs)
        return len(blobs)

    def _cut_back(self, fd: int, seg: int) -> None:
        """Remove the bytes of a failed append so no torn record sits before the next one."""
        try:
            os.ftruncate(fd, self._sizes[seg])
            os.fsync(fd)
        except OSError as exc:
            # the segment may end in a torn record: stop appending to it (readers cut or step over that record)
            log.error("spool %s: cannot cut a failed write out of segment %d (%s)", self.dir, seg, exc.strerror)
            self._close_tail()

    # reading and acknowledging

    def head(self) -> tuple[int, list[Record]] | None:
        """The oldest segment's undelivered records; the segment is sealed first so it no longer grows."""
        if not self._segments:
            return None
        seg = self._segments[0]
        if seg == self._segments[-1]:
            self._close_tail()
        records = self._load(seg)  # damage that appeared since open is stepped over here
        acked = self._acked(seg)
        self._counts[seg] = len(records) - acked
        return seg, records[acked:]

    def ack(self, seg: int, delivered: int) -> None:
        """Mark the first `delivered` records of the head batch delivered; a fully delivered segment goes."""
        if delivered <= 0:
            return
        if delivered >= self._counts[seg]:
            self._drop_segment(seg)
            return
        self._write_ack(seg, self._acked(seg) + delivered)
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
