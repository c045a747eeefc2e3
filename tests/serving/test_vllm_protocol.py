"""The vLLM backend's protocol (runtime LoRA loading, generation by adapter name, streaming) against a small
fake vLLM server that records every call: vLLM itself only runs on a GPU."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pytest
from kafka import KafkaProducer

from schemas import AdapterEvent, UtilityEvent
from serving.backends import VllmBackend
from serving.upstream import UpstreamError
from taoflow.broker import EmbeddedBroker
from taoflow.exceptions import ConfigError
from taoflow.settings import Settings
from tests.conftest import free_port, read_topic
from tests.serving.harness import running_gateway, write_manifest


class FakeVllm(BaseHTTPRequestHandler):
    """Speaks the parts of vLLM's OpenAI server the gateway uses, keeping its adapters as vLLM does (by name,
    with their path) and refusing as vLLM 0.11 does, in its words; answers "<model>: ok"."""

    base = "base-model"
    calls: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []
    loras: ClassVar[dict[str, str]] = {}  # name -> path, like vLLM's lora_requests
    legacy_errors: ClassVar[bool] = False  # vLLM before 0.10: the error object at the top level

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: Any, ctype: str | None = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        info = {"message": message, "type": kind, "param": None, "code": status}
        self._send(status, {"object": "error", **info} if self.legacy_errors else {"error": info})

    def do_GET(self) -> None:
        type(self).calls.append(("GET", self.path, {}))
        base = {"id": self.base, "object": "model", "root": f"/models/{self.base}", "parent": None}
        cards = [{"id": n, "object": "model", "root": p, "parent": self.base} for n, p in self.loras.items()]
        self._send(200, {"object": "list", "data": [base, *cards]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(("POST", self.path, body))
        if self.path == "/v1/load_lora_adapter":
            name, path = body.get("lora_name"), body.get("lora_path")
            if name in self.loras:
                return self._error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            if not Path(path, "adapter_config.json").exists():
                return self._error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
            self.loras[name] = path
            return self._send(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), None)
        if self.path == "/v1/unload_lora_adapter":
            name = body.get("lora_name")
            if name not in self.loras:
                return self._error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.loras[name]
            return self._send(200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), None)
        model = body["model"]
        if model != self.base and model not in self.loras:
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
        text = f"{model}: ok"
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if body.get("stream"):
            chunks = [{"choices": [{"index": 0, "delta": {"content": part}}]} for part in (model, ": ok")]
            data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
            return self._send(200, data, "text/event-stream")
        if self.path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
        self._send(200, {"choices": [choice], "usage": usage})


@pytest.fixture
def fake_vllm() -> Iterator[str]:
    FakeVllm.calls, FakeVllm.loras, FakeVllm.legacy_errors = [], {}, False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def loads(name: str) -> list[dict[str, Any]]:
    """The load requests the fake received for `name`."""
    return [b for m, p, b in FakeVllm.calls if p == "/v1/load_lora_adapter" and b["lora_name"] == name]


def make_adapter(root: Path, name: str) -> Path:
    path = root / "data" / "adapters" / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "name": name}))
    write_manifest(path)
    return path


@pytest.mark.broker
def test_gateway_drives_vllm_runtime_lora_loading_generation_and_unloading(
    fake_vllm: str, fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    adapter = make_adapter(tmp_path, "ad-v")
    settings = Settings(overrides={
        "core": {"data_dir": tmp_path / "data", "base_model": "base-model"},
        "kafka": {"bootstrap": fresh_broker.bootstrap},
        "serve": {"backend": "vllm", "vllm_url": fake_vllm, "promote_after": 3, "canary_fraction": 0.5},
    })  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap)
    backend = VllmBackend("base-model", fake_vllm)
    with running_gateway(settings, backend) as (url, gw):
        client = openai.OpenAI(base_url=url, api_key="none")
        msg = [{"role": "user", "content": "hi"}]
        assert client.chat.completions.create(model="taoflow", messages=msg).choices[0].message.content == (
            "base-model: ok"
        )

        ev = AdapterEvent(adapter="ad-v", action="published", base_model="base-model", path=str(adapter))
        producer.send("taoflow.adapters", key=ev.key(), value=ev.to_json_bytes())
        producer.flush()
        _wait(lambda: gw.router.canary == "ad-v")
        assert ("POST", "/v1/load_lora_adapter", {"lora_name": "ad-v", "lora_path": str(adapter)}) in FakeVllm.calls

        # an adapter is asked for by name, streaming included
        assert client.chat.completions.create(model="ad-v", messages=msg).choices[0].message.content == "ad-v: ok"
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="ad-v", messages=msg, stream=True) if c.choices)  # fmt: skip
        assert streamed == "ad-v: ok"
        assert client.completions.create(model="ad-v", prompt="x").choices[0].text == "ad-v: ok"
        sent = [b["model"] for m, p, b in FakeVllm.calls if p.endswith("completions")]
        assert sent[-3:] == ["ad-v", "ad-v", "ad-v"]

        # the canary does worse (the stream's utility updates carry each reward): rolled back, unloaded from vLLM
        for n in range(1, 6):
            for op, r in (("default@base", 1.0), ("default@ad-v", 0.0)):
                ue = UtilityEvent(task_type="default", operator=op, utility=r, n=n, last_reward=r)
                producer.send("taoflow.utilities", key=f"default/{op}".encode(), value=ue.to_json_bytes())
        producer.flush()
        _wait(lambda: ("POST", "/v1/unload_lora_adapter", {"lora_name": "ad-v"}) in FakeVllm.calls)
        assert gw.router.canary is None and "ad-v" not in backend.adapters
        r = httpx.post(f"{url}/chat/completions", json={"model": "ad-v", "messages": msg})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    producer.close()


def _wait(pred: Any, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def spread_broker() -> Iterator[EmbeddedBroker]:
    """A broker of its own whose `taoflow.adapters` has 4 partitions (as a deployment made before it had one), so
    the events of the two adapters below sit on different partitions, the canary's on a lower one than the
    incumbent's: a partition-by-partition replay would apply the canary's publication before the incumbent's
    publication and promotion. The gateway replays them in the order they happened."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.partitioner.default import murmur2

    from taoflow.broker import ensure_topics

    settings = Settings(overrides={"broker": {"port": free_port(), "partitions": 4}})
    b = EmbeddedBroker(settings)
    b.start(create_topics=False)
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
    admin.create_topics([NewTopic("taoflow.adapters", 4, 1)])
    admin.close()
    ensure_topics(Settings(overrides={"kafka": {"bootstrap": b.bootstrap}, "broker": {"partitions": 4}}))
    part = {k: (murmur2(k.encode()) & 0x7FFFFFFF) % 4 for k in ("ad-inc", "ad-can")}
    assert part["ad-can"] < part["ad-inc"], part
    yield b
    b.stop()


