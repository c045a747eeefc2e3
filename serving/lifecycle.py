"""The adapters' side of the gateway: the Kafka feed of utilities and adapter events (replayed from the start, then
live), loading an adapter after checking it against its manifest and published hash, the router's release
decisions applied and announced as adapter events.

Replay applies adapter events in the order they happened (by `ts`), across partitions; once caught up, the gateway
loads what the lifecycle state names (an adapter that fails to load is rolled back and announced so) and only then
serves (`ready`). Live: a published adapter is loaded and becomes the canary; a promotion or rollback elsewhere
(another replica, an operator) is applied; the router's own decisions are announced with this process's
`instance` mark, and their echo is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas import AdapterEvent, UtilityEvent
from schemas import topics as names
from schemas.adapters import AdapterAction
from schemas.base import Limits, parse_event
from schemas.fast import fast_utility
from serving.adapters import ADAPTER_NAME, adapter_dir, verify_adapter
from serving.backends import Backend
from serving.router import Decision, Router
from taoflow.broker import assign_from_start
from taoflow.settings import Settings

log = logging.getLogger(__name__)


class AdapterLifecycle:
    """Feed, loading and release decisions of the gateway's adapters (see the module docstring)."""

    def __init__(self, settings: Settings, backend: Backend, router: Router, metrics: Any, limits: Limits) -> None:
        self.settings = settings
        self.backend = backend
        self.router = router
        self.metrics = metrics
        self.limits = limits
        self.producer: Any = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.ready = asyncio.Event()  # set once the feed caught up and the adapters it names are loaded
        self.shas: dict[str, str] = {}  # adapter -> sha256 its published event carried (checked at load)
        self.instance = uuid.uuid4().hex  # marks the adapter events this process emits (it skips their echo)
        self.decisions: dict[str, Decision] = {}  # the latest release decision per adapter, with its evidence

    async def start(self) -> None:
        """Start the producer and the feed; returns once the feed has caught up (at most 120 s)."""
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap, acks="all", **self.settings.kafka.security_kwargs()
        )
        await self.producer.start()
        self.tasks.append(asyncio.create_task(self._feed(), name="taoflow-gateway-feed"))
        await asyncio.wait_for(self.ready.wait(), 120)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.producer is not None:
            await self.producer.stop()

    async def _feed(self) -> None:
        """Utilities and adapter events from the beginning of their topics, then live."""
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
                            await self.on_record(rec, live)
                    if not live and records and records[-1].offset + 1 >= ends[tp]:
                        pending.discard(tp)
                if not live and (not pending or all([await self._reached(consumer, tp, ends[tp]) for tp in pending])):
                    for *_, rec in sorted(history, key=lambda h: h[:3]):
                        await self.on_record(rec, False)
                    history.clear()
                    live = True
                    await self._catch_up_done()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the gateway's Kafka feed failed; routing keeps the last utilities it saw")
            self.ready.set()
        finally:
            await consumer.stop()

    @staticmethod
    async def _reached(consumer: Any, tp: Any, end: int) -> bool:
        return bool(await consumer.position(tp) >= end)

    async def _catch_up_done(self) -> None:
        """After replay: load the adapters the lifecycle state names (rolling back any that fail), then serve."""
        await self.settle()
        log.info("gateway routing state: %s", self.router.state())
        self.ready.set()

    async def load(self, name: str) -> str:
        """Verify `adapters_dir/name` against its manifest (and the published sha256), then load it; its path."""
        path = adapter_dir(self.settings.core.adapters_dir, name)
        await asyncio.to_thread(verify_adapter, path, name, self.shas.get(name))
        await self.backend.load_adapter(name, str(path))
        self.metrics.adapters.set(len(self.backend.adapters))
        return str(path)

    async def refuse(self, name: str, exc: Exception) -> None:
        """An adapter that cannot be served: out of the routing state, and announced as rolled back."""
        reason = f"not loadable by the gateway: {type(exc).__name__}: {exc}"
        log.error("adapter %s %s", name, reason)
        r = self.router
        r.apply_event("rolled_back", name)
        r.history = [h for h in r.history if h != name]  # a later rollback must not land on it either
        self.metrics.transitions.labels("rolled_back").inc()
        await self.announce("rolled_back", name, reason=reason[:1000])

    async def settle(self) -> None:
        """Make the router point only at loaded adapters: load the incumbent, canary and previous adapter; any that
        fails is rolled back (the incumbent's predecessor takes over, and is loaded in turn)."""
        r = self.router
        while True:
            name = next((n for n in (r.incumbent, r.canary) if n and n not in self.backend.adapters), None)
            if name is None:
                break
            try:
                await self.load(name)
            except Exception as exc:
                await self.refuse(name, exc)
        while r.history and r.history[-1] and r.history[-1] not in self.backend.adapters:
            prev = r.history[-1]
            assert prev is not None
            try:
                await self.load(prev)  # kept loaded so a rollback switches at once
            except Exception as exc:
                log.error("previous adapter %s cannot be loaded (%s); a rollback goes further back", prev, exc)
                r.history.pop()

    async def on_record(self, rec: Any, live: bool) -> None:
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
                    await self.apply_decision(decision)
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
                path = await self.load(name)
            except Exception as exc:
                await self.refuse(name, exc)
                return
            self.router.apply_event("published", name)
            await self.announce("loaded", name, path=path)
            await self.announce("canary", name, path=path, reason="published by the learner; serving as canary")
        else:
            self.router.apply_event(ev.action, name)
            await self.settle()  # e.g. another replica promoted an adapter this one has not loaded yet

    async def apply_decision(self, d: Decision) -> None:
        self.decisions[d.adapter] = d
        self.metrics.transitions.labels(d.action).inc()
        log.info("adapter %s %s: %s", d.adapter, d.action, d.reason)
        await self.announce(d.action, d.adapter, reason=d.reason, metrics=d.metrics)
        if d.action == "rolled_back":
            await self.settle()  # the predecessor it falls back to must be loaded
            self.tasks.append(asyncio.create_task(self.unload(d.adapter)))

    async def unload(self, name: str) -> None:
        await self.backend.unload_adapter(name)  # waits for requests still on it
        self.metrics.adapters.set(len(self.backend.adapters))
        await self.announce("unloaded", name)

    async def announce(self, action: AdapterAction, name: str, **fields: Any) -> None:
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


def _event_time(rec: Any) -> float:
    """When an adapter event happened: its `ts`, else the record's timestamp (a record that does not parse is
    skipped when applied)."""
    try:
        return float(parse_event(AdapterEvent, rec.value).ts.timestamp())
    except Exception:
        return float(rec.timestamp or 0) / 1000
