"""The gateway's adapter feed refuses what the learner did not publish and keeps going (issue 13).

Records are fed to `AdapterLifecycle.on_record` (`serving.lifecycle`) as the Kafka feed would; adapters are real
directories with the learner's own manifest (`learners.lineage.digest_tree`); the backend records what it was asked
to load.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from learners.lineage import digest_tree
from schemas import AdapterEvent, UtilityEvent
from serving.adapters import verify_adapter
from serving.backends import Backend
from serving.exceptions import AdapterRefused
from serving.gateway import Gateway
from taoflow.settings import Settings


class LoadingBackend(Backend):
    """Records each load; `broken` names fail with a plain (non-ServingError) exception, as a loader bug would."""

    name = "recording"
    base_model = "base-model"

    def __init__(self, broken: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.loads: list[tuple[str, str]] = []
        self.broken = broken

    async def load_adapter(self, name: str, path: str) -> None:
        self.loads.append((name, path))
        if name in self.broken:
            raise RuntimeError(f"safetensors: header too large in {path}")
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)


class Producer:
    """Where the gateway's announcements go (the Kafka producer's one method it uses)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> None:
        self.sent.append(json.loads(value))


def publish_adapter(root: Path, name: str, payload: bytes = b"weights") -> Path:
    """An adapter directory as the learner's publish step leaves it: files plus manifest.json."""
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(payload)
    sha, per_file = digest_tree(d)
    (d / "manifest.json").write_text(json.dumps({"adapter": name, "sha256": sha, "files": per_file}))
    return d


def rec(event: AdapterEvent | UtilityEvent | bytes, offset: int = 0) -> SimpleNamespace:
    value = event if isinstance(event, bytes) else event.to_json_bytes()
    topic = "taoflow.utilities" if isinstance(event, UtilityEvent) else "taoflow.adapters"
    return SimpleNamespace(topic=topic, partition=0, offset=offset, value=value)


def published(name: str, **kw: Any) -> AdapterEvent:
    return AdapterEvent(adapter=name, action="published", base_model="base-model", **kw)


def gateway(tmp_path: Path, backend: LoadingBackend) -> tuple[Gateway, Producer]:
    settings = Settings(overrides={"core": {"data_dir": tmp_path / "data"}, "kafka": {"bootstrap": "127.0.0.1:9"}})
    gw = Gateway(settings, backend, kafka=False)
    gw.lifecycle.producer = Producer()
    return gw, gw.lifecycle.producer


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data" / "adapters"


def test_a_traversal_name_is_never_joined_onto_the_adapters_dir(tmp_path: Path, root: Path) -> None:
    backend = LoadingBackend()
    gw, _ = gateway(tmp_path, backend)
    outside = publish_adapter(tmp_path, "x")  # a valid-looking adapter two levels above adapters/
    root.mkdir(parents=True)
    raw = published("ok").to_json_bytes().replace(b'"ok"', b'"../../x"')
    asyncio.run(gw.lifecycle.on_record(rec(raw), live=True))
    assert backend.loads == [] and gw.router.canary is None, f"{outside} must not be loaded"


def test_the_events_path_is_ignored_the_adapter_loads_from_adapters_dir_by_name(tmp_path: Path, root: Path) -> None:
    backend = LoadingBackend()
    gw, producer = gateway(tmp_path, backend)
    elsewhere = publish_adapter(tmp_path / "attacker", "ad-1", payload=b"evil")
    mine = publish_adapter(root, "ad-1")
    asyncio.run(gw.lifecycle.on_record(rec(published("ad-1", path=str(elsewhere))), live=True))
    assert backend.loads == [("ad-1", str(mine.resolve()))]
    assert gw.router.canary == "ad-1"
    assert [e["action"] for e in producer.sent] == ["loaded", "canary"]


def test_corrupted_weights_fail_the_manifest_and_are_rolled_back(tmp_path: Path, root: Path) -> None:
    backend = LoadingBackend()
    gw, producer = gateway(tmp_path, backend)
    d = publish_adapter(root, "ad-2")
    (d / "adapter_model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    asyncio.run(gw.lifecycle.on_record(rec(published("ad-2")), live=True))
    assert backend.loads == [] and gw.router.canary is None
    assert producer.sent[-1]["action"] == "rolled_back" and "sha256" in producer.sent[-1]["reason"]


def test_manifest_checks_unlisted_files_event_hash_and_links(tmp_path: Path, root: Path) -> None:
    d = publish_adapter(root, "ad-3")
    sha = verify_adapter(d, "ad-3")
    assert verify_adapter(d, "ad-3", sha) == sha
    with pytest.raises(AdapterRefused, match="event"):
        verify_adapter(d, "ad-3", "0" * 64)  # the event's hash must match too
    (d / "adapter_model.bin").write_bytes(b"pickle")  # a file the loader would read, not in the manifest
    with pytest.raises(AdapterRefused, match=r"not in manifest\.json"):
        verify_adapter(d, "ad-3")
    (d / "adapter_model.bin").unlink()
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AdapterRefused, match="not a regular file"):
        verify_adapter(d, "ad-3")
    bare = root / "ad-4"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterRefused, match=r"no manifest\.json"):
        verify_adapter(bare, "ad-4")


