"""`taoflow demo`: simulated agents drive the streaming half of the loop on embedded defaults.

Agents with two task types pick operators by ACT-R noisy utility (the live utilities, read with SQL), emit
interactions through the SDK, and report outcomes: a verifier checks math answers, support tickets get
`task_success` feedback later. Operators differ in true quality; the utilities learn which is better and
the agents shift their traffic to it. The TAO round and adapter hot-swap join when those tiers land.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learners.actr import select_operator, selection_probabilities
from streams.sqlapi import query
from taoflow.broker import EmbeddedBroker
from taoflow.emitter import Emitter
from taoflow.exceptions import TaoflowError
from taoflow.settings import Settings

# true probability that each operator does the task well
TRUE_QUALITY: dict[str, dict[str, float]] = {
    "math": {"chain-of-thought": 0.85, "direct": 0.55, "guess": 0.15},
    "support": {"empathetic": 0.8, "terse": 0.4},
}
SCORERS = '[{"type": "exact_match", "task_types": ["math", "warm-up"], "name": "verifier"}]'
# A slower learning rate than ACT-R's 0.2 default: over a few hundred rewards per task it keeps the learned best
# operator steady (simulated offline: at 0.2 the best operator is mislearned in about 2.5% of runs, at 0.05 in none
# of 2,000), at the cost of a slower first shift of traffic.
DEMO_ALPHA = 0.05


@dataclass
class DemoResult:
    """What the demo observed, for the summary and for tests."""

    utilities: dict[str, dict[str, float]]
    share_first: dict[str, dict[str, float]]
    share_last: dict[str, dict[str, float]]
    events: int
    seconds: float

    def best_matches_truth(self) -> bool:
        """For every task, the operator with the highest learned utility is the truly best one."""
        for task, ops in TRUE_QUALITY.items():
            learned = self.utilities.get(task, {})
            if not learned or max(learned, key=learned.__getitem__) != max(ops, key=ops.__getitem__):
                return False
        return True

    def ranking_matches_truth(self) -> bool:
        """Utilities order each task's operators as their true quality does (rarely picked ones learn slowly)."""
        for task, ops in TRUE_QUALITY.items():
            truth = sorted(ops, key=ops.__getitem__, reverse=True)
            learned = sorted(self.utilities.get(task, {}), key=lambda o: self.utilities[task][o], reverse=True)
            if learned != truth:
                return False
        return True


def _shares(choices: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, ops in TRUE_QUALITY.items():
        picked = [op for t, op in choices if t == task]  # the warm-up task is not part of the shares
        out[task] = {op: (picked.count(op) / len(picked) if picked else 0.0) for op in ops}
    return out


def _utilities(settings: Settings) -> dict[str, dict[str, float]]:
    try:
        rows = query("SELECT task_type, operator, utility FROM utilities", settings, timeout=5).rows
    except Exception:
        return {}
    out: dict[str, dict[str, float]] = {}
    for task, op, u in rows:
        if task in TRUE_QUALITY:
            out.setdefault(task, {})[op] = u
    return out


def _wait_until_processing(settings: Settings, emitter: Emitter, worker: Any, timeout: float = 120.0) -> None:
    """Send one warm-up interaction and wait until its utility update is queryable: the loop is live."""
    emitter.emit_interaction(task_type="warm-up", operator="warm-up", prompt="ping", response="pong",
                             metadata={"answer": "pong"})  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise TaoflowError(f"the stream worker exited with {worker.returncode}; see its log in the data dir")
        try:
            if query("SELECT count(*) FROM utility_history", settings, timeout=5).rows[0][0] >= 1:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TaoflowError(f"the stream worker did not process the warm-up event within {timeout:.0f}s")


def run_demo(
    settings: Settings, *, events: int = 3000, rate: float = 150.0, seed: int = 0, noise_s: float = 0.1, log: Any = None
) -> DemoResult:
    """Run broker (if none is configured), worker and simulated agents; return what was learned."""
    rng = random.Random(seed)
    broker = None
    if settings.embedded:
        broker = EmbeddedBroker(settings).start()
    env = {**os.environ, **settings.environ(), "TAOFLOW_STREAM_SCORERS": SCORERS, "TAOFLOW_LOG_LEVEL": "WARNING"}
    env["TAOFLOW_STREAM_ALPHA"] = str(DEMO_ALPHA)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    settings.core.data_dir.mkdir(parents=True, exist_ok=True)
    worker_log = open(settings.core.data_dir / "demo-worker.log", "ab")  # noqa: SIM115 - the child writes it
    worker = subprocess.Popen(
        [sys.executable, "-m", "taoflow.cli", "worker"], env=env, stdout=worker_log, stderr=subprocess.STDOUT
    )
    emitter = Emitter(settings, agent_id="demo-agents")
    _wait_until_processing(settings, emitter, worker)
    choices: list[tuple[str, str]] = []
    pending_feedback: list[tuple[float, str, float]] = []
    start = time.monotonic()
    utilities: dict[str, dict[str, float]] = {}
    last_refresh = 0.0
    try:
        for i in range(events):
            now = time.monotonic()
            if now - last_refresh > 0.5:
                utilities = _utilities(settings) or utilities
                last_refresh = now
                if log:
                    log(i, utilities)
            task = "math" if i % 2 == 0 else "support"
            ops = TRUE_QUALITY[task]
            known = {op: utilities.get(task, {}).get(op, settings.stream.initial_utility) for op in ops}
            op = select_operator(known, noise_s, rng)
            choices.append((task, op))
            good = rng.random() < ops[op]
            if task == "math":
                a, b = rng.randint(1, 50), rng.randint(1, 50)
                answer = a + b if good else a + b + rng.randint(1, 9)
                emitter.emit_interaction(
                    task_type=task,
                    operator=op,
                    prompt=f"What is {a} + {b}?",
                    response=f"The answer is {answer}",
                    metadata={"answer": str(a + b)},
                )
            else:
                iid = emitter.emit_interaction(
                    task_type=task,
                    operator=op,
                    prompt="My order has not arrived.",
                    response="I am sorry, let me check the status for you.",
                )
                pending_feedback.append((now + rng.uniform(0.2, 1.0), iid, 1.0 if good else 0.0))
            due = [f for f in pending_feedback if f[0] <= now]
            for f in due:
                emitter.emit_feedback(interaction_id=f[1], kind="task_success", value=f[2])
            pending_feedback = [f for f in pending_feedback if f[0] > now]
            ahead = (i + 1) / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        for f in pending_feedback:
            emitter.emit_feedback(interaction_id=f[1], kind="task_success", value=f[2])
        emitter.flush(30)
        deadline = time.monotonic() + 60
        expected = events + len([c for c in choices if c[0] == "support"]) + 1
        while time.monotonic() < deadline:
            done = query("SELECT count(*) FROM utility_history", settings).rows[0][0]
            if done >= expected:
                break
            time.sleep(0.5)
        utilities = _utilities(settings)
    finally:
        emitter.close()
        worker.terminate()
        worker.wait(30)
        worker_log.close()
        if broker is not None:
            broker.stop()
    half = len(choices) // 2
    return DemoResult(utilities, _shares(choices[:half]), _shares(choices[half:]), events, time.monotonic() - start)


def probabilities(result: DemoResult, noise_s: float) -> dict[str, dict[str, float]]:
    """Selection probability of each operator under the learned utilities."""
    return {task: selection_probabilities(ops, noise_s) for task, ops in result.utilities.items()}
