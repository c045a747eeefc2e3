"""`taoflow worker`: the faust worker, with a supervised lander process beside it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from streams.exceptions import WorkerError
from taoflow.broker import ensure_topics, reachable, wait_for_kafka
from taoflow.exceptions import BrokerError
from taoflow.metrics import DictCollector, serve_metrics
from taoflow.restart import Backoff
from taoflow.settings import Settings

log = logging.getLogger(__name__)


class LanderSupervisor:
    """Keeps one `taoflow lander` child running, restarting it with backoff if it dies."""

    def __init__(self, settings: Settings) -> None:
        self.env = {**os.environ, **settings.environ()}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lander-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        # the lander watches this pid, not its own parent at start: a worker that dies while spawning it would leave
        # an orphan whose first parent is already init, and that never notices it is orphaned
        env = {**self.env, "_TAOFLOW_LANDER_PARENT": str(os.getpid())}
        self.proc = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "lander"], env=env)
        self.started = time.monotonic()

    def _watch(self) -> None:
        backoff = Backoff(first=0.5)
        while not self._stop.wait(0.5):
            if self.proc is not None and self.proc.poll() is not None:
                wait = backoff.delay(ran_for=time.monotonic() - self.started)
                log.warning("lander exited with %s; restarting in %.1fs", self.proc.returncode, wait)
                if self._stop.wait(wait):
                    return
                self._spawn()

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def watchdog(lane: Any, stall_s: float, every_s: float = 3.0) -> threading.Thread:
    """A thread that exits the process when the lane says the worker can no longer make progress (`Lane.health`): a
    thread, because what it watches for includes faust having cancelled the tasks on the event loop."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            reason = lane.health(time.monotonic())
            if reason is not None:
                log.critical("%s (TAOFLOW_STREAM_RECOVERY_STALL_S=%.0f): this worker cannot make progress; exiting so "
                             "its partitions go to another worker", reason, stall_s)  # fmt: skip
                logging.shutdown()
                os._exit(5)

    thread = threading.Thread(target=watch, name="taoflow-watchdog", daemon=True)
    thread.start()
    return thread


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the stream processors until SIGINT/SIGTERM (blocking)."""

    from streams.app import build_app
    from streams.seams import bounded_worker_class

    hint = "start it with `taoflow broker` (or run `taoflow up`)" if settings.embedded else "check the address"
    try:
        if not reachable(settings.bootstrap):
            raise BrokerError("unreachable")
        wait_for_kafka(settings.bootstrap, timeout=10, security=settings.kafka.security_kwargs())
    except BrokerError:
        raise WorkerError(f"no Kafka answers at {settings.bootstrap}; {hint}") from None
    ensure_topics(settings)
    settings.core.data_dir.mkdir(parents=True, exist_ok=True)
    cfg = settings.stream
    lander = LanderSupervisor(settings) if cfg.land and (cfg.land_duckdb or cfg.parquet_url) else None
    if lander:
        lander.start()
    app, ctx = build_app(settings)
    if settings.stream.metrics_port:
        registry = CollectorRegistry()
        registry.register(DictCollector("taoflow_worker_events", "Events the stream processors handled, by kind "
                                            "(interactions, feedback, scores, utility_updates, dead_letters, ...)",
                                            "kind", lambda: dict(ctx.counters)))  # fmt: skip
        serve_metrics(settings.stream.metrics_port, registry, "worker", settings.core.metrics_host)
    # the join tables hold a dict per interaction: with the default thresholds the collector walks them over and
    # over, and its pauses showed up as tail latency; objects made at start-up are frozen out of its sight
    import gc

    gc.set_threshold(50_000, 50, 100)
    gc.freeze()
    watchdog(app.lane, cfg.recovery_stall_s)
    worker_class = bounded_worker_class(cfg.stop_timeout_s)
    worker = worker_class(app, loglevel=loglevel, quiet=True, redirect_stdouts=False, override_logging=False)
    started = time.monotonic()
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        if lander:
            lander.stop()
        log.info("worker stopped after %.0fs", time.monotonic() - started)
