"""Gateway overhead: the same chat request through the gateway over HTTP vs the CPU backend called directly,
alternating, in the same run and process.

The gateway side includes everything a client pays for: HTTP, auth, JSON parsing and validation, routing
by utility, operator shaping, the capture into an InteractionEvent (SDK, embedded broker) and the
response. The direct side hands the same GenRequest to the same backend object on the gateway's event loop.

    python bench/gateway.py [--requests 300] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import asyncio
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


def main() -> None:
    import socket

    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
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
    d50, d99, g50, g99 = pct(direct, 0.5), pct(direct, 0.99), pct(via, 0.5), pct(via, 0.99)
    added = sorted(g - d for g, d in zip(via, direct, strict=True))
    print(f"requests: {args.requests} each side, max_tokens {args.max_tokens}, alternating")
    print(f"direct backend: p50 {d50:.2f} ms, p99 {d99:.2f} ms, mean {statistics.mean(direct):.2f} ms")
    print(f"via gateway:    p50 {g50:.2f} ms, p99 {g99:.2f} ms, mean {statistics.mean(via):.2f} ms")
    print(f"added: p50 {g50 - d50:.2f} ms, p99 {g99 - d99:.2f} ms (per pair: p50 {pct(added, 0.5):.2f}, "
          f"p99 {pct(added, 0.99):.2f}); ratio p50 {g50 / d50:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
