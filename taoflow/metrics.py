"""Prometheus metrics, one way for every process.

Each process keeps one `CollectorRegistry` (the gateway's and the learner's metric objects, the worker's counters, the
lander's rows, lag and batch times). Where a process already serves HTTP, its `/metrics` route answers with
`exposition(registry)` behind that server's authentication (the gateway; the lander's SQL endpoint); a process that
serves nothing else (the worker, the learner) puts the same registry on a port of its own with `serve_metrics` when
its `metrics_port` setting is non-zero, bound to loopback unless `TAOFLOW_METRICS_HOST` says otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)


class DictCollector:
    """Exposes a dict of running values (read at scrape time) as one labelled counter or gauge family."""

    def __init__(self, name: str, doc: str, label: str, source: Callable[[], dict[str, int]],
                 kind: Literal["counter", "gauge"] = "counter") -> None:  # fmt: skip
        self.name, self.doc, self.label, self.source, self.kind = name, doc, label, source, kind

    def collect(self) -> Iterator[Any]:
        family_cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = family_cls(self.name, self.doc, labels=[self.label])
        for key, value in sorted(self.source().items()):
            family.add_metric([key], value)
        yield family


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The `/metrics` body of `registry` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_metrics(port: int, registry: CollectorRegistry, what: str, host: str = "127.0.0.1") -> None:
    """Start the HTTP exporter on `host:port` (`TAOFLOW_METRICS_HOST`: loopback unless a scraper elsewhere needs it)."""
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("%s metrics: cannot listen on %s:%d (%s); metrics are off", what, host, port, exc.strerror)
        return
    log.info("%s metrics on http://%s:%d/metrics", what, host, port)