@pytest.mark.broker
def test_a_restarted_gateway_adopts_the_adapters_vllm_still_has_and_unloads_only_its_own(
    fake_vllm: str, spread_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    fresh_broker = spread_broker
    paths = {name: str(make_adapter(tmp_path, name)) for name in ("ad-inc", "ad-can")}
    FakeVllm.loras["static-lora"] = "/elsewhere/static-lora"  # vLLM started with --lora-modules: not the gateway's
    settings = Settings(overrides={
        "core": {"data_dir": tmp_path / "data", "base_model": "base-model"},
        "kafka": {"bootstrap": fresh_broker.bootstrap},
        "serve": {"backend": "vllm", "vllm_url": fake_vllm, "promote_after": 3, "canary_fraction": 0.5},
    })  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap)

    def send(action: str, name: str) -> None:
        ev = AdapterEvent(adapter=name, action=action, base_model="base-model", path=paths[name])  # type: ignore[arg-type]
        producer.send("taoflow.adapters", key=ev.key(), value=ev.to_json_bytes())
        producer.flush()

    with running_gateway(settings, VllmBackend("base-model", fake_vllm)) as (_, gw):
        send("published", "ad-inc")
        _wait(lambda: gw.router.canary == "ad-inc")
        send("promoted", "ad-inc")  # another replica's decision
        _wait(lambda: gw.router.incumbent == "ad-inc")
        send("published", "ad-can")
        _wait(lambda: gw.router.canary == "ad-can")
    assert FakeVllm.loras == {"static-lora": "/elsewhere/static-lora", **paths}  # stopping unloads nothing

    # the gateway restarts against the running server: it replays the events and finds both adapters resident
    seen = len(FakeVllm.calls)
    backend = VllmBackend("base-model", fake_vllm)
    with running_gateway(settings, backend) as (url, gw2):
        assert (gw2.router.incumbent, gw2.router.canary) == ("ad-inc", "ad-can")
        assert backend.adapters == paths  # adopted; the static adapter is not the gateway's to serve
        assert not [c for c in FakeVllm.calls[seen:] if c[1].endswith("_lora_adapter")]
        client = openai.OpenAI(base_url=url, api_key="none")
        msg = [{"role": "user", "content": "hi"}]
        for name in paths:
            assert client.chat.completions.create(model=name, messages=msg).choices[0].message.content == f"{name}: ok"
        assert "static-lora" not in {m.id for m in client.models.list()}

        # the canary does worse: rolled back and unloaded from vLLM, though this process adopted rather than loaded it
        for n in range(1, 6):
            for op, r in (("default@ad-inc", 1.0), ("default@ad-can", 0.0)):
                ue = UtilityEvent(task_type="default", operator=op, utility=r, n=n, last_reward=r)
                producer.send("taoflow.utilities", key=f"default/{op}".encode(), value=ue.to_json_bytes())
        producer.flush()
        _wait(lambda: "ad-can" not in FakeVllm.loras and "ad-can" not in backend.adapters)
        assert (gw2.router.incumbent, gw2.router.canary) == ("ad-inc", None)
    assert FakeVllm.loras == {"static-lora": "/elsewhere/static-lora", "ad-inc": paths["ad-inc"]}
    producer.close()

    # 3 sent here, 4 from the first gateway (loaded and canary, twice), 2 from the restarted one
    events = [
        AdapterEvent.model_validate_json(r.value) for r in read_topic(fresh_broker.bootstrap, "taoflow.adapters", 9)
    ]
    mine = [(e.action, e.adapter) for e in events if e.metadata.get("gateway") == gw2.lifecycle.instance]
    assert mine == [("rolled_back", "ad-can"), ("unloaded", "ad-can")]
    rolled = next(e for e in events if e.metadata.get("gateway") == gw2.lifecycle.instance)
    assert rolled.reason and "not loadable" not in rolled.reason  # the release test's decision, not a load failure


