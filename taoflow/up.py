"""`taoflow up`: the whole loop on one machine, supervised.

Children: the embedded broker (only when no Kafka is configured and none answers), `workers` stream workers,
the learner scheduler and the gateway, each a `taoflow` subprocess with the same settings. Their output is
interleaved line by line with a `[name]` prefix. A child that dies is restarted with exponential backoff
(1 s doubling to 30 s; the delay resets once it has stayed up a minute). Ctrl-C or SIGTERM stops them
once, gateway first and broker last. `<data_dir>/up.json` lists the children and their pids.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from taoflow.restart import Backoff
from taoflow.settings import Settings

log = logging.getLogger(__name__)

COLORS = ["cyan", "green", "magenta", "yellow", "blue", "red"]


@dataclass
class Child:
    name: str
    args: list[str]
    color: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    next_start: float = 0.0
    history: list[int] = field(default_factory=list)  # pids, oldest first


class Supervisor:
    def __init__(self, settings: Settings, *, workers: int = 1, learner: bool = True, gateway: bool = True,
                 echo: Any = None) -> None:  # fmt: skip
        self.settings = settings
        self.stop_event = threading.Event()
        self.echo = echo or (lambda name, color, line: print(f"[{name}] {line}", flush=True))
        self.children: list[Child] = []
        self.env = {**os.environ, **settings.environ(), "TAOFLOW_KAFKA_BOOTSTRAP": settings.bootstrap}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("COLUMNS", "200")  # children log through rich to a pipe: do not wrap at 80
        specs: list[tuple[str, list[str]]] = []
        if settings.embedded:
            from taoflow.broker import reachable

            if not reachable(settings.bootstrap):
                specs.append(("broker", ["broker"]))
        specs += [(f"worker-{i + 1}" if workers > 1 else "worker", ["worker"]) for i in range(workers)]
        if learner:
            specs.append(("learner", ["learner"]))
        if gateway:
            specs.append(("gateway", ["serve"]))
        for i, (name, args) in enumerate(specs):
            self.children.append(Child(name, args, COLORS[i % len(COLORS)]))
        self.state_file = settings.core.data_dir / "up.json"

    # -- children -----------------------------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        # several workers share the partitions in one consumer group; each runs a lander, one of them owns
        # the DuckDB file and the others stand by
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "taoflow.cli", *child.args], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        child.started = time.monotonic()
        child.history.append(child.proc.pid)
        threading.Thread(target=self._pump, args=(child, child.proc), daemon=True).start()
        self._write_state()

    def _pump(self, child: Child, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.echo(child.name, child.color, line)

    def _write_state(self) -> None:
        doc = {"pid": os.getpid(), "bootstrap": self.settings.bootstrap,
               "children": {c.name: {"pid": c.proc.pid if c.proc else None, "restarts": c.restarts,
                                     "pids": c.history} for c in self.children}}  # fmt: skip
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.state_file)

    def _wait_for_broker(self) -> None:
        from taoflow.broker import reachable

        deadline = time.monotonic() + 60
        while not reachable(self.settings.bootstrap):
            broker = next((c for c in self.children if c.name == "broker"), None)
            if broker and broker.proc and broker.proc.poll() is not None:
                raise SystemExit("the embedded broker exited at start; see its log lines above")
            if time.monotonic() > deadline:
                raise SystemExit(f"no Kafka answers at {self.settings.bootstrap}")
            time.sleep(0.2)
        time.sleep(1.0)  # topics are created right after the broker answers

    def run(self) -> int:
        self.settings.core.data_dir.mkdir(parents=True, exist_ok=True)
        from learners.models import default_base_model

        default_base_model(self.settings)  # build the tiny model once, before learner and gateway both want it
        for child in self.children:
            self._spawn(child)
            if child.name == "broker":
                self._wait_for_broker()
        while not self.stop_event.wait(0.5):
            now = time.monotonic()
            for child in self.children:
                proc = child.proc
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    child.proc = None
                    wait = child.backoff.delay(ran_for=now - child.started)
                    child.next_start = now + wait
                    log.warning("%s exited with %s; restarting in %.0fs", child.name, code, wait)
                elif proc is None and now >= child.next_start:
                    child.restarts += 1
                    self._spawn(child)
                    log.info("%s restarted (restart %d)", child.name, child.restarts)
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop every child once: gateway, learner, workers, broker; SIGKILL what outlives 30 s."""
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.proc.pid, signal.SIGKILL)
                    child.proc.wait()
        self.state_file.unlink(missing_ok=True)
        log.info("all stopped")
