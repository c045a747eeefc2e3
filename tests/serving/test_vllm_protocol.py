"""The vLLM backend's protocol (runtime LoRA loading, generation by adapter name, streaming) against a small
fake vLLM server that records every call: vLLM itself only runs on a GPU."""

from __future__ import annotations

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
from taoflow.broker import EmbeddedBroker
from taoflow.settings import Settings
from tests.serving.harness import running_gateway, write_manifest

pytestmark = [pytest.mark.broker]


class FakeVllm(BaseHTTPRequestHandler):
    """Speaks the parts of vLLM's OpenAI server the gateway uses; answers "<model>: ok"."""

    calls: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []
    loras: ClassVar[set[str]] = set()

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: Any, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        type(self).calls.append(("GET", self.path, {}))
        self._send(200, {"object": "list", "data": [{"id": "base-model"}, *({"id": n} for n in self.loras)]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(("POST", self.path, body))
        if self.path == "/v1/load_lora_adapter":
            if not Path(body["lora_path"], "adapter_config.json").exists():
                return self._send(400, {"error": {"message": "no adapter there"}})
            self.loras.add(body["lora_name"])
            return self._send(200, b"Success: LoRA adapter loaded", "text/plain")
        if self.path == "/v1/unload_lora_adapter":
            self.loras.discard(body["lora_name"])
            return self._send(200, b"Success: LoRA adapter unloaded", "text/plain")
        model = body["model"]
        if model != "base-model" and model not in self.loras:
            return self._send(404, {"error": {"message": f"model {model} not found"}})
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
    FakeVllm.calls, FakeVllm.loras = [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_gateway_drives_vllm_runtime_lora_loading_generation_and_unloading(
    fake_vllm: str, fresh_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    adapter = tmp_path / "data" / "adapters" / "ad-v"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    write_manifest(adapter)
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
