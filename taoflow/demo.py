"""`taoflow demo`: the whole loop on embedded defaults, with simulated agents and a tiny local model.

1. The embedded broker, a stream worker (verifier scorer for `math`) and the gateway (a warmed-up tiny model on
   CPU) start. Agents send traffic through the gateway's OpenAI API: `math` questions (a verifier scores the
   answers) and `support` chats (the agent reports `task_success` later, more often for the `empathetic`
   strategy than for `terse`). The gateway routes by the utilities the stream learns.
2. A TAO round runs on the math prompts the stream landed (unlabeled), passes the gate and publishes an adapter.
3. The gateway hot-swaps it in as a canary; agents keep sending; a sequential test on the rewards of canary and
   base (same strategies, same time) promotes it when it is better at a 5% error rate, rolls it back when it is
   worse, and rolls it back unproven at the demo's cap. The report then shows the improvement.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taoflow.broker import EmbeddedBroker
from taoflow.exceptions import TaoflowError
from taoflow.settings import Settings

# the support strategies' true chance of solving the ticket (the simulated users' feedback)
SUPPORT_QUALITY = {"empathetic": 0.8, "terse": 0.4}
OPERATORS = {
    "math": [{"name": "direct"}, {"name": "padded", "template": "{prompt} ok"}],
    "support": [{"name": "empathetic", "system_prompt": "You are warm and caring."},
                {"name": "terse", "system_prompt": "Be brief."}],
}  # fmt: skip
SCORERS = [{"type": "arithmetic", "task_types": ["math"], "name": "verifier"}]


@dataclass
class DemoResult:
    utilities: dict[str, dict[str, float]] = field(default_factory=dict)
    math_success: dict[str, float] = field(default_factory=dict)  # verifier success per math operator (base)
    rounds: list[Any] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (action, adapter)
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0

    def support_order_ok(self) -> bool:
        """The support strategies (true quality set by the simulated users) are ranked by utility as they should."""
        sup = self.utilities.get("support", {})
        return sup.get("empathetic@base", -1) > sup.get("terse@base", 2)

    def math_order_ok(self) -> bool:
        """The math strategies are ranked as the verifier measured them on the base model (a noisier check:
        the tiny model answers about one in five questions right)."""
        math, truth = self.utilities.get("math", {}), self.math_success
        if len(truth) < 2:
            return False
        return (math.get("direct@base", -1) > math.get("padded@base", -1)) == (truth["direct"] > truth["padded"])

    @property
    def published(self) -> str | None:
        return next((a for act, a in self.events if act == "published"), None)

    @property
    def promoted(self) -> bool:
        return any(act == "promoted" for act, _ in self.events)


class Agents:
    """Simulated agents: a few threads sending math and support traffic through the gateway."""

    def __init__(self, url: str, rng: random.Random, threads: int = 3, progress: Any = None) -> None:
        import httpx

        self.url, self.rng, self.threads, self.progress = url, rng, threads, progress
        self.client = httpx.Client(base_url=url, timeout=120)
        self.stop = threading.Event()
        self.sent = 0
        self.failures = 0
        self.lock = threading.Lock()

    def one(self, i: int) -> None:
        rng = random.Random(self.rng.random() + i)
        if i % 3 != 2:  # two thirds math: the prompts the TAO round learns from
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            body = {"model": "taoflow", "prompt": f"Order {rng.randint(1000, 9999)}: What is {a} + {b}?",
                    "max_tokens": 4, "temperature": 0, "metadata": {"task_type": "math"}}  # fmt: skip
            r = self.client.post("/completions", json=body)
        else:
            body = {"model": "taoflow", "max_tokens": 8, "temperature": 0.7, "metadata": {"task_type": "support"},
                    "messages": [{"role": "user", "content": "My order has not arrived."}]}  # fmt: skip
            r = self.client.post("/chat/completions", json=body)
            if r.status_code == 200:
                strategy = r.headers["x-taoflow-operator"].split("@")[0]
                solved = rng.random() < SUPPORT_QUALITY[strategy]
                self.client.post("/feedback", json={"interaction_id": r.headers["x-taoflow-interaction-id"],
                                                    "kind": "task_success", "value": float(solved)})  # fmt: skip
        with self.lock:
            self.sent += 1
            if r.status_code != 200:
                self.failures += 1

    def bar(self, name: str, total: int) -> Any:
        """A progress bar for requests to come (None without a `progress`)."""
        return self.progress.add_task(name, total=total) if self.progress is not None else None

    def run(self, n: int, bar: str | None = None, task: Any = None) -> None:
        """Send n requests over the agent threads; returns when they are answered. A bar named `bar` (or the bar
        `task`) counts them."""
        start = self.sent
        counter = iter(range(start, start + n))
        lock = threading.Lock()
        if task is None and bar:
            task = self.bar(bar, n)

        def loop() -> None:
            while not self.stop.is_set():
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                self.one(i)
                if task is not None:
                    self.progress.advance(task)

        ts = [threading.Thread(target=loop, daemon=True) for _ in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TaoflowError(f"the demo timed out waiting for {what}")
        time.sleep(0.5)


DEMO_CANARY_REWARDS = 150  # production default: 20,000 (settings: serve.release_max_rewards)


def run_demo(
    settings: Settings,
    *,
    events: int = 1600,
    seed: int = 0,
    train_steps: int = 100,
    log: Any = None,
    progress: Any = None,
) -> DemoResult:
    """Run the loop end to end (see the module docstring); `log(message)` reports each phase, and a rich `progress`
    (`taoflow.bars.bars`) draws a bar for each phase's traffic and each stage of a TAO round."""
    import uvicorn

    from learners.tao import run_round
    from learners.tasks import make_warm_model
    from serving.backends import TransformersBackend
    from serving.gateway import Gateway, build_app
    from streams.sqlapi import query
    from taoflow.bars import StageBars

    say = log or (lambda msg: None)
    rng = random.Random(seed)
    t0 = time.monotonic()
    data = settings.core.data_dir
    data.mkdir(parents=True, exist_ok=True)
    base = data / "models" / "warm"
    if not (base / "config.json").exists():
        say("building a tiny model and giving it a short supervised warm-up (weak, not random)")
        make_warm_model(base, steps=200, examples=60, seed=seed)
    broker = EmbeddedBroker(settings).start() if settings.embedded else None
    overrides = {
        **settings.overrides,
        "core": {**settings.overrides.get("core", {}), "base_model": str(base)},
        "kafka": {"bootstrap": settings.bootstrap},
        # the canary is decided within the demo: rolled back unproven after DEMO_CANARY_REWARDS rewards
        "serve": {"operators": OPERATORS, "canary_fraction": 0.3, "release_max_rewards": DEMO_CANARY_REWARDS,
                  "max_tokens": 8, "port": 0},
        # a drill: the gate only reports here (margin -1), so that phase 3 always shows the canary and the release
        # test deciding on live traffic. The demo's 100 single-digit sums leave too few unseen questions for a round
        # to show a real held-out gain; in production the gate refuses such rounds (TAOFLOW_LEARNER_GATE_MARGIN).
        "learner": {"gate_margin": -1.0, "gate_task_margin": 1.0,
                    "scorers": [{"type": "arithmetic"}], "task_types": ["math"], "k": 16, "steps": train_steps,
                    "learning_rate": 2e-3, "batch_prompts": 8, "max_new_tokens": 4, "temperatures": [1.0],
                    "lora_r": 16, "lora_alpha": 32, "max_prompts": 1000, "seed": seed},
        "stream": {"scorers": SCORERS, "alpha": 0.05},
    }  # fmt: skip
    s = Settings(overrides=overrides)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **s.environ(), "TAOFLOW_LOG_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    worker_log = open(data / "demo-worker.log", "ab")  # noqa: SIM115 - the child writes it
    worker = subprocess.Popen([sys.executable, "-m", "taoflow.cli", "worker"], env=env, stdout=worker_log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = Settings(overrides={**overrides, "serve": {**overrides["serve"], "port": port}})
    gateway = Gateway(s, TransformersBackend(str(base), "cpu"))
    server = uvicorn.Server(uvicorn.Config(build_app(gateway), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    result = DemoResult()
    agents: Agents | None = None

    def count(sql: str) -> int:
        try:
            return int(query(sql, s).rows[0][0])
        except Exception:
            return -1

    try:
        _wait(lambda: server.started or not thread.is_alive(), 300, "the gateway")
        if not server.started:
            raise TaoflowError("the gateway failed to start; see the log above")
        agents = Agents(f"http://127.0.0.1:{port}/v1", rng, progress=progress)
        agents.run(2)
        _wait(lambda: count("SELECT count(*) FROM interactions") >= 2, 180, "the stream worker")
        first = events * 2 // 3
        say(f"phase 1: {first} requests through the gateway (math: verifier; support: user feedback)")
        agents.run(first, bar="phase 1 requests")
        _wait(lambda: count("SELECT count(*) FROM interactions") >= agents.sent, 120, "the interactions to land")
        say(
            "phase 2: a TAO round on the math prompts the stream landed (prompts only, no labels); in this drill the "
            "gate reports its verdict and publishes anyway, so that the release test decides on live traffic"
        )
        for attempt in range(1, 4):
            r = run_round(s, StageBars(progress, f"round {attempt} ") if progress is not None else None)
            result.rounds.append(r)
            m = r.metrics
            say(
                f"  round {r.round_id}: {r.status}; held-out reward {m.get('heldout_reward_current', 0):.3f} -> "
                f"{m.get('heldout_reward_new', 0):.3f} (gain lower bound {m.get('gain_lcb', 0):+.3f})"
            )
            if r.status == "published":
                break
        name = result.rounds[-1].adapter
        if name:
            _wait(
                lambda: gateway.router.canary == name or gateway.router.incumbent == name,
                120,
                "the gateway to load the adapter",
            )
            say(f"phase 3: {name} serves as a canary; traffic goes on until it is promoted or rolled back")
            budget = max(events - first, 4 * DEMO_CANARY_REWARDS)
            canary_bar = agents.bar("phase 3 requests", budget)  # ends early once the canary is decided
            while budget > 0 and gateway.router.canary == name:
                agents.run(min(100, budget), task=canary_bar)
                budget -= 100
            if gateway.router.incumbent == name:
                say("phase 4: 300 more requests, now served by the promoted adapter")
                agents.run(300, bar="phase 4 requests")
            decision = gateway.decisions.get(name)
            if decision is None:
                say(f"  adapter {name}: still a canary when the demo's traffic ran out")
            else:
                say(f"  adapter {name}: {decision.action.replace('_', ' ')}: {decision.reason}")
        sent = agents.sent
        _wait(lambda: count("SELECT count(*) FROM interactions") >= sent, 120, "the last interactions to land")
        time.sleep(3)  # the last rewards and utility updates
        for task, op, u in query("SELECT task_type, operator, utility FROM utilities", s).rows:
            result.utilities.setdefault(task, {})[op] = u
        for op, mean in query("SELECT operator, avg(reward) FROM final_scores WHERE task_type = 'math' AND "
                              "operator LIKE '%@base' GROUP BY operator", s).rows:  # fmt: skip
            result.math_success[op.split("@")[0]] = mean
        _wait(lambda: count("SELECT count(*) FROM adapters") >= (2 if name else 0), 60, "the adapter rows")
        result.events = [(a, n) for n, a in query("SELECT adapter, action FROM adapters ORDER BY ts", s).rows]
        result.requests, result.failures = agents.sent, agents.failures
    finally:
        if agents is not None:
            agents.stop.set()
        server.should_exit = True
        thread.join(60)
        worker.terminate()
        worker.wait(60)
        worker_log.close()
        if broker is not None:
            broker.stop()
    result.seconds = time.monotonic() - t0
    return result
