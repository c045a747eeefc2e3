"""The batch lane: the worker's input topics go from faust's fetcher to our batch processors whole.

faust delivers each fetched record on its own: its fetch loop awaits a conductor callback per record (racing
it against flow control with two new tasks), the conductor puts it on a channel queue, and the agent's stream
takes it back off with its own per-event bookkeeping. py-spy showed that per-record path, not our code,
costing most of the worker's time, and every hop adding latency. The lane keeps everything faust is good
for (consumer-group membership, rebalancing, table changelog recovery, offset commits from acks) and replaces
only the delivery of our input topics:

1. faust's fetch loop (`Consumer._drain_messages`, specialised in `streams.seams`) hands each fetch's records
   of a lane topic to `Lane.put` as one list, keeping faust's read-offset and gap bookkeeping per record.
2. `Lane.run` takes everything queued, drops records fetched before a rebalance's seek (seek epoch) or of an
   ended generation, keeps each partition continuous (a record past the next expected offset means a hole: the
   partition is read again from there), marks the records in flight (so a rebalance waits for them, as it
   waits for a stream's events), and runs each topic's batch processor into one Outbox: validate, score,
   update tables.
3. `Lane._deliver` sends the Outboxes in order (what queued up meanwhile goes out together: outputs, then
   table changelogs), and only then acks their records, so an offset is committed only after everything it
   caused is in Kafka. It runs beside `run`, so the next batch is processed while this one's acks are
   awaited, and changelog records of a key never overtake each other.

A rebalance clears the lane's queue (faust's flow control clears its own buffers the same way); the batches
already processed are delivered and acked before faust commits and hands the partitions over. Join-state
expiry (`streams.expiry`) runs in the same loop, between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from streams.expiry import expire
from streams.outbox import Outbox

log = logging.getLogger(__name__)

WATCH_S = 3.0  # how often partitions are checked for records that stopped coming (see `Lane._watch_stalls`)

Processor = Callable[[Any, Any, list[Any]], None]  # (WorkerContext, Outbox, messages)


class Lane:
    """Queue of fetched record lists per topic, a processing loop and an in-order delivery loop."""

    def __init__(self, app: Any, ctx: Any, processors: dict[str, Processor], depth: int = 4) -> None:
        self.app = app
        self.ctx = ctx
        self.processors = processors
        self.topics = frozenset(processors)
        self.depth = depth
        self._items: deque[tuple[str, list[Any], int]] = deque()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._sending: asyncio.Queue[tuple[Any, list[Any]]] = asyncio.Queue(maxsize=8)
        self._epoch = -1
        self._next: dict[Any, int] = {}  # partition -> next offset processing expects
        self._holes: dict[tuple[Any, int], tuple[int, float]] = {}  # (partition, offset) -> (re-reads, last)
        self._reseek: list[tuple[Any, int]] = []
        self._gaps: list[tuple[Any, int, int]] = []  # holes accepted as real: (partition, first, end)
        self._seen: dict[Any, int] = {}  # partition -> next expected offset at the last stall check
        self._unseeked: set[Any] = set()  # partitions whose records came before their seek (logged once an epoch)
        self._stuck_since: float | None = None  # since when partitions are assigned with nothing recovering them
        self.last_tick: float | None = None  # when the processing loop last ran
        app.flow_control.manage_queue(self)  # cleared with faust's own buffers when partitions are revoked

    # -- faust's fetch loop side -------------------------------------------------------------------------

    async def put(self, topic: str, messages: list[Any], epoch: int) -> None:
        """Queue one fetch's records of a topic, fetched in seek `epoch`; waits while the lane is `depth` lists
        behind (back-pressure)."""
        while len(self._items) >= self.depth:
            self._space.clear()
            await self._space.wait()
        self._items.append((topic, messages, epoch))
        self._ready.set()

    def clear(self) -> None:
        """Drop what is queued (called by faust's flow control on revocation); nothing of it is tracked yet."""
        self._items.clear()
        self._space.set()

    # -- processing --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Process queued batches until cancelled. Bad input never raises (it is dead-lettered); anything that does
        (a bug) crashes the worker on purpose: a restart recovers from the last committed state."""
        deliver = asyncio.ensure_future(self._deliver())
        deliver.add_done_callback(self._delivery_ended)
        consumer = self.app.consumer
        add_unacked = consumer._unacked_messages.add
        on_message_in = consumer._on_message_in
        flow = self.app.flow_control
        try:
            next_expiry = time.monotonic() + self.ctx.cfg.expire_every_s
            next_watch = time.monotonic() + WATCH_S
            while True:
                self.last_tick = time.monotonic()  # read by the worker's watchdog thread (`health`)
                if time.monotonic() >= next_expiry:
                    next_expiry = time.monotonic() + self.ctx.cfg.expire_every_s
                    if flow.is_active():
                        await self._expire()
                if time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + WATCH_S
                    if flow.is_active() and consumer.seek_epoch == self._epoch:
                        await self._watch_stalls()
                if not self._items:
                    self._ready.clear()
                    wake = min(next_expiry, next_watch) - time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready.wait(), max(0.0, wake))
                    continue
                # everything queued goes into one cycle: per topic in fetch order, one Outbox, one delivery
                by_topic: dict[str, list[Any]] = {}
                taken = 0
                current = consumer.seek_epoch
                generation = self.app.consumer_generation_id
                active = flow.is_active()
                while self._items and taken < 4 * self.ctx.cfg.batch_size:
                    topic, messages, epoch = self._items.popleft()
                    taken += len(messages)
                    if active and epoch == current:  # else fetched before a rebalance: read again after it
                        kept = [m for m in messages if m.generation_id == generation]
                        if len(kept) != len(messages):
                            log.info("%s: %d records of an older generation dropped", topic, len(messages) - len(kept))
                        by_topic.setdefault(topic, []).extend(kept)
                    else:
                        log.info("%s: %d records dropped (fetched in epoch %d, now %d; flow active: %s)",
                                 topic, len(messages), epoch, current, active)  # fmt: skip
                self._space.set()
                if current != self._epoch:  # a rebalance sought every partition to its committed offset
                    self._epoch = current
                    self._next = dict(consumer.seek_targets)
                    self._holes.clear()
                    self._unseeked.clear()
                    resume = {f"{t.topic}/{t.partition}": o for t, o in self._next.items() if t.topic in self.topics}
                    log.info("seek epoch %d: processing resumes at %s", current, resume)
                by_topic = {t: self._continuous(msgs) for t, msgs in by_topic.items()}
                while self._gaps:
                    await consumer._add_gap(*self._gaps.pop())
                while self._reseek:
                    tp, offset = self._reseek.pop()
                    if tp in consumer.assignment():
                        await consumer.seek(tp, offset)
                live = [m for messages in by_topic.values() for m in messages]
                if not live:
                    continue
                for m in live:
                    m.tracked = True
                    add_unacked(m)
                    on_message_in(m.tp, m.offset, m)
                out = self.ctx.outbox()
                for topic, messages in by_topic.items():
                    self.processors[topic](self.ctx, out, messages)
                # the positions these records take their partitions to, after everything they caused (`Outbox`)
                positions = self.ctx.positions
                for tp in {m.tp for m in live}:
                    out.put_position(positions, tp.topic, tp.partition, self._next[tp])
                await self._sending.put((out, live))
        except asyncio.CancelledError:
            # the worker is stopping: let what is processed go out (its records are acked only after it has)
            await self._drain_sending(deliver)
            raise
        except Exception as exc:
            log.critical("stream processing failed; stopping the worker so a restart recovers cleanly", exc_info=True)
            deliver.cancel()
            await self.app.crash(exc)
            raise

    def _continuous(self, messages: list[Any]) -> list[Any]:
        """The records that continue each partition exactly where processing left it.

        The last line of defence against loss: whatever dropped records between the fetch and here (a race with a
        rebalance, a seek), a record past the next expected offset means a hole. Its partition is sought back to
        the hole (records past it wait), and a repeat before that is skipped. A hole that persists through three
        re-reads is real (offsets deleted by retention): it is accepted with a warning.
        """
        out = []
        for m in messages:
            tp, off = m.tp, m.offset
            expected = self._next.get(tp)
            if expected is None:
                # a partition the last rebalance's seek did not cover: assigned since, its seek still to come (faust
                # resumes fetching before it). Its records are read again from the seek target once it has run;
                # taken now, they were processed from wherever the fetch stood (seed 320: from 721 where the commit
                # was 368), and their acks let the commit pass the records in between
                if tp not in self._unseeked:
                    self._unseeked.add(tp)
                    log.info("%s/%d: records before its seek dropped (from offset %d); read again after it",
                             tp.topic, tp.partition, off)  # fmt: skip
                continue
            if off == expected:
                self._next[tp] = off + 1
                out.append(m)
            elif off < expected:
                continue  # processed already in this epoch (read twice)
            else:
                tries, since = self._holes.get((tp, expected), (0, 0.0))
                if tries >= 3:
                    log.warning("%s: offsets %d..%d never arrived after %d re-reads; going on from %d",
                                tp, expected, off - 1, tries, off)  # fmt: skip
                    self._holes.pop((tp, expected), None)
                    self._gaps.append((tp, expected, off))  # commits may pass it now
                    self._next[tp] = off + 1
                    out.append(m)
                elif time.monotonic() - since > 2.0:
                    log.warning("%s: got offset %d where %d was next; re-reading from %d", tp, off, expected, expected)
                    self._holes[(tp, expected)] = (tries + 1, time.monotonic())
                    self._reseek.append((tp, expected))
        return out

    def health(self, now: float) -> str | None:
        """Why this worker can no longer make progress, or None. Called by the worker's watchdog thread
        (`streams.worker`), which exits the process on an answer: its partitions then go to the other workers, and its
        supervisor (`taoflow up`, the orchestrator) starts it again.

        - The processing loop has not run for `recovery_stall_s`: it ticks every few seconds in any state, so its
          task is gone or the event loop is blocked.
        - Partitions are assigned, the flow is suspended and no table recovery is running, for `recovery_stall_s`.
          faust suspends the flow on revocation and resumes it once the tables are recovered. Seen in the fault
          campaign (seeds 275, 280): a worker paused past the session timeout came back, rejoined, and faust cancelled
          its recovery task (and this loop's task) on the way; the next assignment was never recovered while the
          worker heartbeated and held its partitions. A recovery that is running, however long, never counts.
        """
        limit = self.ctx.cfg.recovery_stall_s
        # the loop's ticks count once it has started (before, start-up and the first recovery are faust's to bound)
        if self.last_tick is not None and now - self.last_tick >= limit:
            return f"the stream processing loop has not run for {now - self.last_tick:.0f}s"
        app = self.app
        stuck = (not app.flow_control.is_active() and bool(app.consumer.assignment())
                 and not app.tables.recovery.in_recovery)  # fmt: skip
        if not stuck:
            self._stuck_since = None
            return None
        if self._stuck_since is None:
            self._stuck_since = now
        if now - self._stuck_since >= limit:
            return (f"{len(app.consumer.assignment())} partitions assigned, the flow suspended and no table recovery "
                    f"running for {now - self._stuck_since:.0f}s")  # fmt: skip
        return None

    async def _watch_stalls(self) -> None:
        """A partition with records beyond the next expected offset (by the broker's high watermark), and no
        progress since the last look, is read again from that offset: records lost between fetch and here at
        the end of a stream leave no later record to reveal the hole. Re-reading is harmless (repeats are
        skipped), so this errs on the side of reading again."""
        consumer = self.app.consumer
        assigned = consumer.assignment()
        for tp, expected in list(self._next.items()):
            if tp.topic not in self.topics or tp not in assigned:
                continue
            high = consumer.highwater(tp)
            if high is not None and expected < high and self._seen.get(tp) == expected:
                log.warning("%s: no progress at offset %d with records up to %d; re-reading from %d",
                            tp, expected, high - 1, expected)  # fmt: skip
                await consumer.seek(tp, expected)
            self._seen[tp] = expected

    async def _expire(self) -> None:
        """Remove join state past its TTL (see `streams.expiry`); delivered in order like any batch."""

        out = self.ctx.outbox()
        assigned = {(tp.topic, tp.partition) for tp in self.app.consumer.assignment()}
        counts = expire(self.ctx, out, assigned)
        if len(out):
            log.info("join state expired: %s", counts)
            await self._sending.put((out, []))

    def _delivery_ended(self, task: asyncio.Future[None]) -> None:
        """A delivery failure (Kafka unreachable past its timeouts) stops the worker at once: the records it
        held are not acked, and a restart reads them again."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.critical("sending a batch's outputs failed; stopping the worker so a restart recovers cleanly",
                     exc_info=exc)  # fmt: skip
        self._crash = asyncio.ensure_future(self.app.crash(exc))

    async def _drain_sending(self, deliver: asyncio.Future[None]) -> None:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._sending.join(), 30)
        deliver.cancel()

    async def _deliver(self) -> None:
        """Send processed Outboxes in order; what queued up meanwhile goes out together (two round trips for
        all of it: outputs, then changelogs), so delivery keeps up without reordering anything."""
        ack = self.app.consumer.ack
        producer = self.ctx.producer
        while True:
            items = [await self._sending.get()]
            while not self._sending.empty():
                items.append(self._sending.get_nowait())
            try:
                out = items[0][0] if len(items) == 1 else Outbox.merge([o for o, _ in items])
                await producer.send(out)
                for _, messages in items:
                    for m in messages:
                        ack(m)
            finally:
                for _ in items:
                    self._sending.task_done()
