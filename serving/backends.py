"""Model backends under the gateway: transformers + PEFT (CPU or GPU, several adapters at once), any
OpenAI-compatible upstream, and vLLM (an upstream with runtime LoRA loading).

Both take a `GenRequest` naming the adapter to use (None: the base model) and hold adapters by name.
An adapter in use is never unloaded under a request: callers `acquire` it for the request's lifetime and
`unload_adapter` waits until the last user releases it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from learners.generation import load_policy, render, resolve_device, resolve_dtype
from learners.models import check_model, default_base_model
from serving.exceptions import BackendDown, BadRequest
from serving.upstream import Tally, Upstream, UpstreamError, reply_text
from taoflow.exceptions import ConfigError
from taoflow.lora import VLLM_LORA_RANKS, vllm_lora_rank

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    """One generation: chat `messages` or a plain `prompt`, sampling parameters, and the adapter to use."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    adapter: str | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    served: str | None = None  # set by the backend: the adapter the generation actually ran with
    prompt_tokens: int = 0  # set by the backend when it streams
    finish_reason: str | None = None  # set by the backend when it streams: "length" or "stop"


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    tool_calls: list[dict[str, Any]] | None = None  # an upstream's tool calls (its first choice's)


class _Refs:
    """Requests using each adapter; unloading waits for zero."""

    def __init__(self) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.cond: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self.cond is None:
            self.cond = asyncio.Condition()
        return self.cond

    def acquire(self, name: str | None) -> None:
        if name is not None:
            self.count[name] += 1

    async def release(self, name: str | None) -> None:
        if name is None:
            return
        self.count[name] -= 1
        async with self._cond():
            self._cond().notify_all()

    async def idle(self, name: str, timeout: float = 120.0) -> None:
        async with self._cond():
            await asyncio.wait_for(self._cond().wait_for(lambda: self.count[name] <= 0), timeout)


