"""What a round reports while it runs and when it ends: its stages, the learner's Prometheus metrics, the progress
reporter the CLI draws bars with, and the result."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

STAGES = ("select", "generate", "score", "train", "gate", "publish")


class _Metrics:
    """The learner's Prometheus metrics (served by `taoflow learner` when learner.metrics_port is set)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rounds = Counter("taoflow_learner_rounds", "TAO rounds by outcome", ["status"], registry=self.registry)
        self.stage = Histogram(
            "taoflow_learner_stage_seconds",
            "Seconds per round stage",
            ["stage"],
            buckets=(0.1, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600),
            registry=self.registry,
        )
        self.gain = Gauge(
            "taoflow_learner_last_gain", "Held-out reward gain of the last gated round", registry=self.registry
        )
        self.tokens_per_s = Gauge(
            "taoflow_learner_generation_tokens_per_s", "Generation throughput, last round", registry=self.registry
        )


METRICS = _Metrics()


class Reporter:
    """Progress of a round; the CLI shows a bar per stage. The default logs stage changes."""

    def stage(self, name: str, total: int | None = None) -> None:
        log.info("round stage %s%s", name, f" ({total} items)" if total else "")

    def advance(self, n: int = 1) -> None:
        pass

    def done(self, name: str, seconds: float, note: str = "") -> None:
        log.info("round stage %s done in %.1fs %s", name, seconds, note)


@dataclass
class RoundResult:
    round_id: str
    status: str
    adapter: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    records: str | None = None  # where the round's rows went (`RecordSink.where`)