@pytest.mark.parametrize("legacy_errors", [False, True], ids=["vllm-0.10+", "vllm-0.8"])
def test_loading_is_idempotent_when_another_replica_loaded_the_adapter_first(
    fake_vllm: str, tmp_path: Path, legacy_errors: bool
) -> None:
    FakeVllm.legacy_errors = legacy_errors
    path = str(make_adapter(tmp_path, "ad-x"))
    other = str(make_adapter(tmp_path, "ad-y"))
    FakeVllm.loras["ad-y"] = "/stale/ad-y"  # the name holds weights from elsewhere

    async def run() -> None:
        a, b = VllmBackend("base-model", fake_vllm), VllmBackend("base-model", fake_vllm)
        await a.start()
        await b.start()  # both looked before either loaded anything
        await a.load_adapter("ad-x", path)
        await b.load_adapter("ad-x", path)  # vLLM answers 400 "already loaded": b looks again and adopts it
        assert b.adapters == {"ad-x": path} and FakeVllm.loras["ad-x"] == path and len(loads("ad-x")) == 2
        await a.unload_adapter("ad-x")
        await b.unload_adapter("ad-x")  # vLLM answers 404: another replica unloaded it, as good as done
        assert "ad-x" not in b.adapters and "ad-x" not in FakeVllm.loras

        await b.load_adapter("ad-y", other)  # replaced by the verified files, not adopted
        assert FakeVllm.loras["ad-y"] == other and b.adapters["ad-y"] == other
        # a real refusal still fails the load (the gateway rolls that adapter back)
        with pytest.raises(UpstreamError) as refused:
            await b.load_adapter("ad-z", str(tmp_path / "missing"))
        assert refused.value.status == 404 and "ad-z" not in b.adapters
        await a.close()
        await b.close()

        # the base model must be what the server serves, or every base request would fail
        wrong = VllmBackend("base-model", fake_vllm, served_model_name="qwen")
        with pytest.raises(ConfigError, match="TAOFLOW_SERVE_VLLM_SERVED_MODEL_NAME"):
            await wrong.start()
        await wrong.close()

    asyncio.run(run())
