"""deploy/grafana/taoflow.json stays true to the code: every metric, label and label value a panel queries is one
that taoflow exports (found in the source, wherever the metric definitions move to)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "taoflow.json"
PACKAGES = ("schemas", "streams", "learners", "serving", "taoflow")
# what prometheus_client exposes for each kind of metric family
SUFFIXES = {
    "Counter": ("_total", "_created"),
    "CounterMetricFamily": ("_total",),
    "DictCollector": ("_total",),  # taoflow.metrics: a dict of values as one labelled counter (or gauge: kind=)
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("_sum", "_count", "_created"),
}
BUILTIN_LABELS = {"le", "job", "instance"}
# PromQL words that look like identifiers
PROMQL = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "avg", "without", "le"}


def exported() -> dict[str, set[str]]:
    """Series name -> label names, from every metric definition in the packages' source."""
    out: dict[str, set[str]] = {}
    for path in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            name = node.args[0]
            if func not in SUFFIXES or not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                continue
            labels: set[str] = set()
            spec = node.args[2] if len(node.args) > 2 else next((k.value for k in node.keywords if k.arg in
                                                                ("labelnames", "labels", "label")), None)  # fmt: skip
            if isinstance(spec, ast.Constant) and isinstance(spec.value, str):
                labels = {spec.value}
            elif isinstance(spec, ast.List | ast.Tuple):
                labels = {e.value for e in spec.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            kind = next((k.value for k in node.keywords if k.arg == "kind"), None)
            gauge = func == "DictCollector" and isinstance(kind, ast.Constant) and kind.value == "gauge"
            for suffix in ("",) if gauge else SUFFIXES[func]:
                out.setdefault(name.value + suffix, set()).update(labels | ({"le"} if suffix == "_bucket" else set()))
    return out


def string_literals() -> set[str]:
    """Every string constant in the packages' source (label values are among them)."""
    out: set[str] = set()
    for path in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        out |= {
            n.value
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
    return out


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in the dashboard, rows' panels included."""
    doc = json.loads(DASHBOARD.read_text())
    panels = [p for top in doc["panels"] for p in (top, *top.get("panels", []))]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def test_the_exporters_are_found() -> None:
    metrics = exported()
    # the families README's Prometheus section names; if one moves, the scan above still finds it
    assert {"taoflow_gateway_requests_total", "taoflow_worker_events_total", "taoflow_lander_rows_total",
            "taoflow_learner_stage_seconds_bucket"} <= set(metrics)  # fmt: skip
    assert metrics["taoflow_gateway_requests_total"] == {"endpoint", "status"}
    assert metrics["taoflow_worker_events_total"] == {"kind"}


def test_every_metric_label_and_value_in_the_dashboard_is_exported() -> None:
    metrics, literals = exported(), string_literals()
    exprs = expressions()
    assert len(exprs) >= 20
    used: set[str] = set()
    for title, expr in exprs:
        names = set(re.findall(r"\btaoflow_[a-z0-9_]+\b", expr))
        assert names, f"{title}: queries no taoflow metric: {expr}"
        unknown = names - set(metrics)
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the code (see README, Prometheus)"
        used |= names
        labels = set().union(*(metrics[n] for n in names)) | BUILTIN_LABELS
        grouped = {w.strip() for g in re.findall(r"\bby \(([^)]*)\)", expr) for w in g.split(",")}
        matched = dict(re.findall(r'(\w+)=~?"([^"]*)"', expr))
        assert grouped | set(matched) <= labels, f"{title}: labels {sorted(grouped | set(matched) - labels)} unknown"
        for label, value in matched.items():
            if not re.search(r"[.|*+?\[]", value):  # an exact value (not a pattern) must be one the code emits
                assert value in literals, f'{title}: {label}="{value}" never appears in the code'
        # every bare word is PromQL, a metric, a label or a Grafana variable
        words = set(re.findall(r"(?<![$\"\w])[a-z_][a-z0-9_]*\b(?![\"])", re.sub(r'"[^"]*"', "", expr)))
        assert words <= PROMQL | names | labels | {"__rate_interval", "__range"}, words - PROMQL - names - labels
    # the panels the dashboard promises: gateway traffic, latency, operators, tokens; worker events and dead
    # letters; lander rows, batch seconds, lag; learner rounds and stage seconds
    assert {"taoflow_gateway_requests_total", "taoflow_gateway_request_seconds_bucket",
            "taoflow_gateway_operator_requests_total", "taoflow_gateway_tokens_total", "taoflow_worker_events_total",
            "taoflow_lander_rows_total", "taoflow_lander_batch_seconds_bucket", "taoflow_lander_lag_records",
            "taoflow_learner_rounds_total", "taoflow_learner_stage_seconds_sum"} <= used  # fmt: skip


def test_the_dashboard_is_importable_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "taoflow" and doc["schemaVersion"] >= 36
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    # no two panels overlap on the 24-column grid
    cells = [(p["gridPos"]["y"] + dy, p["gridPos"]["x"] + dx) for p in doc["panels"]
             for dy in range(p["gridPos"]["h"]) for dx in range(p["gridPos"]["w"])]  # fmt: skip
    assert len(cells) == len(set(cells))
