"""The OpenAI-compatible gateway: routes each request to an operator, serves it, captures it as an interaction.

This module keeps the gateway's state (`Gateway`: backend, router, sessions, emitter, the adapter-event feed that
hot-swaps adapters, capture) and assembles the app. The endpoints are thin routers, one module per group:
`serving.completions` (`/v1/chat/completions`, also streaming, `/v1/completions`, `/v1/models`), `serving.feedback`
(`/v1/feedback`) and `serving.admin` (`/healthz`, `/metrics`, `/admin/*`, admin scope); their request models are in
`serving.protocol`. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the matching
HTTP status (`serving.http`).

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
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas import AdapterEvent, UtilityEvent
from schemas import topics as names
from schemas.adapters import AdapterAction
from schemas.base import parse_event
from schemas.fast import fast_utility
from schemas.interactions import InteractionEvent
from serving import admin, completions, feedback
from serving.adapters import ADAPTER_NAME, adapter_dir, verify_adapter
from serving.auth import OPEN, Keyring, Principal
from serving.backends import Backend, Generation
from serving.dashboard import add_dashboard
from serving.exceptions import BadRequest
from serving.guard import PRINCIPAL, Guard
from serving.http import install_error_handlers
from serving.protocol import Call
from serving.router import Decision, Operator, Router
from serving.sessions import Sessions
from taoflow.broker import assign_from_start, reachable
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
