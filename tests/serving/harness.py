"""Run the real gateway (uvicorn, real HTTP) in a background thread of the test process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from serving.backends import Backend
from serving.gateway import Gateway, build_app
from taoflow.settings import Settings
from tests.conftest import free_port


@contextmanager
def running_gateway(settings: Settings, backend: Backend, **kw: Any) -> Iterator[tuple[str, Gateway]]:
    """(base URL ending in /v1, the Gateway) while a uvicorn server serves it on a free loopback port."""
    import uvicorn

    port = free_port()
    gateway = Gateway(settings, backend, **kw)
    server = uvicorn.Server(uvicorn.Config(build_app(gateway), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive(), "the gateway failed to start"
        assert time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", gateway
    finally:
        server.should_exit = True
        thread.join(60)


def noise_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter of random, large weights: its greedy answers differ from the base model's, so a
    response shows which weights produced it."""
    from peft import LoraConfig, get_peft_model

    from learners.generation import load_policy

    model, _ = load_policy(str(base), None, device="cpu", dtype=None, trainable=True)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft.save_pretrained(out)
    write_manifest(Path(out))
    return out


def write_manifest(adapter: Path) -> None:
    """The manifest the learner's publish step writes: the gateway loads only adapters whose files match it."""
    import json

    from learners.lineage import digest_tree

    sha, per_file = digest_tree(adapter)
    (adapter / "manifest.json").write_text(json.dumps({"adapter": adapter.name, "sha256": sha, "files": per_file}))


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)
