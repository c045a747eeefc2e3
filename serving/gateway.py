"""The OpenAI-compatible gateway: routes each request to an operator, serves it, captures it as an interaction.

This module keeps the gateway's state (`Gateway`: backend, router, sessions, emitter, capture) and assembles the
app; the Kafka feed of utilities and adapter events that hot-swaps adapters is `serving.lifecycle`. The endpoints
are thin routers, one module per group: `serving.completions` (`/v1/chat/completions`, also streaming,
`/v1/completions`, `/v1/models`), `serving.feedback` (`/v1/feedback`) and `serving.admin` (`/healthz`, `/metrics`,
`/admin/*`, admin scope); their request models are in `serving.protocol`. Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the matching HTTP status (`serving.http`).

Task type comes from the `X-Taoflow-Task-Type` header or `metadata.task_type`; an operator can be forced
with `X-Taoflow-Operator` / `metadata.operator`, an adapter by asking for it as the model: such requests are
served, and captured with `forced=True` so they never steer the utilities. Every response carries its
interaction id (`X-Taoflow-Interaction-Id` header and `interaction_id` in the body) for `/v1/feedback`.
A multi-step task names its session (`X-Taoflow-Session` header or `metadata.session_id`; its step with
`X-Taoflow-Step` / `metadata.step`, else the gateway counts): every step is served by the operator its first step
got (`serving.sessions`), and `/v1/feedback` with a `session_id` scores the session as a whole.
Capture goes through the SDK's Emitter, which never blocks the response.

Trust: every interaction and feedback carries its caller (a hash of the API key; None for admin keys and the
no-auth mode). Only trusted callers (admin keys, `trusted_keys`, the no-auth mode) may set reserved metadata
(`reserved_metadata_keys`, what scorers take as references) and the agent id; other callers' reserved keys are
dropped and their `X-Taoflow-Agent` is kept as `metadata.client_agent`, never as `agent_id`.
Authentication, rate limits and body bounds happen before the body is read (`serving.guard`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.interactions import InteractionEvent
from serving import admin, completions, feedback
from serving.auth import OPEN, Keyring, Principal
from serving.backends import Backend, Generation
from serving.dashboard import add_dashboard
from serving.exceptions import BadRequest
from serving.guard import PRINCIPAL, Guard
from serving.http import install_error_handlers
from serving.lifecycle import AdapterLifecycle
from serving.protocol import Call
from serving.router import Decision, Operator, Router
from serving.sessions import Sessions
from taoflow.broker import reachable
from taoflow.emitter import Emitter
from taoflow.settings import Settings

log = logging.getLogger(__name__)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "taoflow_gateway_requests",
            "Requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "taoflow_gateway_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.tokens = Counter("taoflow_gateway_tokens", "Tokens by kind", ["kind"], registry=self.registry)
        self.capture_errors = Counter(
            "taoflow_gateway_capture_errors", "Interactions not captured", registry=self.registry
        )
        self.adapters = Gauge("taoflow_gateway_adapters_loaded", "Adapters loaded", registry=self.registry)
        self.transitions = Counter(
            "taoflow_gateway_adapter_transitions", "Adapter lifecycle transitions", ["action"], registry=self.registry
        )
        self.operator = Counter(
            "taoflow_gateway_operator_requests",
            "Requests per chosen operator",
            ["task_type", "operator"],
            registry=self.registry,
        )


class Gateway:
    """The gateway's state: backend, router, sessions, emitter, capture; the adapters' lifecycle (Kafka feed, loading,
    release decisions) is `serving.lifecycle`; `build_app` builds the FastAPI app."""

    def __init__(self, settings: Settings, backend: Backend, *, emitter: Any = None, kafka: bool | None = None) -> None:
        self.settings = settings
        self.cfg = settings.serve
        self.backend = backend
        stream = settings.stream
        self.router = Router(
            self.cfg, initial_utility=stream.initial_utility, noise_s=stream.noise_s, alpha=stream.alpha
        )
        self.emitter = emitter
        self.kafka = kafka
        self.metrics = _Metrics()
        self.keys = Keyring(self.cfg)
        self.limits = settings.limits.limits()
        self.lifecycle = AdapterLifecycle(settings, backend, self.router, self.metrics, self.limits)
        self._ctx = {"limits": self.limits}
        self.reserved = frozenset(self.cfg.reserved_metadata_keys) | {"task_type", "operator"}
        self.task_labels = frozenset(self.cfg.operators)  # task types metrics name; the rest count as OTHER
        self.loop: asyncio.AbstractEventLoop | None = None
        # the last requests' routed and served adapters (bounded: it is filled on every request)
        self.audit: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)
        self.sessions = Sessions(self.cfg.session_ttl_s, self.cfg.max_sessions)  # sticky operators of sessions

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def decisions(self) -> dict[str, Decision]:
        """The latest release decision per adapter, with its evidence."""
        return self.lifecycle.decisions

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.backend.start()
        if self.kafka is None:
            self.kafka = reachable(self.settings.bootstrap, timeout=1.0)
        if self.emitter is None:
            self.emitter = Emitter(self.settings, agent_id=self.cfg.agent_id)
        if self.kafka:
            await self.lifecycle.start()
        else:
            log.warning(
                "Kafka at %s is unreachable: no live utilities or adapter events (interactions spool to "
                "disk until it is back)",
                self.settings.bootstrap,
            )
        if self.keys.open:
            log.warning("no API keys configured (TAOFLOW_SERVE_API_KEYS): the gateway accepts every request")

    async def close(self) -> None:
        await self.lifecycle.close()
        if self.emitter is not None:
            await asyncio.to_thread(self.emitter.close)
        await self.backend.close()

    # -- request handling -----------------------------------------------------------------------------------

    @staticmethod
    def principal(request: Request) -> Principal:
        """The caller the guard authenticated (the no-auth principal when it checked nothing)."""
        p: Principal = request.scope.get(PRINCIPAL, OPEN)
        return p

    def resolve_model(self, model: str) -> tuple[bool, str | None]:
        """(routed, forced adapter): the routed name, an adapter by name, or the base model."""
        if model == self.cfg.model_name:
            return True, None
        if model in self.backend.adapters:
            return False, model
        if model in ("base", self.backend.base_model):
            return False, "base"
        raise BadRequest(f"the model {model!r} does not exist; see /v1/models", status=404, code="model_not_found")

    def models(self) -> list[str]:
        return [self.cfg.model_name, "base", *sorted(self.backend.adapters)]

    @staticmethod
    def apply_operator(op: Operator, messages: list[dict[str, Any]] | None, prompt: str | None) -> Any:
        spec = op.spec
        if messages is not None:
            out = [dict(m) for m in messages]
            if spec.template:
                for m in reversed(out):
                    if m["role"] == "user":
                        content = m.get("content")
                        if isinstance(content, list):  # content parts (images...): the template wraps the text ones
                            m["content"] = [
                                {**p, "text": spec.template.replace("{prompt}", p.get("text") or "")}
                                if isinstance(p, dict) and p.get("type") == "text" else p
                                for p in content
                            ]  # fmt: skip
                        else:
                            m["content"] = spec.template.replace("{prompt}", content or "")
                        break
            if spec.system_prompt:
                out.insert(0, {"role": "system", "content": spec.system_prompt})
            return out
        text = spec.template.replace("{prompt}", prompt or "") if spec.template else prompt or ""
        return f"{spec.system_prompt}\n\n{text}" if spec.system_prompt else text

    def capture(self, call: Call, gen: Generation, latency_ms: float, *, stream: bool, served: str | None) -> None:
        """Record a finished request: the audit of routed vs served adapter, and its InteractionEvent."""
        op, principal, agent = call.op, call.principal, call.agent
        self.audit.append({"iid": call.iid, "routed": op.adapter, "served": served, "text": gen.text})
        drop = ({"task_type", "operator"} if principal.trusted else self.reserved) | {"session_id", "step"}
        meta = {k: v for k, v in (call.req.metadata or {}).items() if k not in drop}
        if agent is not None and not principal.trusted:
            meta["client_agent"] = agent  # what the client said, kept apart from the agent id it cannot vouch for
            agent = None
        meta.update(
            model=call.req.model,
            endpoint=call.endpoint,
            stream=stream,
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
        )
        extra = call.req.model_extra or {}
        try:
            data = {
                "event_id": call.iid,
                "agent_id": agent or self.cfg.agent_id,
                "task_type": call.task_type,
                "operator": op.name,
                "prompt": call.prompt,
                "response": gen.text,
                "adapter": op.adapter,
                "latency_ms": latency_ms,
                "metadata": meta,
                "caller": principal.caller,
                "forced": call.forced,
                "tools": extra.get("tools"),
                "tool_calls": gen.tool_calls,
                "response_format": extra.get("response_format"),
                "finish_reason": gen.finish_reason,
                "session_id": call.session_id,
                "step": call.step,
            }
            self.emitter.emit(InteractionEvent.model_validate(data, context=self._ctx))
        except Exception:
            self.metrics.capture_errors.inc()
            log.exception("interaction %s not captured", call.iid)
        self.metrics.tokens.labels("prompt").inc(gen.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(gen.completion_tokens)


def build_app(gateway: Gateway) -> Any:
    """The FastAPI app: the guard before every body, the dashboard, and one router per group of endpoints."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="taoflow gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    # authentication, rate limits and size caps before any body is read; metrics by route template
    app.add_middleware(Guard, gateway=gateway)
    add_dashboard(app, gateway.settings)
    app.include_router(admin.routes(gateway))
    app.include_router(completions.routes(gateway))
    app.include_router(feedback.routes(gateway))
    return app
