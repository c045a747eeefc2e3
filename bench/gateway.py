"""Gateway overhead, in the same run, alternating request by request.

Default: the same chat request through the gateway over HTTP vs the CPU backend called directly. The gateway
side includes everything a client pays for: HTTP, auth, JSON parsing and validation, routing by utility,
operator shaping, the capture into an InteractionEvent (SDK, embedded broker) and the response. The direct side
hands the same GenRequest to the same backend object on the gateway's event loop.

`--upstream`: the `openai` backend in front of an OpenAI-compatible upstream (a small server in its own process
that answers a tool-using chat request with a tool call at once): the same request posted to the upstream
directly vs through the gateway, which relays it whole, adds its routing fields and captures the interaction
(tools, tool calls, finish reason) to the embedded broker.

    python bench/gateway.py [--requests 300] [--max-tokens 4] [--upstream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from learners.tasks import make_warm_model  # noqa: E402
from serving.backends import GenRequest, TransformersBackend  # noqa: E402
from serving.gateway import Gateway, build_app  # noqa: E402
from taoflow.broker import EmbeddedBroker  # noqa: E402
from taoflow.settings import Settings  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Find an order",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
        },
    }
]
REPLY = json.dumps({
    "id": "chatcmpl-up", "object": "chat.completion", "created": 0, "model": "up-model",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "lookup", "arguments": "{\"id\": \"7\"}"}}],
    }}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
}).encode()  # fmt: skip


def serve_upstream(port: int) -> None:
    """The OpenAI-compatible upstream: every chat request answered at once with the same tool call."""
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Upstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as an inference server

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._send(json.dumps({"object": "list", "data": [{"id": "up-model", "object": "model"}]}).encode())

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(REPLY)

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn and vLLM do

        def _send(self, data: bytes) -> None:
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            self.wfile.write(head.encode() + data)  # one write: headers and body in one segment

    ThreadingHTTPServer(("127.0.0.1", port), Upstream).serve_forever()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_gateway(port: int, upstream: str, bootstrap: str, data_dir: str) -> None:
    """The gateway with the `openai` backend in front of `upstream`, capturing to the broker at `bootstrap`."""
    import uvicorn

    from serving.backends import build_backend

    settings = Settings(overrides={
        "core": {"data_dir": data_dir},
        "kafka": {"bootstrap": bootstrap},
        "serve": {"backend": "openai", "upstream_url": upstream, "upstream_model": "up-model",
                  "upstream_api_key": "sk-upstream", "api_keys": ["sk-bench"], "max_tokens": 64,
                  "operators": {"default": [{"name": "a"}, {"name": "b", "system_prompt": "Be brief."}]}},
    })  # fmt: skip
    from serving.server import tune_interpreter

    tune_interpreter()  # as `taoflow serve` does
    gateway = Gateway(settings, build_backend(settings))
    uvicorn.run(build_app(gateway), host="127.0.0.1", port=port, log_level="warning")


def _wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up within {timeout:.0f} s")


def upstream_main(requests: int) -> None:
    """Client (this process), gateway and upstream each in their own process, as deployed."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="taoflow-bench-gw-") as tmp:
        up_port, port = _port(), _port()
        url = f"http://127.0.0.1:{up_port}/v1"
        broker = EmbeddedBroker(Settings(overrides={"broker": {"port": _port()}})).start()
        procs = [subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port)])]
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve-gateway", str(port), url, broker.bootstrap,
                                       str(Path(tmp) / "data")]))  # fmt: skip
        msg = [{"role": "user", "content": "Where is order 7?"}]
        body = {"model": "taoflow", "messages": msg, "max_tokens": 64, "tools": TOOLS, "tool_choice": "auto",
                "metadata": {"operator": "a"}}  # fmt: skip
        upstream_body = {**{k: v for k, v in body.items() if k != "metadata"}, "model": "up-model"}
        direct_client = httpx.Client(base_url=url, headers={"Authorization": "Bearer sk-upstream"})
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": "Bearer sk-bench"})
        direct, via = [], []
        try:
            _wait_http(f"{url}/models")
            _wait_http(f"http://127.0.0.1:{port}/healthz")
            for i in range(requests + 50):  # the first 50 of each warm up (connections, the broker's first batches)
                t0 = time.perf_counter()
                r = direct_client.post("/chat/completions", json=upstream_body)
                d = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                t0 = time.perf_counter()
                r = client.post("/chat/completions", json=body)
                g = time.perf_counter() - t0
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"], r.text
                if i >= 50:
                    direct.append(d * 1000)
                    via.append(g * 1000)
        finally:
            client.close()
            direct_client.close()
            for p in procs:
                p.terminate()
                p.wait(10)
            broker.stop()
    report(direct, via, f"requests: {requests} each side, a tool-using chat request; client, gateway and upstream "
           "in their own processes", "direct upstream")  # fmt: skip


