"""The OpenAI-compatible gateway: routes each request to an operator, serves it, captures it as an interaction.

Endpoints: `/v1/chat/completions` (also streaming), `/v1/completions`, `/v1/models`, `/v1/feedback`,
`/healthz`, `/metrics`, and `/admin/*` (admin scope). Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the matching HTTP status.

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
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from schemas import AdapterEvent, UtilityEvent
from schemas import topics as names
from schemas.adapters import AdapterAction
from schemas.base import format_errors, parse_event
from schemas.fast import fast_utility
from schemas.feedback import FeedbackEvent
from schemas.interactions import InteractionEvent
from serving.adapters import ADAPTER_NAME, adapter_dir, verify_adapter
from serving.auth import OPEN, Keyring, Principal
from serving.backends import Backend, Generation, GenRequest
from serving.exceptions import BadRequest, RateLimited, ServingError
from serving.guard import PRINCIPAL, Guard
from serving.protocol import (
    SESSION_ID,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    captured_message,
    check_label,
    message_text,
    refuse_unsupported_locally,
    session_of,
)
from serving.router import BASE, Decision, Operator, Router
from serving.sessions import Sessions
from serving.upstream import Tally, UpstreamError, reply_text
from taoflow.broker import assign_from_start, reachable
from taoflow.emitter import Emitter
from taoflow.settings import Settings

log = logging.getLogger(__name__)

TASK_HEADER = "x-taoflow-task-type"
OPERATOR_HEADER = "x-taoflow-operator"
AGENT_HEADER = "x-taoflow-agent"
ID_HEADER = "X-Taoflow-Interaction-Id"
OTHER = "other"  # the metric label of task types not configured in `operators`


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


@dataclass
class Call:
    """One request as the gateway handles it: who asked, how it was routed, and what its capture records."""

    iid: str
    req: Any  # the parsed ChatRequest or CompletionRequest
    chat: bool
    task_type: str
    op: Operator
    forced: bool  # the client chose the operator or adapter: captured, never in utilities
    principal: Principal
    agent: str | None  # the X-Taoflow-Agent header, as sent
    prompt: Any  # as the client sent it: the messages (tool calls and results included) or the text
    session_id: str | None = None
    step: int | None = None

    @property
    def endpoint(self) -> str:
        return "chat" if self.chat else "completions"

    def headers(self) -> dict[str, str]:
        out = {ID_HEADER: self.iid, "X-Taoflow-Operator": self.op.name, "X-Taoflow-Adapter": self.op.adapter or "base",
               "X-Taoflow-Task-Type": self.task_type}  # fmt: skip
        if self.session_id is not None:
            out.update({"X-Taoflow-Session": self.session_id, "X-Taoflow-Step": str(self.step)})
        return out


class Gateway:
    """The gateway's state: backend, router, emitter, Kafka feeds; `app()` builds the FastAPI app."""

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
        self.producer: Any = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.ready: asyncio.Event | None = None  # set once the feeds caught up (start())
        self.keys = Keyring(self.cfg)
        self.limits = settings.limits.limits()
        self._ctx = {"limits": self.limits}
        self.reserved = frozenset(self.cfg.reserved_metadata_keys) | {"task_type", "operator"}
        self.task_labels = frozenset(self.cfg.operators)  # task types metrics name; the rest count as OTHER
        self.shas: dict[str, str] = {}  # adapter -> sha256 its published event carried (checked at load)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.instance = uuid.uuid4().hex  # marks the adapter events this process emits (it skips their echo)
        # the last requests' routed and served adapters (bounded: it is filled on every request)
        self.audit: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)
        self.decisions: dict[str, Decision] = {}  # the latest release decision per adapter, with its evidence
        self.sessions = Sessions(self.cfg.session_ttl_s, self.cfg.max_sessions)  # sticky operators of sessions

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.backend.start()
        if self.kafka is None:
            self.kafka = reachable(self.settings.bootstrap, timeout=1.0)
        if self.emitter is None:
            self.emitter = Emitter(self.settings, agent_id=self.cfg.agent_id)
        self.ready = asyncio.Event()
        if self.kafka:
            from aiokafka import AIOKafkaProducer

            self.producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.bootstrap, acks="all", **self.settings.kafka.security_kwargs()
            )
            await self.producer.start()
            self.tasks.append(asyncio.create_task(self._feed(), name="taoflow-gateway-feed"))
            await asyncio.wait_for(self.ready.wait(), 120)
        else:
            log.warning(
                "Kafka at %s is unreachable: no live utilities or adapter events (interactions spool to "
                "disk until it is back)",
                self.settings.bootstrap,
            )
            self.ready.set()
        if self.keys.open:
            log.warning("no API keys configured (TAOFLOW_SERVE_API_KEYS): the gateway accepts every request")

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.producer is not None:
            await self.producer.stop()
        if self.emitter is not None:
            await asyncio.to_thread(self.emitter.close)
        await self.backend.close()

    async def _feed(self) -> None:
        """Utilities and adapter events from the beginning of their topics, then live."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False, **self.settings.kafka.security_kwargs()
        )
        await consumer.start()
        try:
            tps = await assign_from_start(consumer, (names.UTILITIES, names.ADAPTERS))
            ends = await consumer.end_offsets(tps)
            pending = {tp for tp, end in ends.items() if end > 0}
            live = not pending
            # adapter events replayed in the order they happened: keyed by adapter name, the events of different
            # adapters sit on different partitions of a topic with several, and a partition-by-partition replay
            # could apply a later promotion before an earlier publication (and lose the canary)
            history: list[tuple[float, int, int, Any]] = []
            if live:
                await self._catch_up_done()
            while True:
                batch = await consumer.getmany(timeout_ms=100, max_records=5000)
                for tp, records in batch.items():
                    for rec in records:
                        if not live and rec.topic == names.ADAPTERS:
                            history.append((_event_time(rec), rec.partition, rec.offset, rec))
                        else:
                            await self._on_record(rec, live)
                    if not live and records and records[-1].offset + 1 >= ends[tp]:
                        pending.discard(tp)
                if not live and (not pending or all([await self._reached(consumer, tp, ends[tp]) for tp in pending])):
                    for *_, rec in sorted(history, key=lambda h: h[:3]):
                        await self._on_record(rec, False)
                    history.clear()
                    live = True
                    await self._catch_up_done()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the gateway's Kafka feed failed; routing keeps the last utilities it saw")
            if self.ready is not None:
                self.ready.set()
        finally:
            await consumer.stop()

    @staticmethod
    async def _reached(consumer: Any, tp: Any, end: int) -> bool:
        return bool(await consumer.position(tp) >= end)

    async def _catch_up_done(self) -> None:
        """After replay: load the adapters the lifecycle state names (rolling back any that fail), then serve."""
        await self._settle()
        log.info("gateway routing state: %s", self.router.state())
        assert self.ready is not None
        self.ready.set()

    async def _load(self, name: str) -> str:
        """Verify `adapters_dir/name` against its manifest (and the published sha256), then load it; its path."""
        path = adapter_dir(self.settings.core.adapters_dir, name)
        await asyncio.to_thread(verify_adapter, path, name, self.shas.get(name))
        await self.backend.load_adapter(name, str(path))
        self.metrics.adapters.set(len(self.backend.adapters))
        return str(path)

    async def _refuse(self, name: str, exc: Exception) -> None:
        """An adapter that cannot be served: out of the routing state, and announced as rolled back."""
        reason = f"not loadable by the gateway: {type(exc).__name__}: {exc}"
        log.error("adapter %s %s", name, reason)
        r = self.router
        r.apply_event("rolled_back", name)
        r.history = [h for h in r.history if h != name]  # a later rollback must not land on it either
        self.metrics.transitions.labels("rolled_back").inc()
        await self._announce("rolled_back", name, reason=reason[:1000])

    async def _settle(self) -> None:
        """Make the router point only at loaded adapters: load the incumbent, canary and previous adapter; any that
        fails is rolled back (the incumbent's predecessor takes over, and is loaded in turn)."""
        r = self.router
        while True:
            name = next((n for n in (r.incumbent, r.canary) if n and n not in self.backend.adapters), None)
            if name is None:
                break
            try:
                await self._load(name)
            except Exception as exc:
                await self._refuse(name, exc)
        while r.history and r.history[-1] and r.history[-1] not in self.backend.adapters:
            prev = r.history[-1]
            assert prev is not None
            try:
                await self._load(prev)  # kept loaded so a rollback switches at once
            except Exception as exc:
                log.error("previous adapter %s cannot be loaded (%s); a rollback goes further back", prev, exc)
                r.history.pop()

    async def _on_record(self, rec: Any, live: bool) -> None:
        """Apply one feed record; never raises: one bad record must not stop the feed (later utilities count)."""
        try:
            await self._apply_record(rec, live)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("record %s[%s]@%s skipped: %s: %s", rec.topic, rec.partition, rec.offset, type(exc).__name__, exc)

    async def _apply_record(self, rec: Any, live: bool) -> None:
        if rec.topic == names.UTILITIES:
            doc = fast_utility(rec.value, self.limits)
            if doc is None:
                u = parse_event(UtilityEvent, rec.value, self.limits)
                doc = {"task_type": u.task_type, "operator": u.operator, "utility": u.utility, "n": u.n,
                       "last_reward": u.last_reward}  # fmt: skip
            self.router.update_utility(doc["task_type"], doc["operator"], doc["utility"], doc["n"],
                                       doc.get("last_reward"), live=live)  # fmt: skip
            if live:
                decision = self.router.decide()
                if decision is not None:
                    await self._apply_decision(decision)
            return
        ev = parse_event(AdapterEvent, rec.value, self.limits)
        name = ev.adapter
        if not ADAPTER_NAME.fullmatch(name):
            log.warning("adapter event at %s@%d names %r, not a valid adapter name: skipped", rec.topic, rec.offset,
                        name[:80])  # fmt: skip
            return
        if live and ev.metadata.get("gateway") == self.instance:
            return  # our own decision coming back: already applied (a late echo must not undo a later one)
        if ev.action not in ("published", "promoted", "rolled_back"):
            return
        if ev.action == "published" and ev.sha256:
            self.shas[name] = ev.sha256
        if ev.path is not None and ev.path != str(self.settings.core.adapters_dir / name):
            log.warning("adapter %s: the event's path %r is ignored; it loads from %s", name, ev.path[:200],
                        self.settings.core.adapters_dir / name)  # fmt: skip
        if not live:
            self.router.apply_event(ev.action, name)
            return
        if ev.action == "published" and name not in self.backend.adapters and name != self.router.incumbent:
            try:
                path = await self._load(name)
            except Exception as exc:
                await self._refuse(name, exc)
                return
            self.router.apply_event("published", name)
            await self._announce("loaded", name, path=path)
            await self._announce("canary", name, path=path, reason="published by the learner; serving as canary")
        else:
            self.router.apply_event(ev.action, name)
            await self._settle()  # e.g. another replica promoted an adapter this one has not loaded yet

    async def _apply_decision(self, d: Decision) -> None:
        self.decisions[d.adapter] = d
        self.metrics.transitions.labels(d.action).inc()
        log.info("adapter %s %s: %s", d.adapter, d.action, d.reason)
        await self._announce(d.action, d.adapter, reason=d.reason, metrics=d.metrics)
        if d.action == "rolled_back":
            await self._settle()  # the predecessor it falls back to must be loaded
            self.tasks.append(asyncio.create_task(self._unload(d.adapter)))

    async def _unload(self, name: str) -> None:
        await self.backend.unload_adapter(name)  # waits for requests still on it
        self.metrics.adapters.set(len(self.backend.adapters))
        await self._announce("unloaded", name)

    async def _announce(self, action: AdapterAction, name: str, **fields: Any) -> None:
        event = AdapterEvent(
            adapter=name, action=action, base_model=self.backend.base_model, metadata={"gateway": self.instance},
            **fields,
        )  # fmt: skip
        if self.producer is None:
            return
        try:
            await self.producer.send_and_wait(names.ADAPTERS, event.to_json_bytes(), key=event.key())
        except Exception:
            log.exception("could not publish the %s event of adapter %s", action, name)

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


def _event_time(rec: Any) -> float:
    """When an adapter event happened: its `ts`, else the record's timestamp (a record that does not parse is
    skipped when applied)."""
    try:
        return float(parse_event(AdapterEvent, rec.value).ts.timestamp())
    except Exception:
        return float(rec.timestamp or 0) / 1000


def build_app(gateway: Gateway) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="taoflow gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    gw = gateway

    def error(exc: ServingError) -> JSONResponse:
        # an upstream's own error object (its message, type, param, code) goes back as it came
        err = getattr(exc, "error", None) or {"message": str(exc), "type": exc.type, "param": None, "code": exc.code}
        body = {"error": err}
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(ServingError)
    async def on_serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error(ServingError(f"internal error: {type(exc).__name__}"))

    # authentication, rate limits and size caps before any body is read; metrics by route template
    app.add_middleware(Guard, gateway=gw)

    async def body_of(request: Request, model: type[BaseModel]) -> Any:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > gw.cfg.max_request_bytes:
                raise BadRequest(
                    f"request body exceeds the limit of {gw.cfg.max_request_bytes} bytes",
                    status=413,
                    code="request_too_large",
                )
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(doc, dict):
            raise BadRequest("the body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(doc)
        except ValidationError as exc:
            raise BadRequest(format_errors(model, exc), code="invalid_request") from None

    from serving.dashboard import add_dashboard

    add_dashboard(app, gw.settings)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        # public, so it says only up or down; routing state and adapters are in /admin/state
        ok = await gw.backend.health()
        return JSONResponse({"status": "ok" if ok else "backend_down"}, status_code=200 if ok else 503)

    @app.get("/metrics")  # admin or metrics key (the guard); open only in the no-auth mode
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        now = int(time.time())
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": now, "owned_by": "taoflow"} for m in gw.models()],
            }
        )

    def route(request: Request, req: Any, principal: Principal, chat: bool) -> Call:
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
            if target and target != BASE and target not in gw.backend.adapters:
                raise BadRequest(f"adapter {target[:80]!r} is not loaded", status=404, code="model_not_found")
        routed, adapter = gw.resolve_model(req.model)
        op = None
        if session_id is not None and forced_op is None and routed:
            op = sticky(principal, session_id, task_type)
        if op is None:
            op = gw.router.choose(task_type, operator=forced_op, adapter=None if routed else adapter)
        if session_id is not None:
            step = gw.sessions.record(principal.caller, session_id, task_type, op.name, step)
        label = task_type if task_type in gw.task_labels else OTHER
        gw.metrics.operator.labels(label, op.name).inc()
        agent = request.headers.get(AGENT_HEADER)
        if agent is not None:
            check_label(agent, "agent id")
        prompt = [captured_message(m) for m in req.messages] if chat else req.prompt
        return Call(iid=str(uuid.uuid4()), req=req, chat=chat, task_type=task_type, op=op,
                    forced=forced_op is not None or not routed, principal=principal, agent=agent, prompt=prompt,
                    session_id=session_id, step=step)  # fmt: skip

    def sticky(principal: Principal, session_id: str, task_type: str) -> Operator | None:
        """The operator of the session's earlier steps, while its strategy is configured and its adapter loaded."""
        known = gw.sessions.get(principal.caller, session_id)
        if known is None or known.task_type != task_type:
            return None
        target = known.operator.partition("@")[2]
        if target and target != BASE and target not in gw.backend.adapters:
            return None  # rolled back or unloaded since: the session is routed afresh
        try:
            return gw.router.choose(task_type, operator=known.operator)
        except BadRequest:
            return None  # its strategy is no longer configured

    async def serve(request: Request, req: Any, endpoint: str) -> Any:
        chat = endpoint == "chat"
        call = route(request, req, gw.principal(request), chat)
        op = call.op
        messages = (
            [
                {"role": m.role, "content": message_text(m.content), **({"name": m.name} if m.name else {})}
                for m in req.messages
            ]
            if chat
            else None
        )
        shaped = gw.apply_operator(op, messages, None if chat else req.prompt)
        max_tokens = min(
            req.max_tokens or getattr(req, "max_completion_tokens", None) or gw.cfg.max_tokens, gw.cfg.max_tokens
        )
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
        if gw.backend.upstream:
            return await relay(relay_body(req, op, chat, max_tokens), call, extra)
        refuse_unsupported_locally(req)
        gw.backend.acquire(op.adapter)
        t0 = time.perf_counter()
        if req.stream:
            return StreamingResponse(stream(gen_req, call, created, extra, t0), media_type="text/event-stream",
                                     headers=call.headers())  # fmt: skip
        try:
            gen = await gw.backend.generate(gen_req)
        finally:
            await gw.backend.release(op.adapter)
        gw.capture(call, gen, (time.perf_counter() - t0) * 1000, stream=False, served=gen_req.served)
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
        gen_req: GenRequest, call: Call, created: int, extra: dict[str, Any], t0: float
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
            async for piece in gw.backend.stream(gen_req):
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
            await gw.backend.release(call.op.adapter)
        tok = getattr(gw.backend, "tokenizer", None)
        n_completion = len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else 0
        gen = Generation(text, gen_req.prompt_tokens, n_completion, finish)
        gw.capture(call, gen, (time.perf_counter() - t0) * 1000, stream=True, served=gen_req.served)

    def after_response(call: Call, gen: Generation, latency_ms: float, served: str | None) -> BackgroundTask:
        """The capture of a complete, non-streamed reply, run on the event loop once the reply is sent: the capture
        threads it wakes (the Emitter and its Kafka producer) then never hold the reply back."""

        async def capture() -> None:
            gw.capture(call, gen, latency_ms, stream=False, served=served)

        return BackgroundTask(capture)

    def relay_body(req: Any, op: Operator, chat: bool, max_tokens: int) -> dict[str, Any]:
        """The client's body for the upstream: every field it sent, except what routing changes (the model, the
        operator's system prompt/template) and `metadata` (the gateway's routing and capture channel: it may carry
        scorer references that must not leave for a third party); token limits held to the gateway's bound."""
        body: dict[str, Any] = req.model_dump(exclude_unset=True, exclude={"metadata"})
        body["model"] = gw.backend.model_for(op.adapter)  # type: ignore[attr-defined]
        if chat:
            body["messages"] = gw.apply_operator(op, body["messages"], None)
        else:
            body["prompt"] = gw.apply_operator(op, None, req.prompt)
        bounded = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
        for key in bounded or ["max_tokens"]:
            body[key] = max_tokens
        return body

    async def relay(body: dict[str, Any], call: Call, extra: dict[str, Any]) -> Any:
        """Serve through an OpenAI-compatible upstream: its reply (or stream) comes back whole, with the
        gateway's interaction id and routing fields added, and is captured once it is complete."""
        backend: Any = gw.backend
        op, req = call.op, call.req
        path = "/chat/completions" if call.chat else "/completions"
        headers = call.headers()

        def record(gen: Generation, t0: float) -> None:
            gw.capture(call, gen, (time.perf_counter() - t0) * 1000, stream=bool(req.stream), served=op.adapter)

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
            return JSONResponse(data, headers=headers, background=after_response(call, gen, latency, op.adapter))
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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await serve(request, await body_of(request, ChatRequest), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await serve(request, await body_of(request, CompletionRequest), "completions")

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        fb = await body_of(request, FeedbackRequest)
        if fb.session_id is not None and not SESSION_ID.fullmatch(fb.session_id):
            raise BadRequest(f"session id {fb.session_id[:80]!r} is not allowed", code="invalid_feedback")
        data = {"interaction_id": fb.interaction_id, "session_id": fb.session_id, "kind": fb.kind, "value": fb.value,
                "metadata": fb.metadata,
                # the stream scores it only for interactions (sessions) the same caller captured (None: trusted)
                "caller": gw.principal(request).caller}  # fmt: skip
        try:
            event = FeedbackEvent.model_validate(data, context=gw._ctx)
        except ValidationError as exc:
            raise BadRequest(format_errors(FeedbackEvent, exc), code="invalid_feedback") from None
        eid = gw.emitter.emit(event)
        target = {"interaction_id": fb.interaction_id} if fb.session_id is None else {"session_id": fb.session_id}
        return JSONResponse({"event_id": eid, **target, "status": "accepted"}, status_code=202)

    @app.get("/admin/state")
    async def admin_state(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok" if await gw.backend.health() else "backend_down",
                "backend": gw.backend.name,
                "base_model": gw.backend.base_model,
                "kafka": bool(gw.kafka),
                "routing": gw.router.state(),
                "adapters": gw.backend.adapters,
                "utilities": [
                    {"task_type": t, "operator": o, "utility": u, "n": n}
                    for (t, o), (u, n) in sorted(gw.router.utilities.items())
                ],
            }
        )

    @app.post("/admin/adapters/{name}/rollback")
    async def admin_rollback(name: str, request: Request) -> JSONResponse:
        r = gw.router
        if name not in (r.canary, r.incumbent):
            raise BadRequest(
                f"adapter {name!r} is neither the canary nor the incumbent", status=404, code="adapter_not_found"
            )
        r.apply_event("rolled_back", name)
        await gw._apply_decision(Decision("rolled_back", name, "rolled back by an operator (admin API)"))
        return JSONResponse({"routing": r.state()})

    return app