def test_a_loader_crash_is_contained_and_the_feed_goes_on(tmp_path: Path, root: Path) -> None:
    backend = LoadingBackend(broken=("ad-5",))
    gw, producer = gateway(tmp_path, backend)
    publish_adapter(root, "ad-5")

    async def feed() -> None:
        await gw.lifecycle.on_record(rec(published("ad-5")), live=True)  # the loader raises RuntimeError
        await gw.lifecycle.on_record(rec(b"not json", 1), live=True)  # and a record that is not an event at all
        utility = UtilityEvent(task_type="t", operator="plain@base", utility=0.7, n=3)
        await gw.lifecycle.on_record(rec(utility, 2), live=True)

    asyncio.run(feed())
    assert gw.router.utilities[("t", "plain@base")] == (0.7, 3)  # the later utility still arrived
    assert gw.router.canary is None
    rolled = producer.sent[-1]
    assert rolled["action"] == "rolled_back" and rolled["adapter"] == "ad-5"
    assert "RuntimeError" in rolled["reason"] and "header too large" in rolled["reason"]


def test_after_replay_an_adapter_that_fails_to_load_is_not_routed_to(tmp_path: Path, root: Path) -> None:
    backend = LoadingBackend(broken=("ad-7",))
    gw, producer = gateway(tmp_path, backend)
    for name in ("ad-6", "ad-7"):
        publish_adapter(root, name)

    async def restart() -> None:
        gw.lifecycle.ready = asyncio.Event()
        for i, ev in enumerate([published("ad-6"), AdapterEvent(adapter="ad-6", action="promoted",
                                base_model="base-model"), published("ad-7"),
                                AdapterEvent(adapter="ad-7", action="promoted", base_model="base-model")]):  # fmt: skip
            await gw.lifecycle.on_record(rec(ev, i), live=False)
        assert gw.router.incumbent == "ad-7"
        await gw.lifecycle._catch_up_done()

    asyncio.run(restart())
    assert gw.router.incumbent == "ad-6" and "ad-6" in backend.adapters  # back to the last one that loads
    assert "ad-7" not in gw.router.history
    assert [(e["adapter"], e["action"]) for e in producer.sent] == [("ad-7", "rolled_back")]


def test_files_in_subfolders_are_verified_too(tmp_path: Path, root: Path) -> None:
    # a DPO round publishes its `ref/` adapter beside the weights; the manifest hashes it and so does the gateway
    d = root / "ad-ref"
    (d / "ref").mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    (d / "ref" / "adapter_model.safetensors").write_bytes(b"reference")
    sha, per_file = digest_tree(d)
    assert "ref/adapter_model.safetensors" in per_file
    (d / "manifest.json").write_text(json.dumps({"adapter": "ad-ref", "sha256": sha, "files": per_file}))
    backend = LoadingBackend()
    gw, _ = gateway(tmp_path, backend)
    asyncio.run(gw.lifecycle.on_record(rec(published("ad-ref", sha256=sha)), live=True))
    assert gw.router.canary == "ad-ref"
    # then the file in the subfolder changes, or an unlisted one appears there: refused
    for tamper in ("changed", "extra"):
        other = publish_adapter(root, f"ad-{tamper}")
        (other / "ref").mkdir()
        if tamper == "changed":
            (other / "ref" / "w.bin").write_bytes(b"a")
            sha, per_file = digest_tree(other)
            (other / "manifest.json").write_text(json.dumps({"adapter": other.name, "sha256": sha, "files": per_file}))
            (other / "ref" / "w.bin").write_bytes(b"b")
        else:
            (other / "ref" / "unlisted.bin").write_bytes(b"x")
        backend2 = LoadingBackend()
        gw2, producer2 = gateway(tmp_path, backend2)
        asyncio.run(gw2.lifecycle.on_record(rec(published(other.name)), live=True))
        assert backend2.loads == [] and producer2.sent[-1]["action"] == "rolled_back", tamper