class Backend:
    """What the gateway needs from a model server."""

    name = "backend"
    base_model = ""
    upstream = False  # True: an OpenAI-compatible server the gateway relays client bodies to whole

    def __init__(self) -> None:
        self.refs = _Refs()
        self.adapters: dict[str, str] = {}  # name -> path

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def health(self) -> bool:
        return True

    def acquire(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise BadRequest(f"adapter {adapter!r} is not loaded", status=404, code="model_not_found")
        self.refs.acquire(adapter)

    async def release(self, adapter: str | None) -> None:
        await self.refs.release(adapter)

    async def generate(self, req: GenRequest) -> Generation:
        raise NotImplementedError

    def stream(self, req: GenRequest) -> AsyncIterator[str]:
        raise NotImplementedError

    async def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    async def unload_adapter(self, name: str) -> None:
        raise NotImplementedError


class TransformersBackend(Backend):
    """A local model through transformers, adapters through PEFT; one generation at a time on one thread,
    and the adapter is switched inside that same job, so a request always runs on the adapter it was given."""

    name = "transformers"

    def __init__(self, base_model: str, device: str = "auto") -> None:
        super().__init__()
        self.base_model = base_model
        self.device_name = device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.model: Any = None
        self.tokenizer: Any = None
        self.peft = False
        self._probe: Any = None  # one LoRA layer, read to tell which adapter a forward pass uses

    async def start(self) -> None:
        device = resolve_device(self.device_name)
        loop = asyncio.get_running_loop()
        self.model, self.tokenizer = await loop.run_in_executor(
            self.pool, lambda: load_policy(self.base_model, None, device=device, dtype=resolve_dtype("auto", device))
        )

    async def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _render(self, req: GenRequest) -> str:
        if req.messages is not None:
            return render(req.messages, self.tokenizer)
        return req.prompt or ""

    def _use(self, adapter: str | None) -> Any:
        """Point the model at `adapter` (on the model thread); returns a context manager for the call."""
        import contextlib

        if adapter is None:
            return self.model.disable_adapter() if self.peft else contextlib.nullcontext()
        if adapter not in self.adapters:
            raise BadRequest(f"adapter {adapter!r} is not loaded", status=404, code="model_not_found")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _current(self) -> str | None:
        """The adapter the model computes with right now (read on the model thread, inside the call)."""
        if not self.peft:
            return None
        from peft.tuners.lora import LoraLayer

        # what a LoRA layer's forward() will use: its own flags, not the wrapper's bookkeeping
        if self._probe is None:
            self._probe = next(m for m in self.model.modules() if isinstance(m, LoraLayer))
        layer = self._probe
        if layer.disable_adapters or not layer.active_adapters:
            return None
        return str(layer.active_adapters[0])

    def _kwargs(self, req: GenRequest, enc: Any) -> dict[str, Any]:
        greedy = req.temperature <= 0
        return {
            **enc,
            "max_new_tokens": req.max_tokens,
            "do_sample": not greedy,
            "temperature": None if greedy else req.temperature,
            "top_p": None if greedy else req.top_p,
            "top_k": None,
            "pad_token_id": self.tokenizer.pad_token_id,
        }

    def _generate(self, req: GenRequest) -> Generation:
        import torch

        text = self._render(req)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        if req.seed is not None:
            torch.manual_seed(req.seed)
        with self._use(req.adapter), torch.no_grad():
            req.served = self._current()
            out = self.model.generate(**self._kwargs(req, enc))
        new = out[0, enc["input_ids"].shape[1] :]
        completion = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= req.max_tokens else "stop"
        completion, stopped = _apply_stop(completion, req.stop)
        return Generation(completion, int(enc["input_ids"].shape[1]), len(new), "stop" if stopped else finish)

    async def generate(self, req: GenRequest) -> Generation:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._generate, req)

    async def stream(self, req: GenRequest) -> AsyncIterator[str]:  # type: ignore[override]
        """Text pieces as they are generated (the model thread runs the whole generation)."""
        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                text = self._render(req)
                enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
                req.prompt_tokens = int(enc["input_ids"].shape[1])
                if req.seed is not None:
                    torch.manual_seed(req.seed)
                with self._use(req.adapter), torch.no_grad():
                    req.served = self._current()
                    out = self.model.generate(**self._kwargs(req, enc), streamer=streamer)
                new = int(out.shape[1]) - req.prompt_tokens
                req.finish_reason = "length" if new >= req.max_tokens else "stop"
            except BaseException as exc:  # surfaced to the async side below
                failure.append(exc)
                streamer.end()

        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.pool, run)
        it = iter(streamer)
        sent = ""
        stopped = False
        # only the tail can hold a stop string that this piece completes: the check stays O(piece) per piece
        reach = max((len(s) for s in req.stop), default=0)
        while True:
            piece = await asyncio.to_thread(next, it, None)
            if piece is None:
                break
            sent += piece
            _, stopped = _apply_stop(sent[-(len(piece) + reach) :], req.stop) if reach else ("", False)
            if stopped:
                break
            if piece:
                yield piece
        await job
        if failure:
            raise failure[0]
        if stopped:  # cut at a stop string: whatever the model went on to generate is not the reason
            req.finish_reason = "stop"

    def _load(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not self.peft:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.peft = True
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self._probe = None

    async def load_adapter(self, name: str, path: str) -> None:
        if name in self.adapters:
            return
        if not (Path(path) / "adapter_config.json").exists():
            raise BadRequest(f"no adapter at {path}", status=404, code="adapter_not_found")
        await asyncio.get_running_loop().run_in_executor(self.pool, self._load, name, path)
        self.adapters[name] = path
        log.info("adapter %s loaded from %s", name, path)

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            return
        await self.refs.idle(name)  # in-flight requests on it finish first
        del self.adapters[name]
        await asyncio.get_running_loop().run_in_executor(self.pool, self._delete, name)
        log.info("adapter %s unloaded", name)

    def _delete(self, name: str) -> None:
        if not self.adapters:  # the last one: back to the plain base model (PEFT needs an adapter to exist)
            self.model = self.model.unload()
            self.peft = False
            self._probe = None
            return
        if self.model.active_adapter == name:
            self.model.set_adapter(next(iter(self.adapters)))
        self.model.delete_adapter(name)


def _apply_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut at the first stop string.

    >>> _apply_stop("a. b. c", [". c"])
    ('a. b', True)
    """
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server by URL (vLLM, SGLang, Ollama, LiteLLM, a hosted API), with its own key.

    The gateway relays client bodies to it whole (`complete`, `open_stream`); `generate`/`stream` serve the
    gateway's own `GenRequest`s (benchmarks, tests). `model` is the upstream's name for the base model."""

    name = "openai"
    upstream = True

    def __init__(
        self,
        base_model: str,
        url: str | None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 120.0,
        port: int = 8100,
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.model = model or base_model
        self.url = (url or f"http://127.0.0.1:{port}/v1").rstrip("/")
        self.api = Upstream(self.url, api_key, timeout_s)

    async def start(self) -> None:
        await self.api.start()

    async def close(self) -> None:
        await self.api.close()

    async def health(self) -> bool:
        try:
            return bool((await self.api._http().get("/models")).status_code == 200)
        except httpx.HTTPError:
            return False

    def model_for(self, adapter: str | None) -> str:
        """The upstream's model name for a request served with `adapter` (None: the base model)."""
        return adapter or self.model

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a (non-streaming) body as it is; the upstream's reply, checked to be a completion."""
        data = await self.api.post(path, body)
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise UpstreamError(f"the upstream at {self.url} sent a reply without choices", status=502,
                                code="upstream_error")  # fmt: skip
        return data

    async def open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self.api.open_stream(path, body)

    def _body(self, req: GenRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model_for(req.adapter),
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if req.messages is not None:
            return "/chat/completions", {**body, "messages": req.messages}
        return "/completions", {**body, "prompt": req.prompt or ""}

    async def generate(self, req: GenRequest) -> Generation:
        path, body = self._body(req)
        data = await self.complete(path, body)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        req.served = req.adapter
        return Generation(
            reply_text(choice),
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
            choice.get("finish_reason") or "stop",
        )

    async def stream(self, req: GenRequest) -> AsyncIterator[str]:  # type: ignore[override]
        path, body = self._body(req)
        resp = await self.open_stream(path, {**body, "stream": True})
        tally = Tally()
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                before = len(tally.text)
                tally.add(orjson.loads(line[5:]))
                if len(tally.text) > before:
                    yield tally.text[before:]
        except httpx.HTTPError as exc:
            raise self.api.failure(exc) from None
        finally:
            await resp.aclose()
        req.served = req.adapter
        req.finish_reason = tally.finish or "stop"
        req.prompt_tokens = int(tally.usage.get("prompt_tokens", 0))

    async def load_adapter(self, name: str, path: str) -> None:
        raise BadRequest(
            f"adapter {name!r} cannot be loaded: the openai backend serves a fixed upstream model; use "
            "TAOFLOW_SERVE_BACKEND=vllm for runtime LoRA loading",
            status=422, code="adapter_refused",
        )  # fmt: skip

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)


class VllmBackend(OpenAIBackend):
    """A vLLM OpenAI-compatible server, attached by URL or launched here: the openai backend plus runtime LoRA
    loading (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`; needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=1).

    Loading is idempotent: an adapter the server already has from the same path (loaded before this gateway
    started, or by another replica) is adopted, not loaded again. Only adapters the gateway asks for are ever
    unloaded, and `close` unloads none, so a restarted gateway finds its canary and incumbent still resident."""

    name = "vllm"

    def __init__(
        self,
        base_model: str,
        url: str | None,
        *,
        launch: bool = False,
        port: int = 8100,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        served_model_name: str | None = None,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 64,
        start_timeout_s: float | None = None,
    ) -> None:
        super().__init__(base_model, url, api_key=api_key, model=served_model_name, timeout_s=timeout_s, port=port)
        self.api_key = api_key
        self.launch = launch
        self.port = port
        # checked here, so a bad combination fails when the gateway is built, not minutes into vLLM's start-up
        self.command = vllm_serve_command(
            base_model, port=port, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
            served_model_name=served_model_name,
        )  # fmt: skip
        # attached without a limit: one look (tests, a server that is up); the gateway's settings pass one
        self.start_timeout_s = (900.0 if launch else 0.0) if start_timeout_s is None else start_timeout_s
        self.served: dict[str, str] = {}  # LoRA adapters the server reports loaded: name -> path (its `root`)
        self.proc: Any = None

    async def start(self) -> None:
        await super().start()
        if self.launch:
            import os
            import subprocess

            env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
            if self.api_key:
                env["VLLM_API_KEY"] = self.api_key  # not --api-key: a command line is visible to every local user
            try:
                self.proc = subprocess.Popen(self.command, env=env)
            except FileNotFoundError:
                raise BackendDown("vLLM is not installed: pip install 'taoflow[gpu]'") from None
        if self.launch or self.start_timeout_s > 0:
            deadline = time.monotonic() + self.start_timeout_s
            while not await self.health():
                if self.proc is not None and self.proc.poll() is not None:
                    raise BackendDown(f"vLLM exited with status {self.proc.returncode} before it served {self.url}")
                if time.monotonic() > deadline:
                    raise BackendDown(
                        f"vLLM did not answer on {self.url} within {self.start_timeout_s:g} s; check the server "
                        "or raise TAOFLOW_SERVE_VLLM_START_TIMEOUT_S"
                    )
                await asyncio.sleep(0.5)
        try:
            await self._survey(check_base=True)
        except UpstreamError as exc:  # not up (attached, no wait): adapters are reconciled as they are loaded
            log.warning("could not list what the vLLM server at %s has loaded: %s", self.url, exc)

    async def close(self) -> None:
        await super().close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except Exception:
                self.proc.kill()

    async def _survey(self, *, check_base: bool = False) -> None:
        """Read `GET /v1/models`: vLLM lists each LoRA adapter as a model with a `parent` (the base model) and its
        path as `root`; the base model has no parent."""
        try:
            resp = await self.api._http().get("/models")
        except httpx.HTTPError as exc:
            raise self.api.failure(exc) from None
        if resp.status_code >= 400:
            raise self.api.refused(resp.status_code, resp.content)
        try:
            doc = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise UpstreamError(f"the upstream at {self.url} sent a model list without data", status=502,
                                code="upstream_error")  # fmt: skip
        cards = [c for c in doc["data"] if isinstance(c, dict)]
        self.served = {str(c["id"]): str(c.get("root")) for c in cards if c.get("parent") and c.get("id")}
        bases = [str(c.get("id")) for c in cards if not c.get("parent")]
        if check_base and self.model not in bases:
            raise ConfigError(
                f"the vLLM server at {self.url} serves {bases}, not {self.model!r}: set "
                "TAOFLOW_SERVE_VLLM_SERVED_MODEL_NAME to its --served-model-name (or TAOFLOW_BASE_MODEL to its model)"
            )
        if self.served:
            log.info("the vLLM server at %s has LoRA adapters loaded: %s", self.url, sorted(self.served))

    async def load_adapter(self, name: str, path: str) -> None:
        if name in self.adapters:
            return
        for attempt in range(2):
            have = self.served.get(name)
            if have == path:
                log.info("adapter %s is already loaded on the vLLM server from %s: adopted", name, path)
                break
            if have is not None:  # the name holds weights from elsewhere: replace them with the verified ones
                log.warning("vLLM serves adapter %s from %s, not %s: reloading it", name, have, path)
                await self._drop(name)
            try:
                await self.api.post("/load_lora_adapter", {"lora_name": name, "lora_path": path})
                break
            except UpstreamError as exc:
                if attempt or not _already_loaded(exc):
                    raise
                await self._survey()  # loaded since we looked (another replica): look again, then adopt or replace
        self.served[name] = path
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            return
        await self.refs.idle(name)
        await self._drop(name)
        del self.adapters[name]

    async def _drop(self, name: str) -> None:
        """Unload `name` from the server; one it no longer has (another replica unloaded it) is as good."""
        try:
            await self.api.post("/unload_lora_adapter", {"lora_name": name})
        except UpstreamError as exc:
            if exc.status != 404:
                raise
        self.served.pop(name, None)


def _already_loaded(exc: UpstreamError) -> bool:
    """vLLM's answer to loading a name it has: 400 "The lora adapter 'x' has already been loaded." (the message is
    in `error.message` since vLLM 0.10, at the top level before)."""
    return exc.status == 400 and "has already been loaded" in f"{exc.error.get('message')} {exc}"


def vllm_serve_command(
    base_model: str,
    *,
    port: int,
    max_loras: int,
    max_lora_rank: int,
    max_cpu_loras: int | None = None,
    served_model_name: str | None = None,
) -> list[str]:
    """The `vllm serve` command of a launched server (its key travels in VLLM_API_KEY, which vLLM reads as its
    --api-key, so it stays out of the process list).

    >>> vllm_serve_command("m", port=8100, max_loras=4, max_lora_rank=16)
    ['vllm', 'serve', 'm', '--port', '8100', '--enable-lora', '--max-loras', '4', '--max-lora-rank', '16']
    """
    if max_lora_rank not in VLLM_LORA_RANKS:
        raise ConfigError(f"vLLM accepts --max-lora-rank {list(VLLM_LORA_RANKS)}, not {max_lora_rank}")
    if max_cpu_loras is not None and max_cpu_loras < max_loras:
        raise ConfigError(
            f"TAOFLOW_SERVE_VLLM_MAX_CPU_LORAS ({max_cpu_loras}) must be at least TAOFLOW_SERVE_VLLM_MAX_LORAS "
            f"({max_loras}): vLLM refuses to start otherwise"
        )
    cmd = ["vllm", "serve", base_model, "--port", str(port), "--enable-lora", "--max-loras", str(max_loras),
           "--max-lora-rank", str(max_lora_rank)]  # fmt: skip
    if max_cpu_loras is not None:
        cmd += ["--max-cpu-loras", str(max_cpu_loras)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    return cmd


def build_backend(settings: Any) -> Backend:
    cfg = settings.serve
    if cfg.backend == "openai":
        if not cfg.upstream_url:
            raise ConfigError(
                "TAOFLOW_SERVE_BACKEND=openai needs TAOFLOW_SERVE_UPSTREAM_URL (e.g. http://host:8000/v1)"
            )
        # the upstream serves its own model: nothing is loaded (or built) here, the name is what is asked for
        model = cfg.upstream_model or settings.core.base_model
        if not model:
            raise ConfigError(
                "TAOFLOW_SERVE_BACKEND=openai needs TAOFLOW_SERVE_UPSTREAM_MODEL, the model name the upstream serves"
            )
        key = cfg.upstream_api_key.get_secret_value() if cfg.upstream_api_key else None
        return OpenAIBackend(model, cfg.upstream_url, api_key=key, model=model, timeout_s=cfg.upstream_timeout_s)
    base = default_base_model(settings)
    if cfg.backend == "vllm":
        key = cfg.vllm_api_key.get_secret_value() if cfg.vllm_api_key else None
        rank = cfg.vllm_max_lora_rank or vllm_lora_rank(settings.learner.lora_r)
        return VllmBackend(
            base, cfg.vllm_url, launch=cfg.vllm_launch, api_key=key, timeout_s=cfg.upstream_timeout_s,
            served_model_name=cfg.vllm_served_model_name, max_loras=cfg.vllm_max_loras,
            max_cpu_loras=cfg.vllm_max_cpu_loras, max_lora_rank=rank, start_timeout_s=cfg.vllm_start_timeout_s,
        )  # fmt: skip
    check_model(base)
    return TransformersBackend(base, cfg.device)
