"""Prometheus metrics for the worker, the lander and the learner (the gateway has its own `/metrics`).

Each process keeps its own registry; `serve_metrics(port, registry)` exposes it over HTTP when the
component's `metrics_port` setting is non-zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class CountersCollector:
    """Exposes a dict of running counts (read at scrape time) as one labelled counter family."""

    def __init__(self, name: str, doc: str, label: str, source: Callable[[], dict[str, int]]) -> None:
        self.name, self.doc, self.label, self.source = name, doc, label, source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for key, value in sorted(self.source().items()):
            family.add_metric([key], value)
        yield family


def serve_metrics(port: int, registry: Any, what: str, host: str = "127.0.0.1") -> None:
    """Start the HTTP exporter on `host:port` (`TAOFLOW_METRICS_HOST`: loopback unless a scraper elsewhere needs it)."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("%s metrics: cannot listen on %s:%d (%s); metrics are off", what, host, port, exc.strerror)
        return
    log.info("%s metrics on http://%s:%d/metrics", what, host, port)
