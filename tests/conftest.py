"""Shared fixtures: a real embedded broker, settings factories, Kafka read-back helpers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taoflow.broker import EmbeddedBroker
from taoflow.settings import Settings

SCREENSHOTS: list[Path] = []  # pages tests rendered in headless chromium, listed at the end of the run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The screenshots the browser tests took, in the run's output whether they passed or not."""
    if SCREENSHOTS:
        terminalreporter.section("screenshots")
        for shot in SCREENSHOTS:
            terminalreporter.write_line(f"{shot} ({shot.stat().st_size if shot.exists() else 0} bytes)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's TAOFLOW_* variables or taoflow.toml (TAOFLOW_TEST_* steer the harness)."""
    import os

    for key in list(os.environ):
        if key.startswith("TAOFLOW_") and not key.startswith("TAOFLOW_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One real embedded broker (Tansu) for the session, on a free loopback port, topics created."""
    b = EmbeddedBroker(Settings(overrides={"broker": {"port": free_port(), "partitions": 4}}))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def fresh_broker() -> Iterator[EmbeddedBroker]:
    """A broker of its own, so the topics hold exactly what this test produced."""
    b = EmbeddedBroker(Settings(overrides={"broker": {"port": free_port(), "partitions": 4}}))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model given a short supervised warm-up on small sums: weak, not random (built once per session)."""
    from learners.tasks import make_warm_model

    return make_warm_model(tmp_path_factory.mktemp("models") / "warm", steps=200, examples=60)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings factory: data under tmp_path; pass `bootstrap=` and per-component overrides."""

    def factory(bootstrap: str | None = None, **overrides: dict[str, Any]) -> Settings:
        merged: dict[str, dict[str, Any]] = {"core": {"data_dir": tmp_path / "data"}}
        if bootstrap:
            merged["kafka"] = {"bootstrap": bootstrap}
        for section, values in overrides.items():
            merged.setdefault(section, {}).update(values)
        return Settings(overrides=merged)

    return factory


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list[Any]:
    """Every record of `topic` from the beginning (no consumer group), stopping once `expected` arrived."""
    from aiokafka import AIOKafkaConsumer

    from taoflow.broker import assign_from_start

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            await assign_from_start(consumer, [topic])
            out: list[Any] = []
            deadline = asyncio.get_running_loop().time() + timeout
            while len(out) < expected and asyncio.get_running_loop().time() < deadline:
                batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for recs in batch.values():
                    out.extend(recs)
            # a short extra read catches anything delivered twice
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                out.extend(recs)
            return out
        finally:
            await consumer.stop()

    return asyncio.run(run())