def report(direct: list[float], via: list[float], title: str, name: str = "direct backend") -> None:
    d50, d99, g50, g99 = pct(direct, 0.5), pct(direct, 0.99), pct(via, 0.5), pct(via, 0.99)
    added = sorted(g - d for g, d in zip(via, direct, strict=True))
    print(title)
    print(f"{name}: p50 {d50:.2f} ms, p99 {d99:.2f} ms, mean {statistics.mean(direct):.2f} ms")
    print(f"via gateway:    p50 {g50:.2f} ms, p99 {g99:.2f} ms, mean {statistics.mean(via):.2f} ms")
    print(f"added: p50 {g50 - d50:.2f} ms, p99 {g99 - d99:.2f} ms (per pair: p50 {pct(added, 0.5):.2f}, "
          f"p99 {pct(added, 0.99):.2f}); ratio p50 {g50 / d50:.2f}x")  # fmt: skip


def main() -> None:
    import socket

    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--upstream", action="store_true", help="the openai backend in front of an upstream")
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-gateway", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    if args.serve_gateway:
        port, upstream, bootstrap, data_dir = args.serve_gateway
        serve_gateway(int(port), upstream, bootstrap, data_dir)
        return
    if args.upstream:
        upstream_main(args.requests)
        return
    with tempfile.TemporaryDirectory(prefix="taoflow-bench-gw-") as tmp:
        root = Path(tmp)
        base = make_warm_model(root / "warm", steps=50, examples=20)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            broker_port = s.getsockname()[1]
        broker = EmbeddedBroker(Settings(overrides={"broker": {"port": broker_port}})).start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = Settings(overrides={
            "core": {"data_dir": root / "data", "base_model": str(base)},
            "kafka": {"bootstrap": broker.bootstrap},
            "serve": {"api_keys": ["sk-bench"], "max_tokens": args.max_tokens,
                      "operators": {"default": [{"name": "a"}, {"name": "b", "system_prompt": "Be brief."}]}},
        })  # fmt: skip
        backend = TransformersBackend(str(base), "cpu")
        gateway = Gateway(settings, backend)
        server = uvicorn.Server(uvicorn.Config(build_app(gateway), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        msg = [{"role": "user", "content": "Order 7: What is 3 + 4?"}]
        body = {"model": "taoflow", "messages": msg, "max_tokens": args.max_tokens, "temperature": 0,
                "metadata": {"operator": "a"}}  # fmt: skip
        req = GenRequest(messages=msg, max_tokens=args.max_tokens, temperature=0)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": "Bearer sk-bench"})
        direct, via = [], []
        for i in range(args.requests + 20):  # the first 20 of each warm up
            t0 = time.perf_counter()
            asyncio.run_coroutine_threadsafe(backend.generate(req), gateway.loop).result()  # type: ignore[arg-type]
            d = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = client.post("/chat/completions", json=body)
            g = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            if i >= 20:
                direct.append(d * 1000)
                via.append(g * 1000)
        client.close()
        server.should_exit = True
        thread.join(30)
        broker.stop()
    report(direct, via, f"requests: {args.requests} each side, max_tokens {args.max_tokens}, alternating")


if __name__ == "__main__":
    main()
