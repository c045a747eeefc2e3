"""The SDK spool holds prompts: private on disk whatever the umask, a damaged byte costs one counted record (not
everything after it), and a full disk costs one counted batch while the spool stays readable and keeps working."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.topics import INTERACTIONS
from taoflow import Emitter
from taoflow.broker import EmbeddedBroker
from taoflow.settings import Settings
from taoflow.spool import Record, Spool
from tests.conftest import free_port, read_topic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _offline(make_settings: Callable[..., Settings]) -> Settings:
    """Settings whose Kafka is a closed port: every event goes to the spool."""
    return make_settings(f"127.0.0.1:{free_port()}", sdk={"reconnect_backoff_s": 0.1})


def _emit(em: Emitter, i: int) -> None:
    em.emit_interaction(task_type="qa", operator="o", prompt=f"secret prompt {i}", response="r", event_id=f"ev-{i:04d}")


def _wait(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _ids(records: list[Record]) -> list[str]:
    return [json.loads(r.value)["event_id"] for r in records]


def _spooled_ids(directory: Path) -> list[str]:
    spool = Spool(directory, max_bytes=1 << 24)
    try:
        head = spool.head()
        return [] if head is None else _ids(head[1])
    finally:
        spool.close()


@pytest.fixture
def umask0() -> Iterator[None]:
    """The most permissive umask: the spool must not rely on the process's umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_spool_dir_is_0700_and_files_0600_even_with_umask_0(
    umask0: None, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    directory = tmp_path / "agent" / "spool"
    em = Emitter(_offline(make_settings), spool_dir=directory)
    for i in range(3):
        _emit(em, i)
    em.close(timeout=0.5)
    assert em.stats().spooled == 3
    assert _mode(directory) == 0o700
    files = [p for p in directory.iterdir() if p.is_file()]
    assert any(p.suffix == ".spool" for p in files) and any(p.name == "LOCK" for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    spool = Spool(directory, max_bytes=1 << 20)
    head = spool.head()
    assert head is not None
    spool.ack(head[0], 1)  # progress file
    spool.close()
    ack = next(directory.glob("*.ack"))
    assert _mode(ack) == 0o600


def test_spool_left_world_readable_by_an_older_version_is_made_private_on_open(umask0: None, tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=1 << 20)
    spool.append([Record("t", b"k", b"prompt")])
    spool.close()
    os.chmod(directory, 0o755)
    for p in directory.iterdir():
        os.chmod(p, 0o644)
    Spool(directory, max_bytes=1 << 20).close()
    assert _mode(directory) == 0o700
    assert all(_mode(p) == 0o600 for p in directory.iterdir())


@pytest.mark.broker
def test_one_flipped_byte_mid_segment_loses_only_that_record_and_it_is_counted(
    fresh_broker: EmbeddedBroker,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "spool"
    em = Emitter(_offline(make_settings), spool_dir=directory)
    for i in range(5):
        _emit(em, i)
    em.close(timeout=0.5)
    (seg,) = directory.glob("*.spool")
    data = bytearray(seg.read_bytes())
    at = data.index(b"secret prompt 2")
    data[at + 3] ^= 0x01  # bit rot inside the third record
    seg.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING):
        em = Emitter(make_settings(fresh_broker.bootstrap), spool_dir=directory)
        assert em.flush(timeout=30)
        stats = em.stats()
        em.close()
    assert stats.dropped == 1 and stats.delivered == 4
    records = read_topic(fresh_broker.bootstrap, INTERACTIONS, 4)
    assert sorted(r.key.decode() for r in records) == ["ev-0000", "ev-0001", "ev-0003", "ev-0004"]
    assert "damaged" in caplog.text and "dropped 1 events" in caplog.text
    corrupt = next(directory.glob("*.spool.corrupt"))  # the damaged bytes are kept for inspection, privately
    assert b"ev-0002" in corrupt.read_bytes() and _mode(corrupt) == 0o600


def test_a_damaged_length_field_resyncs_on_the_next_marker(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    recs = [Record("t", f"k{i}".encode(), f"value {i}".encode() * 20) for i in range(4)]
    spool.append(recs)
    spool.close()
    (seg,) = (tmp_path / "s").glob("*.spool")
    data = bytearray(seg.read_bytes())
    second = len(recs[0].encode())
    data[second + 6] ^= 0xFF  # the length of record 2 now points far past the end of the file
    seg.write_bytes(bytes(data))
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    head = spool.head()
    assert head is not None and head[1] == [recs[0], recs[2], recs[3]]
    assert spool.take_lost() == 1 and len(spool) == 3
    spool.close()


def _legacy(rec: Record) -> bytes:
    """A record as the spool wrote it before the sync marker (u32 length | u32 crc32(payload) | payload)."""
    payload = rec.encode()[12:]
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def test_segments_of_the_earlier_format_are_still_read_and_a_bad_record_in_them_is_stepped_over(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "s"
    directory.mkdir()
    recs = [Record("t", None, f"old {i}".encode()) for i in range(3)]
    clean = b"".join(_legacy(r) for r in recs)
    (directory / f"{1:020d}.spool").write_bytes(clean)
    damaged = bytearray(clean)
    damaged[len(_legacy(recs[0])) + 12] ^= 0x01  # inside the second record's payload; its length is intact
    (directory / f"{2:020d}.spool").write_bytes(bytes(damaged))
    spool = Spool(directory, max_bytes=1 << 20)
    assert len(spool) == 5 and spool.take_lost() == 1
    head = spool.head()
    assert head is not None and head[1] == recs
    spool.ack(head[0], 3)
    head = spool.head()
    assert head is not None and head[1] == [recs[0], recs[2]]
    spool.close()


def test_full_disk_counts_the_batch_as_dropped_and_the_spool_stays_readable_and_working(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "spool"
    em = Emitter(_offline(make_settings), spool_dir=directory)
    for i in range(10):
        _emit(em, i)
    _wait(lambda: em.stats().spooled == 10, "10 spooled")
    (seg,) = directory.glob("*.spool")
    size_before = seg.stat().st_size

    real_write = os.write
    disk = {"full": True, "wrote_half": False}

    def write(fd: int, data: bytes) -> int:
        if disk["full"] and os.readlink(f"/proc/self/fd/{fd}").endswith(".spool"):
            if disk["wrote_half"]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            disk["wrote_half"] = True  # a short write, as on a disk that fills up mid-batch
            return real_write(fd, bytes(data)[: len(data) // 2])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with caplog.at_level(logging.WARNING):
        for i in range(10, 15):
            _emit(em, i)
        _wait(lambda: em.stats().dropped == 5, "the failed batch counted as dropped")
    assert disk["wrote_half"]
    assert "No space left on device" in caplog.text
    assert seg.stat().st_size == size_before  # the torn half-batch was cut back out

    disk["full"] = False  # space is back: the emitter keeps working
    for i in range(15, 22):
        _emit(em, i)
    _wait(lambda: em.stats().spooled == 17, "later events spooled")
    em.close(timeout=0.5)
    stats = em.stats()
    assert stats.dropped == 5 and stats.spooled == 17 and stats.emitted == 22

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ids = _spooled_ids(directory)
    assert ids == [f"ev-{i:04d}" for i in [*range(10), *range(15, 22)]]
    assert not caplog.text and not list(directory.glob("*.corrupt"))  # nothing torn, nothing damaged
