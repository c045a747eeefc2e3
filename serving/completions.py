"""The OpenAI completion endpoints: `/v1/chat/completions` (also streaming), `/v1/completions` and `/v1/models`.

A thin router over `Completions`, the handler that routes each request to an operator (`serving.router`, sticky
within a session), serves it on the local backend or relays it to an upstream whole, and hands the finished reply to
capture (as vLLM keeps a router per endpoint over a serving class)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from serving.auth import Principal
from serving.backends import Generation, GenRequest
from serving.exceptions import BadRequest, ServingError
from serving.http import read_body
from serving.protocol import (
    AGENT_HEADER,
    OPERATOR_HEADER,
    OTHER,
    TASK_HEADER,
    Call,
    ChatRequest,
    CompletionRequest,
    captured_message,
    check_label,
    message_text,
    refuse_unsupported_locally,
    session_of,
)
from serving.router import BASE, Operator
from serving.upstream import Tally, UpstreamError, reply_text

if TYPE_CHECKING:
    from serving.gateway import Gateway

log = logging.getLogger(__name__)


class Completions:
    """Chat and text completions for one gateway: route, serve or relay, capture."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def route(self, request: Request, req: Any, principal: Principal, chat: bool) -> Call:
        """The request's task type, operator (forced when the client chose the operator or the adapter itself;
        a session's first operator for its later steps) and session, as a Call."""
        meta = req.metadata or {}
        task_type = check_label(
            request.headers.get(TASK_HEADER) or str(meta.get("task_type") or "default"), "task type"
        )
        session_id, step = session_of(request, meta)
        forced_op = request.headers.get(OPERATOR_HEADER) or meta.get("operator")
        if forced_op is not None:
            forced_op = str(forced_op)
            target = forced_op.partition("@")[2]
            if target and target != BASE and target not in self.gw.backend.adapters:
                raise BadRequest(f"adapter {target[:80]!r} is not loaded", status=404, code="model_not_found")
        routed, adapter = self.gw.resolve_model(req.model)
        op = None
        if session_id is not None and forced_op is None and routed:
            op = self.sticky(principal, session_id, task_type)
        if op is None:
            op = self.gw.router.choose(task_type, operator=forced_op, adapter=None if routed else adapter)
        if session_id is not None:
            step = self.gw.sessions.record(principal.caller, session_id, task_type, op.name, step)
        label = task_type if task_type in self.gw.task_labels else OTHER
        self.gw.metrics.operator.labels(label, op.name).inc()
        agent = request.headers.get(AGENT_HEADER)
        if agent is not None:
            check_label(agent, "agent id")
        prompt = [captured_message(m) for m in req.messages] if chat else req.prompt
        return Call(iid=str(uuid.uuid4()), req=req, chat=chat, task_type=task_type, op=op,
                    forced=forced_op is not None or not routed, principal=principal, agent=agent, prompt=prompt,
                    session_id=session_id, step=step)  # fmt: skip

    def sticky(self, principal: Principal, session_id: str, task_type: str) -> Operator | None:
        """The operator of the session's earlier steps, while its strategy is configured and its adapter loaded."""
        known = self.gw.sessions.get(principal.caller, session_id)
        if known is None or known.task_type != task_type:
            return None
        target = known.operator.partition("@")[2]
        if target and target != BASE and target not in self.gw.backend.adapters:
            return None  # rolled back or unloaded since: the session is routed afresh
        try:
            return self.gw.router.choose(task_type, operator=known.operator)
        except BadRequest:
            return None  # its strategy is no longer configured

    async def serve(self, request: Request, req: Any, endpoint: str) -> Any:
        chat = endpoint == "chat"
        call = self.route(request, req, self.gw.principal(request), chat)
        op = call.op
        messages = (
            [
                {"role": m.role, "content": message_text(m.content), **({"name": m.name} if m.name else {})}
                for m in req.messages
            ]
            if chat
            else None
        )
        shaped = self.gw.apply_operator(op, messages, None if chat else req.prompt)
        bound = self.gw.cfg.max_tokens
        max_tokens = min(req.max_tokens or getattr(req, "max_completion_tokens", None) or bound, bound)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        gen_req = GenRequest(
            messages=shaped if chat else None,
            prompt=None if chat else shaped,
            adapter=op.adapter,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=stop,
            seed=req.seed,
        )
        created = int(time.time())
        extra: dict[str, Any] = {
            "interaction_id": call.iid,
            "taoflow": {"operator": op.name, "adapter": op.adapter, "task_type": call.task_type},
        }
        if call.session_id is not None:
            extra["taoflow"].update(session_id=call.session_id, step=call.step)
        if self.gw.backend.upstream:
            return await self.relay(self.relay_body(req, op, chat, max_tokens), call, extra)
        refuse_unsupported_locally(req)
        self.gw.backend.acquire(op.adapter)
        t0 = time.perf_counter()
        if req.stream:
            return StreamingResponse(self.stream(gen_req, call, created, extra, t0), media_type="text/event-stream",
                                     headers=call.headers())  # fmt: skip
        try:
            gen = await self.gw.backend.generate(gen_req)
        finally:
            await self.gw.backend.release(op.adapter)
        self.gw.capture(call, gen, (time.perf_counter() - t0) * 1000, stream=False, served=gen_req.served)
        usage = {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        }
        if chat:
            body = {
                "id": f"chatcmpl-{call.iid}",
                "object": "chat.completion",
                "created": created,
                "model": req.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": gen.text},
                        "finish_reason": gen.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
                **extra,
            }
        else:
            body = {
                "id": f"cmpl-{call.iid}",
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "choices": [{"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None}],
                "usage": usage,
                **extra,
            }
        return JSONResponse(body, headers=call.headers())

    async def stream(
        self, gen_req: GenRequest, call: Call, created: int, extra: dict[str, Any], t0: float
    ) -> AsyncIterator[bytes]:
        chat, req = call.chat, call.req
        obj = "chat.completion.chunk" if chat else "text_completion"
        cid = f"chatcmpl-{call.iid}" if chat else f"cmpl-{call.iid}"

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if chat:
                d: dict[str, Any] = {"role": "assistant"} if role else {}
                if delta:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            doc = {"id": cid, "object": obj, "created": created, "model": req.model, "choices": [choice], **extra}
            return b"data: " + orjson.dumps(doc) + b"\n\n"

        text = ""
        try:
            if chat:
                yield chunk(None, role=True)
            async for piece in self.gw.backend.stream(gen_req):
                text += piece
                yield chunk(piece)
            finish = gen_req.finish_reason or "stop"
            yield chunk(None, finish)
            yield b"data: [DONE]\n\n"
        except ServingError as exc:
            err = {"error": {"message": str(exc), "type": exc.type, "code": exc.code}}
            yield b"data: " + orjson.dumps(err) + b"\n\n"
            return
        finally:
            await self.gw.backend.release(call.op.adapter)
        tok = getattr(self.gw.backend, "tokenizer", None)
        n_completion = len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else 0
        gen = Generation(text, gen_req.prompt_tokens, n_completion, finish)
        self.gw.capture(call, gen, (time.perf_counter() - t0) * 1000, stream=True, served=gen_req.served)

    def after_response(self, call: Call, gen: Generation, latency_ms: float, served: str | None) -> BackgroundTask:
        """The capture of a complete, non-streamed reply, run on the event loop once the reply is sent: the capture
        threads it wakes (the Emitter and its Kafka producer) then never hold the reply back."""

        async def capture() -> None:
            self.gw.capture(call, gen, latency_ms, stream=False, served=served)

        return BackgroundTask(capture)

    def relay_body(self, req: Any, op: Operator, chat: bool, max_tokens: int) -> dict[str, Any]:
        """The client's body for the upstream: every field it sent, except what routing changes (the model, the
        operator's system prompt/template) and `metadata` (the gateway's routing and capture channel: it may carry
        scorer references that must not leave for a third party); token limits held to the gateway's bound."""
        body: dict[str, Any] = req.model_dump(exclude_unset=True, exclude={"metadata"})
        body["model"] = self.gw.backend.model_for(op.adapter)  # type: ignore[attr-defined]
        if chat:
            body["messages"] = self.gw.apply_operator(op, body["messages"], None)
        else:
            body["prompt"] = self.gw.apply_operator(op, None, req.prompt)
        bounded = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
        for key in bounded or ["max_tokens"]:
            body[key] = max_tokens
        return body

    async def relay(self, body: dict[str, Any], call: Call, extra: dict[str, Any]) -> Any:
        """Serve through an OpenAI-compatible upstream: its reply (or stream) comes back whole, with the
        gateway's interaction id and routing fields added, and is captured once it is complete."""
        backend: Any = self.gw.backend
        op, req = call.op, call.req
        path = "/chat/completions" if call.chat else "/completions"
        headers = call.headers()

        def record(gen: Generation, t0: float) -> None:
            self.gw.capture(call, gen, (time.perf_counter() - t0) * 1000, stream=bool(req.stream), served=op.adapter)

        backend.acquire(op.adapter)
        t0 = time.perf_counter()
        if not req.stream:
            try:
                data = await backend.complete(path, body)
            finally:
                await backend.release(op.adapter)
            choice = data["choices"][0] if isinstance(data["choices"][0], dict) else {}
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            finish = choice.get("finish_reason") or "stop"
            calls = (choice.get("message") or {}).get("tool_calls") or None
            gen = Generation(reply_text(choice), int(usage.get("prompt_tokens") or 0),
                             int(usage.get("completion_tokens") or 0), finish, calls)  # fmt: skip
            latency = (time.perf_counter() - t0) * 1000
            data["model"] = req.model
            data.update(extra)
            return JSONResponse(data, headers=headers, background=self.after_response(call, gen, latency, op.adapter))
        try:
            resp = await backend.open_stream(path, body)  # an upstream error status comes back as that status
        except BaseException:
            await backend.release(op.adapter)
            raise

        async def chunks() -> AsyncIterator[bytes]:
            tally = Tally()
            try:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, SSE comments and keep-alives
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    doc = orjson.loads(data)
                    if isinstance(doc, dict) and "error" in doc and "choices" not in doc:
                        yield b"data: " + orjson.dumps(doc) + b"\n\n"  # the upstream's own error, as it sent it
                        return
                    tally.add(doc)
                    doc["model"] = req.model
                    doc.update(extra)
                    yield b"data: " + orjson.dumps(doc) + b"\n\n"
                usage = tally.usage
                calls = [tally.calls[i] for i in sorted(tally.calls)] or None
                gen = Generation(tally.response(), int(usage.get("prompt_tokens") or 0),
                                 int(usage.get("completion_tokens") or 0), tally.finish or "stop", calls)  # fmt: skip
                record(gen, t0)  # before [DONE]: a client that saw the end may look for the interaction at once
                yield b"data: [DONE]\n\n"
            except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
                failed = (backend.api.failure(exc) if isinstance(exc, httpx.HTTPError) else
                          UpstreamError(f"the upstream sent a malformed stream chunk: {exc}", status=502,
                                        code="upstream_error"))  # fmt: skip
                log.warning("interaction %s: upstream stream cut: %s", call.iid, failed)
                yield b"data: " + orjson.dumps({"error": failed.error}) + b"\n\n"
                return
            finally:
                await resp.aclose()
                await backend.release(op.adapter)

        return StreamingResponse(chunks(), media_type="text/event-stream", headers=headers)


def routes(gw: Gateway) -> APIRouter:
    handler = Completions(gw)
    router = APIRouter()

    @router.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        now = int(time.time())
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": now, "owned_by": "taoflow"} for m in gw.models()],
            }
        )

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handler.serve(request, await read_body(request, ChatRequest, gw.cfg.max_request_bytes), "chat")

    @router.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await read_body(request, CompletionRequest, gw.cfg.max_request_bytes)
        return await handler.serve(request, req, "completions")

    return router
